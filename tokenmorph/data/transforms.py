"""Augmentations and evaluation views: PIL image -> (3, S, S) float in [0, 1], not normalised
       (each
model normalises with its own mean/std, see :func:`tokenmorph.data.dataset_stats`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .images import to_rgb

__all__ = [
    "INTERPOLATIONS",
    "TINY_IMAGE_SIDE",
    "DEFAULT_CROP_PCT",
    "ToRGB",
    "pretrain_transform",
    "to_unit_float",
    "default_crop_pct",
    "eval_transform",
]


class ToRGB:
    """PIL image -> "RGB" (so grey data sets give 3 channels). A class, not a lambda, so that
       data
    loader workers can pickle it."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


# the crop interpolations by name (torchvision's modes): the config's ``crop_interpolation`` choices
INTERPOLATIONS = tuple(m.value for m in T.InterpolationMode)


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name.lower())
    except ValueError:
        modes = ", ".join(m.value for m in T.InterpolationMode)
        raise ValueError(f"interpolation={name!r}: use one of {modes}") from None


class ColorJitter(T.ColorJitter):
    """torchvision's ``ColorJitter``: the same parameter draws and the same PIL operations,
    except that the contrast's mean grey is computed by NumPy instead of PIL's ``ImageStat`` (0.5
    ms per image in Pillow 13, most of the main job's loading time). It is the same integer
    (``int(mean + 0.5)`` of the L image; a sum of integers is exact in float64), so the pixels
    are the same (``tests/test_fast_paths.py``)."""

    def forward(self, img):
        if not isinstance(img, Image.Image) or "A" in img.getbands():
            return super().forward(img)
        order, brightness, contrast, saturation, hue = self.get_params(
            self.brightness, self.contrast, self.saturation, self.hue
        )
        for fn_id in order:
            if fn_id == 0 and brightness is not None:
                img = TF.adjust_brightness(img, brightness)
            elif fn_id == 1 and contrast is not None:
                img = _adjust_contrast(img, contrast)
            elif fn_id == 2 and saturation is not None:
                img = TF.adjust_saturation(img, saturation)
            elif fn_id == 3 and hue is not None:
                img = TF.adjust_hue(img, hue)
        return img


def _adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """PIL's ``ImageEnhance.Contrast(img).enhance(factor)``: a blend with the image's mean grey."""
    grey = img if img.mode == "L" else img.convert("L")
    mean = int(np.asarray(grey, dtype=np.float64).mean() + 0.5)
    degenerate = Image.new("L", img.size, mean)
    if img.mode != "L":
        degenerate = degenerate.convert(img.mode)
    return Image.blend(degenerate, img, factor)


def pretrain_transform(
    img_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    color_jitter: float = 0.4,
    hflip: bool = True,
    interpolation: str = "bicubic",
    uint8: bool = False,
) -> T.Compose:
    """The releases' pre-training augmentation: PIL image -> (3, img_size, img_size) float in
    [0, 1], not normalised; with ``uint8``, the same pixels as uint8 in [0, 255] (a quarter of
    the bytes through the loader's shared memory; :func:`to_unit_float` on the device gives the
    float image bit for bit).

    With colour jitter (DTM, ``utils/datasets.py DataAugmentationForBEiT``): ColorJitter(0.4,
    0.4, 0.4) (brightness, contrast, saturation; no hue) on the whole image -> horizontal flip ->
    RandomResizedCrop(img_size, scale, bicubic) -> ToTensor. The order matters for the contrast
    jitter, which blends towards the mean grey of what it is given (the whole image, not the
    crop). Without it (``color_jitter=0``: MAE and Beyond Masking's ``main_pretrain.py``):
    RandomResizedCrop -> flip -> ToTensor. ``hflip=False`` leaves the flip out. All randomness
    comes from torch's global generator (``torch.manual_seed`` makes it reproducible).
    """
    crop = T.RandomResizedCrop(
        img_size, scale=tuple(scale), interpolation=_interpolation(interpolation)
    )
    flip = [T.RandomHorizontalFlip()] if hflip else []
    if color_jitter:
        steps = [ColorJitter(color_jitter, color_jitter, color_jitter), *flip, crop]
    else:
        steps = [crop, *flip]
    return T.Compose([ToRGB(), *steps, T.PILToTensor() if uint8 else T.ToTensor()])


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., H, W) in [0, 255] -> float32 in [0, 1], as ``ToTensor`` computes it
    (x / 255, correctly rounded on any device); float images are returned as they are."""
    if images.dtype != torch.uint8:
        return images
    return images.to(torch.float32).div_(255)


TINY_IMAGE_SIDE = (
    64  # at or below this side an evaluation view is a plain resize (e.g. Fashion-MNIST)
)
DEFAULT_CROP_PCT = 0.875


def default_crop_pct(side: int) -> float:
    """The evaluation centre-crop fraction for images of ``side`` pixels: 1.0 for tiny images
    (cropping 28 px digits or clothes would cut the object), 0.875 otherwise."""
    return 1.0 if side <= TINY_IMAGE_SIDE else DEFAULT_CROP_PCT


def eval_transform(
    img_size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic"
) -> T.Compose:
    """Deterministic evaluation view: PIL image -> (3, img_size, img_size) float in [0, 1].

    Resize the short side to int(img_size / crop_pct), CenterCrop(img_size), ToTensor.
    ``crop_pct=1`` simply resizes (what 28x28 Fashion-MNIST wants).
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(
            f"crop_pct={crop_pct}: must be in (0, 1], e.g. 0.875 for photos or 1.0 for "
            "Fashion-MNIST"
        )
    return T.Compose(
        [
            ToRGB(),
            T.Resize(int(img_size / crop_pct), interpolation=_interpolation(interpolation)),
            T.CenterCrop(img_size),
            T.ToTensor(),
        ]
    )
