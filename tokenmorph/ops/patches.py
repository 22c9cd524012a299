"""Patch helpers: images <-> patch tokens, resizing, per-patch pixel normalisation. Pure tensor
functions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "PIXEL_NORMS",
    "patchify",
    "unpatchify",
    "resize",
    "area_resize",
    "normalize_image",
    "unnormalize_image",
    "patch_norm_stats",
]

# per_channel: Beyond Masking's targets; joint: MAE's norm_pix_loss; input: MAE without it (the
# student's normalised input pixels); none: raw [0, 1] pixels
PIXEL_NORMS = ("per_channel", "joint", "input", "none")


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


def area_resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Area interpolation (adaptive average pooling; each output pixel averages the input pixels
    it overlaps, up or down): (B, C, H, W) -> (B, C, *size). The resize of every Beyond Masking
    loss (``F.interpolate(mode="area")``); the same tensor when the size already matches."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="area")


def _channel_stats(stats: Sequence[float], ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(stats, dtype=ref.dtype, device=ref.device).view(1, -1, 1, 1)


def normalize_image(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """(B, C, H, W) [0, 1] images -> (images - mean) / std per channel (what a model sees)."""
    return (images - _channel_stats(mean, images)) / _channel_stats(std, images)


def unnormalize_image(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """Inverse of :func:`normalize_image`: (B, C, H, W) normalised -> images * std + mean."""
    return images * _channel_stats(std, images) + _channel_stats(mean, images)


def patch_norm_stats(
    x: torch.Tensor,
    channels: int,
    norm: str,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale), each broadcastable to patches x (B, N, p*p*C) in (p, q, c) order of [0, 1]
    pixels, with the target ``(x - mean) / scale``:

    * ``per_channel`` (Beyond Masking): per channel, over its p*p pixels, scale = unbiased std +
      1e-6;
    * ``joint`` (MAE's norm_pix_loss): the patch of the *normalised* image
      ``(x - image_mean) / image_std`` over all its p*p*C values jointly, ``(v - mean) /
      sqrt(var + 1e-6)`` with the unbiased variance; returned in units of x (mean = image_mean +
      image_std * m, scale = image_std * sqrt(var + 1e-6), per channel);
    * ``input`` (MAE without norm_pix_loss): the normalised image itself (image_mean,
      image_std);
    * ``none``: raw pixels (0, 1).
    """
    if norm == "per_channel":
        c = x.unflatten(-1, (-1, channels))  # (B, N, p*p, C): statistics over the pixels
        mean, scale = c.mean(dim=2, keepdim=True), c.std(dim=2, keepdim=True) + 1e-6
        return mean.expand_as(c).flatten(2), scale.expand_as(c).flatten(2)
    if norm in ("joint", "input"):
        m = torch.as_tensor(image_mean, dtype=x.dtype, device=x.device)
        s = torch.as_tensor(image_std, dtype=x.dtype, device=x.device)
        m, s = m.repeat(x.shape[-1] // channels), s.repeat(x.shape[-1] // channels)  # (p*p*C,)
        if norm == "input":
            return m, s
        v = (x - m) / s  # the patch of the normalised image, channel fastest
        mu, var = v.mean(dim=-1, keepdim=True), v.var(dim=-1, unbiased=True, keepdim=True)
        return m + s * mu, s * (var + 1e-6) ** 0.5
    if norm == "none":
        return torch.zeros((), dtype=x.dtype, device=x.device), torch.ones(
            (), dtype=x.dtype, device=x.device
        )
    raise ValueError(f"pixel norm must be one of {PIXEL_NORMS}, got {norm!r}")
