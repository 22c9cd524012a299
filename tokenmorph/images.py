"""Image loading and patch helpers shared by the CLI, the visualisations and the teachers."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SAMPLE_PHOTOS", "load_image", "sample_photo", "to_square_tensor", "patchify", "unpatchify", "resize"]

# Colour photos that ship inside scikit-image (no download needed).
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def to_square_tensor(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W[, C]) uint8/float array -> (3, size, size) float in [0, 1]: centre square crop, bicubic
    resize; grey becomes 3 channels, alpha is dropped."""
    x = torch.from_numpy(np.ascontiguousarray(image))
    if x.dim() == 2:
        x = x[..., None]
    x = x[..., :3]
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:2], 3)
    x = x.permute(2, 0, 1).float()
    if image.dtype == np.uint8:
        x = x / 255.0
    elif image.dtype == np.uint16:
        x = x / 65535.0
    h, w = x.shape[1:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, top : top + s, left : left + s]
    x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    return x.clamp(0, 1)


def sample_photo(name: str, size: int = 224) -> torch.Tensor:
    """A photo from ``skimage.data`` by name, as (3, size, size) in [0, 1]."""
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("scikit-image is needed for the sample photos: pip install 'tokenmorph[viz]'") from e
    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise ValueError(f"unknown skimage.data photo {name!r}; try one of {', '.join(SAMPLE_PHOTOS)}")
    return to_square_tensor(loader(), size)


def load_image(path: Union[str, Path], size: int = 224) -> torch.Tensor:
    """An image file, a ``skimage:NAME`` sample photo or ``fashion-mnist:N`` (image N of the test split)
    as (3, size, size) in [0, 1]."""
    path = str(path)
    if path.startswith("skimage:"):
        return sample_photo(path.split(":", 1)[1], size)
    if path.startswith("fashion-mnist:"):
        from .data import FashionMNIST

        index = path.split(":", 1)[1]
        test = FashionMNIST(train=False)
        if not index.isdigit() or int(index) >= len(test):
            raise ValueError(f"{path}: give an index of the test split, 0 to {len(test) - 1}")
        return to_square_tensor(test.data[int(index)].numpy(), size)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return to_square_tensor(np.asarray(im), size)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), row-major patches, (p, q, c) order inside a patch
    (MAE's convention)."""
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch}")
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, patch * patch * C)


def unpatchify(tokens: torch.Tensor, patch: int, grid: Iterable[int], channels: int = 3) -> torch.Tensor:
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
    out = F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp(0, 1)
