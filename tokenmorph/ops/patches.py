"""Patch helpers: images <-> patch tokens, resizing, per-patch pixel normalisation. Pure tensor
functions."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = ["PIXEL_NORMS", "patchify", "unpatchify", "resize", "patch_norm_stats"]

PIXEL_NORMS = ("per_channel", "joint", "none")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), row-major patches, (p, q, c) order inside a
       patch
    (MAE's convention)."""
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch}")
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, patch * patch * C)


def unpatchify(
    tokens: torch.Tensor, patch: int, grid: Iterable[int], channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p*p*C) -> (B, C, h*p, w*p)."""
    h, w = grid
    B = tokens.shape[0]
    x = tokens.reshape(B, h, w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * patch, w * patch)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of [0, 1] images (B, C, H, W) -> (B, C, *size), antialiased when shrinking,
    clamped back to [0, 1]; the same tensor when the size already matches."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    out = F.interpolate(
        images, size=tuple(size), mode="bicubic", align_corners=False, antialias=shrink
    )
    return out.clamp(0, 1)


def patch_norm_stats(
    x: torch.Tensor, channels: int, norm: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale), each broadcastable to patches x (B, N, p*p*C) in (p, q, c) order, with the
    target ``(x - mean) / scale``: per channel, over its p*p pixels, scale = unbiased std + 1e-6
    (Beyond Masking); joint, over all p*p*C values, scale = sqrt(biased var + 1e-6); none:
    (0, 1)."""
    if norm == "per_channel":
        c = x.unflatten(-1, (-1, channels))  # (B, N, p*p, C): statistics over the pixels
        mean, scale = c.mean(dim=2, keepdim=True), c.std(dim=2, keepdim=True) + 1e-6
        return mean.expand_as(c).flatten(2), scale.expand_as(c).flatten(2)
    if norm == "joint":
        return x.mean(dim=-1, keepdim=True), (
            x.var(dim=-1, unbiased=False, keepdim=True) + 1e-6
        ) ** 0.5
    if norm == "none":
        return torch.zeros((), dtype=x.dtype, device=x.device), torch.ones(
            (), dtype=x.dtype, device=x.device
        )
    raise ValueError(f"pixel norm must be one of {PIXEL_NORMS}, got {norm!r}")
