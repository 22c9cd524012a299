"""Pre-training images decoded and augmented on the training device (``decode=device``).

The loader's workers do the cheap part: read each file's bytes, read its size and EXIF
orientation from the JPEG header (nothing decoded), and draw the sample's augmentation
parameters (crop box, flip, colour-jitter order and factors) from torch's generator, which
:class:`~tokenmorph.runtime.sampling.KeyedDataset` has seeded per sample, with the very calls of
:func:`~.transforms.pretrain_transform`'s steps in their order: the same parameters as
``decode=cpu`` for every sample. The training process then decodes the batch with
``torchvision.io.decode_jpeg(list, device=...)`` (nvjpeg, batched, on CUDA; libjpeg-turbo on
a CPU) and crops, resizes, flips and jitters it there (:func:`decode_batch`).

What differs from ``decode=cpu``, slightly: the decoder (nvjpeg against libjpeg-turbo; on a CPU
both are libjpeg-turbo and agree bit for bit), the resize (torch's antialiased float resize
against PIL's fixed-point one) and the place of the colour jitter: after the resize, on the
(S, S) view instead of the whole image. Brightness, contrast and saturation are linear per pixel,
as the resize is linear, so the order changes only clipping and rounding; the contrast still
blends towards the mean grey of the whole image (measured on it, as PIL does, and scaled by a
brightness factor applied before it). Files that are not JPEG (or CMYK JPEGs) are decoded by PIL
in the worker and only cropped and resized on the device; a file that does not decode is skipped
and counted (or raises, ``on_error="raise"``) as on the CPU path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from ..errors import ConfigError
from .images import (
    check_on_error,
    decode_rgb,
    probe_jpeg,
    skip_or_raise,
    to_rgb,
    undecodable,
)
from .transforms import ToRGB, pretrain_transform

__all__ = [
    "DEVICE_INTERPOLATIONS",
    "DeviceAugment",
    "EncodedImage",
    "decode_batch",
    "check_device_source",
    "check_device_interpolation",
    "DECODES",
]

# the config's ``decode`` choices
DECODES = {
    "cpu": "PIL in the loader's workers (the releases' pixels)",
    "device": "decode_jpeg and the augmentation on the training device, parameters drawn in the "
    "workers",
}
# the crop interpolations the device resize has (torch's antialiased ones, as PIL's)
DEVICE_INTERPOLATIONS = ("bicubic", "bilinear")

# ITU-R 601-2 luma in PIL's 16-bit fixed point: its "L" conversion (what the contrast and the
# saturation blend towards)
_LUMA_FIXED = (19595.0, 38470.0, 7471.0)
_BRIGHTNESS, _CONTRAST, _SATURATION = 0, 1, 2  # ColorJitter's fn_idx (3, hue, is never on)


@dataclass(frozen=True)
class DeviceSpec:
    """What the device does to every image of a batch: its output side, the resize, whether
    the colour jitter and flip come before the crop (DTM's order) and what a bad file does."""

    img_size: int
    interpolation: str
    jitter_first: bool
    on_error: str


@dataclass
class EncodedImage:
    """One sample for the device: ``data`` is a JPEG file's bytes (``encoded``) or an image PIL
    decoded in the worker ((3, H, W) uint8 array); plain bytes and arrays travel from the workers
    by value, where a tensor each would take one shared-memory file descriptor per sample. Its
    upright ``size`` (H, W), EXIF ``orientation`` (1..8, applied on the device to JPEG bytes),
    the augmentation parameters (``crop`` (top, left, height, width) on the upright image,
    ``flip``, jitter ``order`` (4 function indices) and ``factors`` (brightness, contrast,
    saturation; 1 = off)) and ``what`` names it in errors."""

    data: bytes | np.ndarray
    encoded: bool
    size: tuple[int, int]
    orientation: int
    crop: tuple[int, int, int, int]
    flip: bool
    order: tuple[int, ...]
    factors: tuple[float, float, float]
    what: str
    spec: DeviceSpec


class DeviceAugment:
    """The worker's half of ``decode=device``: bytes (or a decoded image) -> an
    :class:`EncodedImage` with the augmentation parameters of
    ``pretrain_transform(img_size, scale, color_jitter, hflip, interpolation)`` drawn from
    torch's global generator exactly as that transform draws them. Data sets that read files
    (:class:`~.folders.ImageFiles`, :class:`~.shards.TarShards`) hand it the file's bytes
    (``reads_bytes``) instead of decoding them."""

    reads_bytes = True

    def __init__(
        self,
        img_size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        color_jitter: float = 0.4,
        hflip: bool = True,
        interpolation: str = "bicubic",
        on_error: str = "skip",
    ) -> None:
        check_device_interpolation(interpolation)
        check_on_error(on_error)
        # the CPU path's own steps: their parameters are drawn by their own calls, in order
        self.steps = pretrain_transform(
            img_size, scale, color_jitter, hflip, interpolation
        ).transforms
        drawing = (T.ColorJitter, T.RandomHorizontalFlip, T.RandomResizedCrop)
        other = [t for t in self.steps if not isinstance(t, (*drawing, ToRGB, T.ToTensor))]
        if other:  # a step whose draws this class would not make: the parameters would drift
            raise TypeError(f"DeviceAugment does not know the augmentation steps {other}")
        self.spec = DeviceSpec(img_size, interpolation, bool(color_jitter), on_error)

    def draw(self, height: int, width: int) -> tuple:
        """(crop, flip, order, factors) for an upright (height, width) image, drawn as
        ``pretrain_transform``'s steps draw them (the same generator calls, the same order)."""
        crop, flip, order, factors = (0, 0, height, width), False, (0, 1, 2, 3), (1.0, 1.0, 1.0)
        shape_only = torch.empty((1, 1, 1)).expand(1, height, width)  # get_params reads .shape
        for t in self.steps:
            if isinstance(t, T.ColorJitter):
                fn_idx, b, c, s, _ = t.get_params(t.brightness, t.contrast, t.saturation, t.hue)
                order = tuple(int(i) for i in fn_idx)
                factors = tuple(1.0 if f is None else float(f) for f in (b, c, s))
            elif isinstance(t, T.RandomHorizontalFlip):
                flip = bool(torch.rand(1) < t.p)  # RandomHorizontalFlip.forward's draw
            elif isinstance(t, T.RandomResizedCrop):
                crop = tuple(int(v) for v in t.get_params(shape_only, t.scale, t.ratio))
        return crop, flip, order, factors

    def _item(self, data, encoded, size, orientation, what) -> EncodedImage:
        return EncodedImage(data, encoded, size, orientation, *self.draw(*size), what, self.spec)

    def __call__(self, image: Image.Image, what: str = "image") -> EncodedImage:
        """A decoded PIL image: cropped and resized on the device, decoded here."""
        rgb = np.ascontiguousarray(np.asarray(to_rgb(image)).transpose(2, 0, 1))
        return self._item(rgb, False, tuple(rgb.shape[1:]), 1, what)

    def from_bytes(self, data: bytes, what: str) -> EncodedImage:
        """An image file's bytes: a JPEG is left encoded for the device, anything else decoded
        here by PIL; ``DataError`` naming ``what`` for a file that does not parse."""
        probe = probe_jpeg(data, what)
        if probe is None:
            return self(decode_rgb(data, what), what)
        h, w, orientation = probe
        return self._item(bytes(data), True, (h, w), orientation, what)


def _decode_jpegs(files: list[bytes], device: torch.device) -> list:
    """decode_jpeg of each JPEG file's bytes on ``device`` (batched), RGB; an image the batch
    call cannot decode is retried alone, then on the CPU; one that fails there too is a
    ``RuntimeError`` in its place of the list."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]

    def decode(x, dev):
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (TorchCodec)
            warnings.filterwarnings("ignore", message=".*image decoding and encoding")
            return decode_jpeg(x, mode=ImageReadMode.RGB, device=dev)

    if not data:
        return []
    try:
        return list(decode(data, device))
    except RuntimeError:
        pass
    out = []
    for x in data:
        try:
            out.append(decode(x, device))
        except RuntimeError as e:
            try:
                out.append(decode(x, "cpu").to(device))
            except RuntimeError:
                out.append(e)
    return out


def _upright(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) turned as EXIF ``orientation`` says (PIL's ``exif_transpose``)."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1, -2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))  # a quarter turn clockwise
    if orientation == 7:
        return x.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) whole numbers in [0, 255] -> (..., 1, H, W) PIL's "L" values: its
    fixed-point luma, (R 19595 + G 38470 + B 7471 + 2^15) >> 16 (exact in float32)."""
    w = torch.tensor(_LUMA_FIXED, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return torch.floor(((x * w).sum(-3, keepdim=True) + 32768) / 65536)


def _blend(towards: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(towards, x, factor)`` on [0, 255] floats: clipped, then truncated
    to whole numbers as PIL's blend truncates."""
    f = factor.view(-1, 1, 1, 1)
    return (towards + f * (x - towards)).clamp_(0, 255).floor_()


def _jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, mean: torch.Tensor):
    """ColorJitter on (B, 3, S, S) floats in [0, 255], every sample in its own order (``order``
    (B, 4) function indices, ``factors`` (B, 3), ``mean`` (B,) the whole image's mean grey): at
    each of the four places, each function runs on the whole batch with factor 1 (nothing) for
    the samples that have another function there; no Python loop over the batch."""
    one = torch.ones_like(factors[:, 0])
    for place in range(order.shape[1]):
        for fn in (_BRIGHTNESS, _CONTRAST, _SATURATION):
            here = order[:, place] == fn
            f = torch.where(here, factors[:, fn], one)
            if fn == _BRIGHTNESS:
                x = _blend(torch.zeros_like(x[:, :1]), x, f)
                mean = mean * f  # what the contrast later blends towards is this image's mean
            elif fn == _CONTRAST:  # towards the mean grey, rounded as PIL rounds it
                x = _blend(torch.floor(mean + 0.5).clamp(0, 255).view(-1, 1, 1, 1), x, f)
            else:
                x = _blend(_grey(x), x, f)
    return x


def decode_batch(items: list[EncodedImage], device: torch.device) -> tuple[torch.Tensor, list]:
    """The device's half of ``decode=device``: decode, orient, crop, resize, flip and jitter
    ``items`` on ``device``. Returns (images (B', 3, S, S) float32 in [0, 1] on the 1/255 grid
    of uint8 images, kept: one bool per item, False for an image that did not decode (skipped,
    as the CPU path skips it; with the spec's ``on_error="raise"``, a ``DataError`` naming it
    instead)). B' may be 0 (then the images have shape (0,), as :func:`~.collate.collate_skip`
    gives)."""
    device = torch.device(device)
    jpegs = [k for k, item in enumerate(items) if item.encoded]
    decoded: list = [None] * len(items)
    for k, x in zip(jpegs, _decode_jpegs([items[k].data for k in jpegs], device)):
        decoded[k] = x
    kept, views, means = [], [], []
    spec = items[0].spec if items else None
    # one pass per image, as each has its own size: a few kernels each (slicing is free); the
    # flip and the jitter then run on the whole batch
    for item, x in zip(items, decoded):
        if x is None:
            x = torch.from_numpy(item.data).to(device)
        elif isinstance(x, Exception):
            skip_or_raise(undecodable(item.what, x), spec.on_error)
            kept.append(False)
            continue
        else:
            x = _upright(x, item.orientation)
        if tuple(x.shape[1:]) != tuple(item.size):  # a header that lied about the size
            e = ValueError(f"decoded {tuple(x.shape[1:])}, header said {tuple(item.size)}")
            skip_or_raise(undecodable(item.what, e), spec.on_error)
            kept.append(False)
            continue
        kept.append(True)
        top, left, h, w = item.crop
        if item.flip and spec.jitter_first:  # the crop was drawn on the flipped image
            left = x.shape[-1] - left - w
        if spec.jitter_first:  # the contrast's mean grey is the whole image's
            means.append(_grey(x.float()).mean())
        view = x[None, :, top : top + h, left : left + w].float()  # only the crop in float
        side = (spec.img_size, spec.img_size)
        views.append(
            F.interpolate(view, side, mode=spec.interpolation, align_corners=False, antialias=True)
        )
    if not views:
        return torch.empty(0, device=device), kept
    x = torch.cat(views).clamp_(0, 255).round_()
    live = [item for item, k in zip(items, kept) if k]
    flips = torch.tensor([item.flip for item in live], device=device)
    x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    if spec.jitter_first:
        order = torch.tensor([item.order for item in live], device=device)
        factors = torch.tensor([item.factors for item in live], device=device)
        x = _jitter(x, order, factors, torch.stack(means))
    return x.div_(255), kept


def check_device_interpolation(interpolation: str) -> None:
    """``ConfigError`` for a crop interpolation the device resize does not have."""
    if interpolation not in DEVICE_INTERPOLATIONS:
        raise ConfigError(
            f"crop_interpolation={interpolation!r} with decode=device: the device resize has "
            f"{' or '.join(DEVICE_INTERPOLATIONS)}; choose one, or decode=cpu"
        )


def check_device_source(kind: str) -> None:
    """``ConfigError`` unless data of ``kind`` (:func:`~.sources.source_kind`) has files for
    ``decode=device`` to read."""
    if kind not in ("images", "shards"):
        raise ConfigError(
            f"decode=device reads image files: give a folder of images or of shards "
            f"(tokenmorph data shards); {kind} is decoded in memory, use decode=cpu"
        )
