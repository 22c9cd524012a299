"""The MAE-framework student: a ViT encoder on the visible tokens only, and a light decoder.

The encoder *is* timm's ``VisionTransformer`` (class token, qkv bias, LayerNorm eps 1e-6, no
LayerScale) with fixed 2-D sin-cos position embeddings (a frozen ``pos_embed`` parameter, zero
for the class token, as in MAE), so its ``state_dict`` loads into
``timm.create_model("vit_base_patch16_224", ...)`` for fine-tuning, where the position embedding
becomes learnable again. Per sample, the masked tokens are dropped *before* the encoder (it costs
~25% of a full pass at a 75% ratio); the decoder embeds the visible latents, puts a shared mask
token at every removed position, adds its own sin-cos position embedding and predicts
``target_dim`` values at every position of the output grid: normalised pixels of a patch, or a
teacher's token.

Decoder presets (docs/method.md 2): ``release`` = 4 blocks x 384 (Beyond Masking), ``mae`` = 8 x
512.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.masking import RandomMask
from .arch import encoder_shape, timm_encoder_kwargs
from .student import StudentBase

__all__ = ["MAEStudent", "create_mae_student"]


def sincos_pos_embed(grid: Sequence[int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """(1, [1 +] h * w, dim) fixed 2-D sin-cos embedding (timm's), with a zero row for the class
    token."""
    pe = build_sincos2d_pos_embed(list(grid), dim)
    if cls_token:
        pe = torch.cat([torch.zeros(1, dim), pe], dim=0)
    return pe.unsqueeze(0)


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
        self.encoder.pos_embed.data.copy_(sincos_pos_embed(grid, embed_dim))
        self.encoder.pos_embed.requires_grad_(
            False
        )  # fixed, as in MAE (learnable again when fine-tuned)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(grid, decoder_dim), persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=_layer_norm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = _layer_norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, target_dim)
        trunc_normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # MAE's initialisation of every linear layer
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._set_input_normalization(mean, std)

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


def _layer_norm(dim: int, **kwargs) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def create_mae_student(size: str = "base", **kwargs) -> MAEStudent:
    """Build an MAE-framework student by size name; see :class:`MAEStudent` for the keyword
    arguments."""
    return MAEStudent(size=size, **kwargs)
