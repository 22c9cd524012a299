"""The MAE-framework student: a ViT encoder on the visible tokens only, and a light decoder.

The encoder *is* timm's ``VisionTransformer`` (class token, qkv bias, LayerNorm eps 1e-6, no
LayerScale) with fixed 2-D sin-cos position embeddings (a frozen ``pos_embed`` parameter, zero
for the class token, in MAE's channel order: :func:`sincos_pos_embed`), so its ``state_dict``
loads into ``timm.create_model("vit_base_patch16_224", ...)`` for fine-tuning, where the position
embedding becomes learnable again. The weights start as MAE's ``initialize_weights`` draws them
(:meth:`MAEStudent.init_weights`), and the key names follow MAE's ``MaskedAutoencoderViT``
(encoder keys under ``encoder.``), so an official MAE checkpoint loads by renaming alone
(:mod:`tokenmorph.models.layouts`). Per sample, the masked tokens are dropped *before* the
encoder (it costs ~25% of a full pass at a 75% ratio); the decoder embeds the visible latents,
puts a shared mask token at every removed position, adds its own sin-cos position embedding and
predicts ``target_dim`` values at every position of the output grid: normalised pixels of a
patch, or a teacher's token.

Decoder presets (docs/method.md 2): ``release`` = 4 blocks x 384, 6 heads (Beyond Masking),
``mae`` = 8 x 512, 16 heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.masking import RandomMask
from .arch import encoder_shape, timm_encoder_kwargs
from .student import StudentBase

__all__ = ["MAEStudent", "create_mae_student"]


def sincos_pos_embed(grid: Sequence[int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """(1, [1 +] h * w, dim) float32: MAE's fixed 2-D sin-cos embedding (``get_2d_sincos_pos_
    embed``), with a zero row for the class token. Tokens row-major; the first dim / 2 channels
    encode the token's *column*, the last dim / 2 its row, each as [sin(pos w_k), cos(pos w_k)]
    with w_k = 10000^(-k / (dim / 4)), k < dim / 4; computed in float64 as MAE does.

    timm's ``build_sincos2d_pos_embed`` holds the same values in another channel order,
    [sin(row), sin(column), cos(row), cos(column)], computed in float32 (about 1e-6 away): it
    would train the same, but a MAE checkpoint's decoder would read the wrong channels."""
    h, w = grid
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (cols.reshape(-1), rows.reshape(-1)):  # column first, as MAE
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    pe = torch.cat(parts, dim=1).float()
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim), pe], dim=0)
    return pe.unsqueeze(0)


def legacy_sincos_pos_embed(grid: Sequence[int], dim: int) -> torch.Tensor:
    """(1, 1 + h * w, dim): the table of MAE-framework checkpoints written before the
    decoder's table was stored (timm's ``build_sincos2d_pos_embed`` order), so those decoders
    keep the function they were trained as."""
    pe = build_sincos2d_pos_embed(list(grid), dim)
    return torch.cat([torch.zeros(1, dim), pe], dim=0).unsqueeze(0)


class MAEStudent(StudentBase):
    """MAE-style masked autoencoder with a configurable decoder.

    Args:
        size: encoder size, "tiny" | "small" | "base" | "large" (or give embed_dim / depth /
        num_heads).
        target_dim: values predicted per output token (p * p * 3 for pixels, D for a teacher).
        img_size, patch_size: input side and patch side.
        decoder_depth, decoder_dim, decoder_heads: decoder shape (heads default: dim / 32).
        drop_path_rate: encoder stochastic depth (0 in MAE pre-training).
        mean, std: input normalisation; ``forward`` takes images in [0, 1].
    """

    def __init__(
        self,
        size: str = "base",
        target_dim: int = 768,
        img_size: int = 224,
        patch_size: int = 16,
        decoder_depth: int = 4,
        decoder_dim: int = 384,
        decoder_heads: int | None = None,
        drop_path_rate: float = 0.0,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        depth: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
    ) -> None:
        super().__init__()
        embed_dim, depth, num_heads = encoder_shape(
            size, img_size, patch_size, embed_dim, depth, num_heads
        )
        decoder_heads = decoder_heads or max(decoder_dim // 32, 1)
        if decoder_dim % decoder_heads:
            raise ValueError(
                f"decoder_dim {decoder_dim} is not divisible by its {decoder_heads} heads"
            )
        self.size = size
        self.arch = dict(
            framework="mae",
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            decoder_depth=decoder_depth,
            decoder_dim=decoder_dim,
            decoder_heads=decoder_heads,
        )
        self.encoder = VisionTransformer(
            **timm_encoder_kwargs(
                self.arch, drop_path_rate=drop_path_rate, num_classes=0, global_pool=""
            )
        )
        grid = self.encoder.patch_embed.grid_size
        # fixed, as in MAE (learnable again when fine-tuned)
        self.encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # fixed; stored in the state dict, as MAE's decoder_pos_embed
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(grid, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=_layer_norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = _layer_norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, target_dim)
        self.init_weights()
        self._set_input_normalization(mean, std)
        self.register_load_state_dict_pre_hook(_fill_legacy_decoder_pos_embed)

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE's ``initialize_weights``: fixed sin-cos position embeddings; the patch embedding's
        kernel xavier-uniform as a Linear (out, in * p * p), its bias left at PyTorch's Conv2d
        default; class and mask tokens N(0, 0.02), untruncated; every Linear xavier-uniform with
        bias 0 (a fused qkv is one (3D, D) Linear, so its bound is sqrt(6 / 4D), as in MAE);
        LayerNorm weight 1, bias 0."""
        grid = self.encoder.patch_embed.grid_size
        self.encoder.pos_embed.copy_(sincos_pos_embed(grid, self.encoder.embed_dim))
        self.decoder_pos_embed.copy_(sincos_pos_embed(grid, self.decoder_embed.out_features))
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            x = (
                checkpoint(blk, x, use_reentrant=False)
                if self.grad_checkpointing and self.training
                else blk(x)
            )
        return x

    def forward_features(
        self, images: torch.Tensor, keep: RandomMask | None = None
    ) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1], ``keep`` the K visible tokens of each sample (None =
           all)
        -> (B, 1 + K, dim) encoder latents after the final norm."""
        enc = self.encoder
        x = enc.patch_embed((images - self.mean) / self.std) + enc.pos_embed[:, 1:].to(images.dtype)
        if keep is not None:
            x = keep.keep(x)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = self._blocks(enc.blocks, torch.cat([cls, x], dim=1))
        return enc.norm(x)

    def forward_decoder(self, latent: torch.Tensor, keep: RandomMask | None) -> torch.Tensor:
        """latent (B, 1 + K, dim) of the ``keep`` tokens -> (B, N, target_dim) for every token of
        the grid."""
        x = self.decoder_embed(latent)
        cls, vis = x[:, :1], x[:, 1:]
        if keep is not None:  # visible latents back in place, the mask token everywhere else
            vis = keep.restore(vis, self.mask_token.reshape(-1))
        x = torch.cat([cls, vis + self.decoder_pos_embed[:, 1:].to(vis.dtype)], dim=1)
        x = self.decoder_norm(self._blocks(self.decoder_blocks, x))
        return self.decoder_pred(x[:, 1:])

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], optional (B, N) bool mask (True = removed, the same count per
        sample) -> (B, N, target_dim) predictions at every position of the output grid."""
        keep = None
        if mask is not None:
            if mask.shape != (images.shape[0], self.num_patches):
                raise ValueError(
                    f"mask must be (B, N) = ({images.shape[0]}, {self.num_patches}), got "
                    f"{tuple(mask.shape)}"
                )
            if mask.any():
                keep = RandomMask.from_mask(mask)
        return self.forward_decoder(self.forward_features(images, keep), keep)


def _fill_legacy_decoder_pos_embed(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before ``decoder_pos_embed`` was stored trained with the legacy
    table: give it back to them (a load-time upgrade, so resume, evaluation and pictures keep
    their function)."""
    key = prefix + "decoder_pos_embed"
    if key not in state_dict and prefix + "decoder_embed.weight" in state_dict:
        grid = module.encoder.patch_embed.grid_size
        state_dict[key] = legacy_sincos_pos_embed(grid, module.decoder_embed.out_features)


def _layer_norm(dim: int, **kwargs) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def create_mae_student(size: str = "base", **kwargs) -> MAEStudent:
    """Build an MAE-framework student by size name; see :class:`MAEStudent` for the keyword
    arguments."""
    return MAEStudent(size=size, **kwargs)
