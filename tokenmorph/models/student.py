"""The DTM student: a BEiT-style ViT that sees masked images and predicts teacher tokens.

The encoder *is* timm's ``Beit`` (relative position bias, no absolute position embedding,
LayerScale, qkv bias, LayerNorm eps 1e-6, drop path), so its ``state_dict`` loads into timm for
fine-tuning. What DTM adds around it (docs/method.md 1.2): a learned mask token that replaces the
patch embeddings of masked patches, and a head, ``Linear(dim -> teacher dim)`` on every patch
token after the encoder's final norm.

The relative position bias (``rel_pos``) is, as in the DTM release, by default ``"both"``: every
block its own table and one shared table added to it (timm's ``use_rel_pos_bias`` and
``use_shared_rel_pos_bias`` together); ``"shared"`` and ``"per_block"`` are the other layouts.
The initialisation (``init``) is by default the release's (:func:`release_init`); ``"timm"``
keeps timm's own.

Loading the encoder into timm (strict, no missing or unexpected keys)::

    import timm
    from tokenmorph.models import timm_encoder_kwargs, timm_model_name
    model = timm.create_model(timm_model_name(student.arch), num_classes=0, global_pool="",
                              **timm_encoder_kwargs(student.arch))   # the student's layout
    model.load_state_dict(student.encoder.state_dict())
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn
from torch.utils.checkpoint import checkpoint

from .arch import REL_POS, encoder_shape, timm_encoder_kwargs
from .rel_pos import use_deterministic_rel_pos

__all__ = [
    "STUDENT_INITS",
    "StudentBase",
    "MaskedViTStudent",
    "create_student",
    "release_trunc_normal_",
    "release_init",
]

# init -> what it does (the config's ``init`` choices come from here)
STUDENT_INITS = {
    "release": "the DTM / BEiT release's: truncated normal std 0.02 cut at +-0.02, biases 0, "
    "output projections rescaled per layer",
    "timm": "timm's Beit init (truncated normal std 0.02 cut at +-2, PyTorch's default for the "
    "patch embedding)",
}


def release_trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """The BEiT / DTM releases' truncated normal: std ``std`` cut at +-``std`` (one standard
    deviation, so the values' own std is about 0.54 ``std``), in place."""
    return trunc_normal_(tensor, std=std, a=-std, b=std)


@torch.no_grad()
def release_init(student: nn.Module, std: float = 0.02) -> None:
    """Initialise a :class:`MaskedViTStudent` as the DTM release's ``DTM`` model (BEiT v2's
    pre-training model): every Linear (qkv, projections, MLP, head) and the patch-embedding
    Conv2d get :func:`release_trunc_normal_` weights and zero biases, LayerNorms weight 1 and
    bias 0, the class and mask tokens :func:`release_trunc_normal_`, the relative position tables
    zeros, and block l (1-based) divides its ``attn.proj`` and ``mlp.fc2`` weights by sqrt(2 l)
    (BEiT's ``fix_init_weight``). q/v biases are zero and LayerScale is ``init_values`` (timm's
    already). The distribution is the release's; the order of the random draws is not."""
    for m in student.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            release_trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    enc = student.encoder
    release_trunc_normal_(enc.cls_token, std)
    release_trunc_normal_(student.mask_token, std)
    for name, p in enc.named_parameters():
        if name.endswith("relative_position_bias_table"):
            nn.init.zeros_(p)
    for layer, blk in enumerate(enc.blocks, start=1):
        blk.attn.proj.weight.div_(math.sqrt(2.0 * layer))
        blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


class StudentBase(nn.Module):
    """What both students share: a timm ``encoder`` (with ``patch_embed``), a ``mask_token``,
           input
    normalisation buffers ``mean`` / ``std`` (images come in [0, 1]) and the grid properties."""

    def _set_input_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.grad_checkpointing = False

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (timm's convention, plus the mask token)."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}


class MaskedViTStudent(StudentBase):
    """BEiT-style masked ViT with a token head.

    Args:
        size: "tiny" | "small" | "base" | "large" (or give embed_dim / depth / num_heads).
        target_dim: D of the teacher tokens the head predicts (512 for CLIP ViT-B/16).
        img_size, patch_size: input side and patch side (16 at 224; e.g. 4 at 32 for small
            images).
        drop_path_rate: stochastic depth (0.1 in DTM).
        init_values: LayerScale init (0.1).
        mean, std: input normalisation; ``forward`` takes images in [0, 1].
        depth, embed_dim, num_heads: override the size's shape.
        rel_pos: relative position bias layout, "both" (the release's), "shared" or "per_block"
            (:data:`tokenmorph.models.arch.REL_POS`).
        init: "release" (:func:`release_init`) or "timm" (timm's Beit init; the mask token and
            head weights drawn as timm's, std 0.02 cut at +-2).
    """

    def __init__(
        self,
        size: str = "small",
        target_dim: int = 512,
        img_size: int = 224,
        patch_size: int = 16,
        drop_path_rate: float = 0.1,
        init_values: float = 0.1,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        depth: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        rel_pos: str = "both",
        init: str = "release",
    ) -> None:
        super().__init__()
        if rel_pos not in REL_POS:
            raise ValueError(f"rel_pos must be one of {REL_POS}, got {rel_pos!r}")
        if init not in STUDENT_INITS:
            raise ValueError(f"init must be one of {tuple(STUDENT_INITS)}, got {init!r}")
        embed_dim, depth, num_heads = encoder_shape(
            size, img_size, patch_size, embed_dim, depth, num_heads
        )
        self.size = size
        self.arch = dict(
            framework="beit",
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            init_values=init_values,
            rel_pos=rel_pos,
        )
        self.encoder = Beit(
            **timm_encoder_kwargs(
                self.arch, drop_path_rate=drop_path_rate, num_classes=0, global_pool=""
            )
        )
        use_deterministic_rel_pos(self.encoder)  # same values; a reproducible table gradient
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(embed_dim, target_dim)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if init == "release":
            release_init(self)
        self._set_input_normalization(mean, std)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides 1-D ones and biases: the DTM
        release's rule (``no_weight_decay() = {pos_embed, cls_token}``), so the mask token and
        every relative position table are decayed."""
        return {"encoder.cls_token"}

    def forward_features(
        self, images: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], mask (B, N) bool (True = masked) -> (B, 1 + N, dim)
           after
        the final norm."""
        enc = self.encoder
        x = enc.patch_embed((images - self.mean) / self.std)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(
                    f"mask must be (B, N) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}"
                )
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = enc.pos_drop(x)
        # the shared table's (H, 1 + N, 1 + N) bias, once per forward; each block adds its own
        rel_pos_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
        for blk in enc.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        return enc.norm(x)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], optional (B, N) mask -> (B, N, target_dim) predicted teacher
        tokens."""
        return self.head(self.forward_features(images, mask)[:, 1:])


def create_student(size: str = "small", **kwargs) -> MaskedViTStudent:
    """Build a student by size name; see :class:`MaskedViTStudent` for the keyword arguments."""
    return MaskedViTStudent(size=size, **kwargs)
