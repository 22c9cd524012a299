"""Decoding image files and the sample photos that ship with scikit-image.

* :func:`open_rgb`: any image file -> 8-bit RGB PIL image, or a ``DataError`` naming the file.
* :func:`load_image`: a file, ``skimage:NAME`` or ``fashion-mnist:N`` -> (3, S, S) tensor in [0,
  1].
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ON_ERROR",
    "check_on_error",
    "SAMPLE_PHOTOS",
    "open_rgb",
    "decode_rgb",
    "read_file",
    "probe_jpeg",
    "undecodable",
    "skip_or_raise",
    "to_rgb",
    "to_square_tensor",
    "sample_photo",
    "load_image",
]

PathLike = Union[str, os.PathLike]

# Legit photos up to 16000 x 16000 load (PIL's default bound is 89 M pixels); anything larger, a
# decompression bomb or a panorama costing gigabytes per worker, is rejected. PIL only warns
# between its bound and twice it, so open_rgb checks this bound itself.
MAX_IMAGE_PIXELS = 16000 * 16000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# Colour photos that ship inside scikit-image (no download needed).
SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
)


def _rescale_to_uint8(a: np.ndarray) -> np.ndarray:
    """32-bit integer ("I") or float ("F") grey values -> uint8, keeping their meaning: floats in
    [0, 1] and values in 16-bit range are scaled (PIL's own convert clips everything above 255 to
    white), values in [0, 255] are kept, anything else is stretched from its min..max to 0..255."""
    is_float = a.dtype.kind == "f"
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1 and is_float:
        a = a * 255.0
    elif lo >= 0 and 255 < hi <= 65535:
        a = a / 257.0
    elif lo < 0 or hi > 65535:
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit "RGB" (alpha dropped, palette expanded, CMYK converted, 16-bit
    scaled)."""
    if im.mode.startswith("I;16"):
        return Image.fromarray(
            np.rint(np.asarray(im, dtype=np.float64) / 257.0).astype(np.uint8)
        ).convert("RGB")
    if im.mode in ("I", "F"):
        return Image.fromarray(_rescale_to_uint8(np.asarray(im))).convert("RGB")
    if im.mode in ("P", "PA"):  # via RGBA: palette transparency otherwise triggers a PIL warning
        im = im.convert("RGBA")
    return im.convert("RGB")


_ORIENTATION = 0x0112  # the EXIF Orientation tag


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says; unchanged when the EXIF data is unreadable (a
    broken tag does not make the pixels undecodable)."""
    try:
        if im.getexif().get(_ORIENTATION, 1) in range(2, 9):  # 1 (upright) needs no copy
            return ImageOps.exif_transpose(im)
    except Exception:  # PIL raises assorted types for malformed EXIF blocks
        pass
    return im


ON_ERROR = ("skip", "raise")  # what a data set does with a sample that does not decode


def check_on_error(value: str, name: str = "on_error") -> None:
    """``ValueError`` naming ``name`` unless ``value`` is one of :data:`ON_ERROR`."""
    if value not in ON_ERROR:
        raise ValueError(f"{name}={value!r}: use 'skip' or 'raise'")


def _decode(source, what) -> Image.Image:
    """Fully decode ``source`` (a path or a binary file object) to 8-bit upright RGB;
    ``DataError`` naming ``what`` for anything that does not decode."""
    try:
        with warnings.catch_warnings():  # PIL only warns below twice its bound: refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
        with im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} = {im.width * im.height} pixels is over the limit of "
                    f"{MAX_IMAGE_PIXELS}"
                )
            im.load()  # decode now, so truncated files fail here and not inside a transform
            return to_rgb(_upright(im))
    except (
        Exception
    ) as e:  # PIL's decoders raise many types (OSError, SyntaxError, ValueError, struct.error...)
        raise undecodable(what, e) from e


def undecodable(what, e: BaseException) -> DataError:
    """The ``DataError`` of an image that does not decode, naming it and the reason."""
    return DataError(f"cannot decode image {what}: {type(e).__name__}: {e}")


# the fix named where a data set stops on a bad sample (not where it skips one)
SKIP_HINT = (
    "fix or delete the file, or skip bad files (on_bad_image=skip; on_error='skip' in the API)"
)


def skip_or_raise(e: BaseException, on_error: str) -> None:
    """A bad sample under ``on_error``: ``"skip"`` logs ``skipping <reason>`` (the caller then
    drops it), ``"raise"`` raises one ``DataError`` with the reason and :data:`SKIP_HINT`."""
    if on_error == "raise":
        raise DataError(f"{e}; {SKIP_HINT}") from None
    log.warning("skipping %s", e)


def _check_regular(path: PathLike) -> None:
    """``DataError`` unless ``path`` is a regular file (a FIFO would block ``open``)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError(f"{path} is not a regular file (a FIFO, socket, device or folder)")
    except OSError as e:
        raise undecodable(path, e) from e


def read_file(path: PathLike) -> bytes:
    """The bytes of an image file (not decoded); ``DataError`` as :func:`open_rgb` for a
    missing, unreadable or irregular file."""
    _check_regular(path)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise undecodable(path, e) from e


def probe_jpeg(data: bytes, what) -> tuple[int, int, int] | None:
    """(height, width, EXIF orientation) of a JPEG file's bytes, the size as the image stands
    upright (orientations 5 to 8 swap the sides), read from its header without decoding it:
    for the JPEGs ``torchvision.io.decode_jpeg`` decodes as PIL does (grey, YCbCr/RGB). None for
    any other format or a CMYK JPEG (PIL decodes those). ``DataError`` naming ``what`` when the
    header does not parse or the image has more than ``MAX_IMAGE_PIXELS`` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # lazy: the header only
        with im:
            if im.format != "JPEG" or im.mode not in ("L", "RGB"):
                return None
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{w}x{h} = {w * h} pixels is over the limit of {MAX_IMAGE_PIXELS}"
                )
            try:
                orientation = int(im.getexif().get(_ORIENTATION, 1))
            except Exception:  # a broken EXIF block: upright, as _upright reads it
                orientation = 1
    except Exception as e:
        raise undecodable(what, e) from e
    orientation = orientation if orientation in range(1, 9) else 1
    return (w, h, orientation) if orientation >= 5 else (h, w, orientation)


def open_rgb(path: PathLike) -> Image.Image:
    """Open, fully decode and convert an image file to 8-bit RGB.

    The EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): a phone photo stored
    sideways with orientation 6 loads upright, as viewers show it.

    Raises ``DataError`` naming the file and the underlying error for anything that does not
    decode (missing, not a regular file, zero-byte, truncated, not an image, more than
    ``MAX_IMAGE_PIXELS`` pixels). Only regular files are opened: a FIFO would block ``open``.
    """
    _check_regular(path)
    return _decode(path, path)


def decode_rgb(data: bytes, what: str) -> Image.Image:
    """:func:`open_rgb` for the bytes of an image file (a member of a tar shard); ``what`` names
    it in the ``DataError``."""
    return _decode(io.BytesIO(data), what)


def to_square_tensor(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W[, C]) uint8/float array -> (3, size, size) float in [0, 1]: centre square crop,
       bicubic
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
    x = F.interpolate(
        x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )[0]
    return x.clamp(0, 1)


def sample_photo(name: str, size: int = 224) -> torch.Tensor:
    """A photo from ``skimage.data`` by name, as (3, size, size) in [0, 1]."""
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "scikit-image is needed for the sample photos: pip install 'tokenmorph[viz]'"
        ) from e
    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise ValueError(
            f"unknown skimage.data photo {name!r}; try one of {', '.join(SAMPLE_PHOTOS)}"
        )
    return to_square_tensor(loader(), size)


def load_image(path: str | Path, size: int = 224) -> torch.Tensor:
    """An image file, a ``skimage:NAME`` sample photo or ``fashion-mnist:N`` (image N of the test
    split) as (3, size, size) in [0, 1]; ``DataError`` for anything that cannot be found or
    decoded. Memory stays bounded by the decoded 8-bit image (see :func:`_shrink`)."""
    path = str(path)
    if path.startswith("skimage:"):
        try:
            return sample_photo(path.split(":", 1)[1], size)
        except ValueError as e:
            raise DataError(str(e)) from None
    if path.startswith("fashion-mnist:"):
        from .fashion_mnist import FashionMNIST

        index = path.split(":", 1)[1]
        test = FashionMNIST(train=False)
        if not index.isdigit() or int(index) >= len(test):
            raise DataError(f"{path}: give an index of the test split, 0 to {len(test) - 1}")
        return to_square_tensor(test.data[int(index)].numpy(), size)
    if not Path(path).exists():
        raise DataError(f"image not found: {path}")
    return to_square_tensor(np.array(_shrink(open_rgb(path), size)), size)  # writable for torch


def _shrink(im: Image.Image, size: int) -> Image.Image:
    """A huge picture box-reduced (in 8 bits, by an integer factor) to a short side between 2 and
    4 x ``size`` before the float resize: a 16000 x 16000 image would otherwise take gigabytes as
    floats. Images with a short side below 4 x ``size`` are returned as they are."""
    factor = min(im.size) // (2 * size)
    return im.reduce(factor) if factor >= 2 else im
