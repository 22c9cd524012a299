"""Fashion-MNIST, read straight from its four idx(.gz) files with numpy (60k/10k 28x28 grey
   images
of 10 clothing classes). The Debian package ``dataset-fashion-mnist`` installs them;
torchvision's download is the fallback for machines with internet."""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = [
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_CLASSES",
    "CACHE_DIR",
    "read_idx",
    "find_fashion_mnist",
    "FashionMNIST",
]

PathLike = Union[str, os.PathLike]

# Where downloads go (torchvision layout below it: FashionMNIST/raw/).
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenmorph"
FASHION_MNIST_DIRS: tuple[str, ...] = (
    "/usr/share/datasets/fashion-mnist",
    str(CACHE_DIR / "FashionMNIST" / "raw"),
)
FASHION_MNIST_FILES = {  # split -> (images, labels), without the optional .gz
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: PathLike) -> np.ndarray:
    """An idx file of unsigned bytes (``.gz`` or not) -> uint8 array of the shape its header
    gives."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(
            f"cannot read {path}: {e}; re-install dataset-fashion-mnist or replace the file"
        ) from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(
            f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()}); replace the file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    if len(raw) < header or len(raw) != header + math.prod(dims):
        raise DataError(
            f"{path} is truncated or corrupt ({len(raw)} bytes, header {raw[:header].hex()}); "
            f"replace the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(folder: Path, name: str) -> Path | None:
    """``folder/name``, uncompressed preferred (faster to read), else ``folder/name.gz``; None if
    neither."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_in(folder: Path) -> Path | None:
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


def find_fashion_mnist(root: PathLike | None = None) -> Path:
    """The folder holding the four Fashion-MNIST idx(.gz) files.

    ``root`` may be that folder, or one holding it as ``FashionMNIST/raw`` (torchvision's layout)
    or ``fashion-mnist/``. With ``root=None``: ``$TOKENMORPH_DATA/fashion-mnist``, then
    ``FASHION_MNIST_DIRS``. Raises ``DataError`` saying how to get the data when it is not there.
    """
    folders = [Path(root).expanduser()] if root is not None else _fashion_mnist_search_dirs()
    for folder in folders:
        found = _fashion_mnist_in(folder)
        if found is not None:
            return found
    where = ", ".join(str(f) for f in folders)
    raise DataError(
        f"Fashion-MNIST not found in {where} (need train/t10k images-idx3-ubyte and "
        "labels-idx1-ubyte, .gz or not); "
        "get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), pass --data / root= "
        "a folder holding "
        f"the idx files, or allow download (download=True, needs internet)"
    )


def _download_fashion_mnist(dest: Path) -> Path:
    """torchvision's download into ``dest/FashionMNIST/raw``; the folder holding the idx files."""
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    try:
        TorchvisionFashionMNIST(root=str(dest), train=True, download=True)
    except Exception as e:  # network and archive failures come as many types; all mean "no data"
        raise DataError(
            f"downloading Fashion-MNIST into {dest} failed ({type(e).__name__}: {e}); "
            f"install it with `apt-get install dataset-fashion-mnist` or pass --data DIR"
        ) from e
    return find_fashion_mnist(dest)


class FashionMNIST(Dataset):
    """Fashion-MNIST, 60000 train / 10000 test 28x28 grey images of 10 clothing classes.

    ``ds[i]`` -> ``(PIL.Image mode "L" 28x28, int label)``, or ``(transform(image), label)``.
    Attributes: ``data`` (N, 28, 28) uint8 tensor, ``targets`` (N,) int64 tensor, ``classes`` (10
    names), ``folder`` (where the idx files were read).

    The idx files are read with numpy (about 0.3 s for the train split). If they are not found
    (see ``find_fashion_mnist``) and ``download=True``, torchvision downloads them into ``root``
    or, when ``root`` is None, into ``CACHE_DIR``.
    """

    def __init__(
        self,
        root: PathLike | None = None,
        train: bool = True,
        transform: Callable | None = None,
        download: bool = False,
    ):
        try:
            self.folder = find_fashion_mnist(root)
        except DataError:
            if not download:
                raise
            self.folder = _download_fashion_mnist(
                Path(root).expanduser() if root is not None else CACHE_DIR
            )
        self.classes = list(FASHION_MNIST_CLASSES)
        image_file, label_file = (
            _idx_file(self.folder, n) for n in FASHION_MNIST_FILES[bool(train)]
        )
        images, labels = read_idx(image_file), read_idx(label_file)
        if (
            images.ndim != 3
            or labels.shape != images.shape[:1]
            or labels.max(initial=0) >= len(self.classes)
        ):
            raise DataError(
                f"{image_file} ({images.shape}) and {label_file} ({labels.shape}, max "
                f"{labels.max(initial=0)}) do not form a Fashion-MNIST split; replace the files"
            )
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
