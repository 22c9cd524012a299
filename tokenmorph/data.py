"""Data sets and augmentations for pre-training: Fashion-MNIST (offline), folders of images, DTM transforms.

* ``FashionMNIST``: the 60k/10k 28x28 grey images, read straight from the four idx(.gz) files with
  numpy (the Debian package ``dataset-fashion-mnist`` installs them; torchvision's download is the
  fallback for machines with internet).
* ``ImageFiles``: every image under a folder, recursively; labels from first-level sub-folders
  (ImageFolder semantics) when the folder looks like an ImageFolder tree. Undecodable files are skipped
  (``None`` items, dropped and counted by ``collate_skip``) or raise ``DataError``.
* ``pretrain_transform`` / ``eval_transform``: PIL image -> (3, S, S) float in [0, 1], not normalised
  (each model normalises with its own mean/std, see ``dataset_stats`` and ``DATASET_STATS``).
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import struct
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = [
    "IMAGE_EXTENSIONS", "DATASET_STATS", "FASHION_MNIST_DIRS", "FASHION_MNIST_CLASSES", "MAX_IMAGE_PIXELS",
    "CACHE_DIR", "DataError", "read_idx", "find_fashion_mnist", "FashionMNIST", "open_rgb", "ImageFiles",
    "build_dataset", "dataset_stats", "ToRGB", "pretrain_transform", "eval_transform", "collate_skip",
]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Per-channel (mean, std) of [0, 1] RGB pixels.
DATASET_STATS: dict[str, Stats] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # timm's IMAGENET_DEFAULT_MEAN/STD (a test checks)
    # Computed once over all 60000 x 784 pixels of the train split (idx values / 255, population std, float64)
    # from the Debian package's train-images-idx3-ubyte.gz: mean 0.2860406, std 0.3530242; grey, so x3.
    "fashion-mnist": ((0.2860406,) * 3, (0.3530242,) * 3),
}

# Where downloads go (torchvision layout below it: FashionMNIST/raw/).
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenmorph"
FASHION_MNIST_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist", str(CACHE_DIR / "FashionMNIST" / "raw"))
FASHION_MNIST_FILES = {  # split -> (images, labels), without the optional .gz
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# Legit photos up to 16000 x 16000 load (PIL's default bound is 89 M pixels); anything larger, a decompression
# bomb or a panorama costing gigabytes per worker, is rejected. PIL only warns between its bound and twice it,
# so open_rgb checks this bound itself.
MAX_IMAGE_PIXELS = 16000 * 16000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class DataError(ValueError):
    """A user-facing data problem; the message names the path and the fix."""


# ------------------------------------------------------------------------------------ Fashion-MNIST
def read_idx(path: PathLike) -> np.ndarray:
    """An idx file of unsigned bytes (``.gz`` or not) -> uint8 array of the shape its header gives."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; re-install dataset-fashion-mnist or replace the file") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()}); replace the file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    if len(raw) < header or len(raw) != header + math.prod(dims):
        raise DataError(f"{path} is truncated or corrupt ({len(raw)} bytes, header {raw[:header].hex()}); "
                        f"replace the file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, name: str) -> Optional[Path]:
    """``folder/name``, uncompressed preferred (faster to read), else ``folder/name.gz``; None if neither."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_in(folder: Path) -> Optional[Path]:
    """The folder holding all four idx files: ``folder`` itself, its torchvision layout
    (``FashionMNIST/raw``) or ``fashion-mnist/``; None if none of them does."""
    names = FASHION_MNIST_FILES[True] + FASHION_MNIST_FILES[False]
    for candidate in (folder, folder / "FashionMNIST" / "raw", folder / "fashion-mnist"):
        if all(_idx_file(candidate, n) for n in names):
            return candidate
    return None


def _fashion_mnist_search_dirs() -> list[Path]:
    env = os.environ.get("TOKENMORPH_DATA")  # an explicit user setting wins over the system folders
    return ([Path(env) / "fashion-mnist"] if env else []) + [Path(d) for d in FASHION_MNIST_DIRS]


def find_fashion_mnist(root: Optional[PathLike] = None) -> Path:
    """The folder holding the four Fashion-MNIST idx(.gz) files.

    ``root`` may be that folder, or one holding it as ``FashionMNIST/raw`` (torchvision's layout) or
    ``fashion-mnist/``. With ``root=None``: ``$TOKENMORPH_DATA/fashion-mnist``, then ``FASHION_MNIST_DIRS``.
    Raises ``DataError`` saying how to get the data when it is not there.
    """
    folders = [Path(root).expanduser()] if root is not None else _fashion_mnist_search_dirs()
    for folder in folders:
        found = _fashion_mnist_in(folder)
        if found is not None:
            return found
    where = ", ".join(str(f) for f in folders)
    raise DataError(
        f"Fashion-MNIST not found in {where} (need train/t10k images-idx3-ubyte and labels-idx1-ubyte, .gz or not); "
        f"get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), pass --data / root= a folder holding "
        f"the idx files, or allow download (download=True, needs internet)")


def _download_fashion_mnist(dest: Path) -> Path:
    """torchvision's download into ``dest/FashionMNIST/raw``; the folder holding the idx files."""
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    try:
        TorchvisionFashionMNIST(root=str(dest), train=True, download=True)
    except Exception as e:  # network and archive failures come as many types; all mean "no data"
        raise DataError(f"downloading Fashion-MNIST into {dest} failed ({type(e).__name__}: {e}); "
                        f"install it with `apt-get install dataset-fashion-mnist` or pass --data DIR") from e
    return find_fashion_mnist(dest)


class FashionMNIST(Dataset):
    """Fashion-MNIST, 60000 train / 10000 test 28x28 grey images of 10 clothing classes.

    ``ds[i]`` -> ``(PIL.Image mode "L" 28x28, int label)``, or ``(transform(image), label)``.
    Attributes: ``data`` (N, 28, 28) uint8 tensor, ``targets`` (N,) int64 tensor, ``classes`` (10 names),
    ``folder`` (where the idx files were read).

    The idx files are read with numpy (about 0.3 s for the train split). If they are not found (see
    ``find_fashion_mnist``) and ``download=True``, torchvision downloads them into ``root`` or, when
    ``root`` is None, into ``CACHE_DIR``.
    """

    def __init__(self, root: Optional[PathLike] = None, train: bool = True,
                 transform: Optional[Callable] = None, download: bool = False):
        try:
            self.folder = find_fashion_mnist(root)
        except DataError:
            if not download:
                raise
            self.folder = _download_fashion_mnist(Path(root).expanduser() if root is not None else CACHE_DIR)
        self.classes = list(FASHION_MNIST_CLASSES)
        image_file, label_file = (_idx_file(self.folder, n) for n in FASHION_MNIST_FILES[bool(train)])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.shape != images.shape[:1] or labels.max(initial=0) >= len(self.classes):
            raise DataError(f"{image_file} ({images.shape}) and {label_file} ({labels.shape}, max "
                            f"{labels.max(initial=0)}) do not form a Fashion-MNIST split; replace the files")
        self.train = bool(train)
        self.transform = transform
        self.data = torch.from_numpy(images.copy())  # copy: frombuffer arrays are read-only
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index].numpy())  # 2-D uint8 -> mode "L"
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


# --------------------------------------------------------------------------------------- image files
def _rescale_to_uint8(a: np.ndarray) -> np.ndarray:
    """32-bit integer ("I") or float ("F") grey values -> uint8, keeping their meaning: floats in [0, 1]
    and values in 16-bit range are scaled (PIL's own convert clips everything above 255 to white),
    values in [0, 255] are kept, anything else is stretched from its min..max to 0..255."""
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


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit "RGB" (alpha dropped, palette expanded, CMYK converted, 16-bit scaled)."""
    if im.mode.startswith("I;16"):
        return Image.fromarray(np.rint(np.asarray(im, dtype=np.float64) / 257.0).astype(np.uint8)).convert("RGB")
    if im.mode in ("I", "F"):
        return Image.fromarray(_rescale_to_uint8(np.asarray(im))).convert("RGB")
    if im.mode in ("P", "PA"):  # via RGBA: palette transparency otherwise triggers a PIL warning
        im = im.convert("RGBA")
    return im.convert("RGB")


def open_rgb(path: PathLike) -> Image.Image:
    """Open, fully decode and convert an image file to 8-bit RGB.

    Raises ``DataError`` naming the file and the underlying error for anything that does not decode
    (missing, zero-byte, truncated, not an image, more than ``MAX_IMAGE_PIXELS`` pixels).
    """
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} = {im.width * im.height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
            im.load()  # decode now, so truncated files fail here and not inside a transform
            return _to_rgb(im)
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, ValueError, struct.error...)
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}; "
                        f"fix or delete the file, or use on_error='skip'") from e


def _image_files(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, following symbolic links but entering every real folder
    once (no loops, no duplicates); hidden files and folders (".name", e.g. macOS "._x.jpg") are skipped.
    Order: ImageFolder's (by first-level folder, then folder path, then file name)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]

    def order(path: Path):
        rel = path.relative_to(root)
        return (rel.parts[0] if len(rel.parts) > 1 else "", rel.parent.as_posix(), rel.name)

    return sorted(found, key=order)


class ImageFiles(Dataset):
    """Every image under a folder, searched recursively (flat folders need no class sub-folders), or an
    ImageFolder tree (``root/CLASS/**/image``).

    ``labels``: ``"none"`` (every label -1), ``"folders"`` (class = first-level sub-folder, classes sorted
    by name; sub-folders without images are not classes), ``"auto"`` (``"folders"`` when ``root`` holds
    sub-folders and no image directly, else ``"none"``).

    ``ds[i]`` -> ``(PIL.Image "RGB", label)`` or ``(transform(image), label)``; for a file that does not
    decode, ``None`` (``on_error="skip"``, logged as a warning; ``collate_skip`` drops and counts it) or
    ``DataError`` (``on_error="raise"``).
    Attributes: ``files`` (sorted list of Paths), ``targets`` (list of int), ``classes`` (list of str,
    empty without labels).
    """

    def __init__(self, root: PathLike, transform: Optional[Callable] = None, on_error: str = "skip",
                 labels: str = "auto"):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}: use 'skip' or 'raise'")
        if labels not in ("auto", "none", "folders"):
            raise ValueError(f"labels={labels!r}: use 'auto', 'none' or 'folders'")
        root = Path(root).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise DataError(f"image folder {root} {what}; pass a folder of images or 'fashion-mnist'")
        files = _image_files(root)
        if not files:
            raise DataError(f"no images found under {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
        top_level = [f for f in files if f.parent == root]
        if labels == "auto":
            labels = "none" if top_level else "folders"
        if labels == "folders":
            if top_level:
                raise DataError(f"labels='folders' needs every image inside a class sub-folder, but {root} holds "
                                f"{len(top_level)} directly (e.g. {top_level[0].name}); move them or use labels='none'")
            self.classes = sorted({f.relative_to(root).parts[0] for f in files})
            index = {c: i for i, c in enumerate(self.classes)}
            self.targets = [index[f.relative_to(root).parts[0]] for f in files]
        else:
            self.classes, self.targets = [], [-1] * len(files)
        self.root, self.files = root, files
        self.transform, self.on_error = transform, on_error

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            image = open_rgb(path)
        except DataError as e:
            if self.on_error == "raise":
                raise
            log.warning("skipping %s", e)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


# -------------------------------------------------------------------------------------- by source name
def _parse_source(source: str) -> tuple[str, Optional[Path]]:
    """("fashion-mnist", DIR or None) for "fashion-mnist[:DIR]" or a folder holding the idx files;
    ("images", folder) otherwise."""
    name, sep, rest = source.partition(":")
    if name.strip().lower() == "fashion-mnist":
        return "fashion-mnist", Path(rest).expanduser() if sep and rest else None
    path = Path(source).expanduser()
    if path.is_dir() and _fashion_mnist_in(path) is not None:
        return "fashion-mnist", path
    return "images", path


def build_dataset(source: str, train: bool = True, transform: Optional[Callable] = None, on_error: str = "skip",
                  labels: str = "auto", download: bool = False) -> Dataset:
    """A data set by name or path.

    ``"fashion-mnist"`` or ``"fashion-mnist:DIR"`` (or a folder holding the idx files) -> ``FashionMNIST``
    (``train`` picks the split, ``download`` allows torchvision's download); any other string is a folder
    of images -> ``ImageFiles`` (``train`` is ignored: a folder has no split). Raises ``DataError`` for a
    missing path or a folder without images.
    """
    kind, path = _parse_source(source)
    if kind == "fashion-mnist":
        return FashionMNIST(path, train=train, transform=transform, download=download)
    if not path.exists():
        raise DataError(f"data source {source!r} is neither 'fashion-mnist[:DIR]' nor an existing folder; "
                        f"pass one of those")
    return ImageFiles(path, transform=transform, on_error=on_error, labels=labels)


def dataset_stats(source: str) -> Stats:
    """Normalisation (mean, std) per RGB channel for a data source: Fashion-MNIST's own for
    "fashion-mnist[:DIR]" (or a folder holding its idx files), ImageNet's for everything else."""
    return DATASET_STATS["fashion-mnist" if _parse_source(source)[0] == "fashion-mnist" else "imagenet"]


# ----------------------------------------------------------------------------------------- transforms
class ToRGB:
    """PIL image -> "RGB" (so grey data sets give 3 channels). A class, not a lambda, so that data
    loader workers can pickle it."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else _to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


def _interpolation(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name.lower())
    except ValueError:
        modes = ", ".join(m.value for m in T.InterpolationMode)
        raise ValueError(f"interpolation={name!r}: use one of {modes}") from None


def pretrain_transform(img_size: int = 224, scale: tuple[float, float] = (0.08, 1.0), color_jitter: float = 0.4,
                       hflip: bool = True, interpolation: str = "bicubic") -> T.Compose:
    """The DTM release's pre-training augmentation: PIL image -> (3, img_size, img_size) float in [0, 1].

    RandomResizedCrop(img_size, scale, bicubic) -> RandomHorizontalFlip -> ColorJitter(0.4, 0.4, 0.4)
    -> ToTensor; not normalised. ``color_jitter=0`` / ``hflip=False`` leave those steps out. All
    randomness comes from torch's global generator (``torch.manual_seed`` makes it reproducible).
    """
    steps = [ToRGB(), T.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=_interpolation(interpolation))]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if color_jitter:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps.append(T.ToTensor())
    return T.Compose(steps)


TINY_IMAGE_SIDE = 64  # at or below this side an evaluation view is a plain resize (e.g. Fashion-MNIST)
DEFAULT_CROP_PCT = 0.875


def default_crop_pct(side: int) -> float:
    """The evaluation centre-crop fraction for images of ``side`` pixels: 1.0 for tiny images (cropping
    28 px digits or clothes would cut the object), 0.875 otherwise."""
    return 1.0 if side <= TINY_IMAGE_SIDE else DEFAULT_CROP_PCT


def eval_transform(img_size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic") -> T.Compose:
    """Deterministic evaluation view: PIL image -> (3, img_size, img_size) float in [0, 1].

    Resize the short side to int(img_size / crop_pct), CenterCrop(img_size), ToTensor. ``crop_pct=1``
    simply resizes (what 28x28 Fashion-MNIST wants).
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct}: must be in (0, 1], e.g. 0.875 for photos or 1.0 for Fashion-MNIST")
    return T.Compose([ToRGB(), T.Resize(int(img_size / crop_pct), interpolation=_interpolation(interpolation)),
                      T.CenterCrop(img_size), T.ToTensor()])


def collate_skip(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``DataLoader`` collate_fn that drops skipped (``None``) items.

    ``batch``: items ``(image (3, H, W) tensor, label)`` or ``None``. Returns ``(images (B, 3, H, W),
    labels (B,) int64, num_skipped)``; when every item was skipped, ``images`` has shape (0,).
    """
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([int(label) for _, label in kept], dtype=torch.long)
    return images, labels, skipped
