"""Data sets by name or path (``fashion-mnist[:DIR]``, a folder of images, a folder of
WebDataset shards read by index, ``wds:`` shards read as a stream, ``hfds:`` a local Hugging Face
data set) and their normalisation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from ..errors import DataError
from .fashion_mnist import FashionMNIST, _fashion_mnist_in
from .folders import ImageFiles
from .shards import TarShards, is_shard_folder, shard_split
from .stream import ShardStream

__all__ = ["DATASET_STATS", "build_dataset", "data_folder", "dataset_stats", "source_kind"]

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

# Per-channel (mean, std) of [0, 1] RGB pixels.
DATASET_STATS: dict[str, Stats] = {
    "imagenet": (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
    # Computed once over all 60000 x 784 pixels of the train split (idx values / 255, population
    # std, float64) from the Debian package's train-images-idx3-ubyte.gz: mean 0.2860406, std
    # 0.3530242; grey, so x3.
    "fashion-mnist": ((0.2860406,) * 3, (0.3530242,) * 3),
}


def _parse_source(source: str) -> tuple[str, Path | None]:
    """("fashion-mnist", DIR or None) for "fashion-mnist[:DIR]" or a folder holding the idx
       files;
    ("images", folder) otherwise."""
    name, sep, rest = source.partition(":")
    if name.strip().lower() in ("wds", "hfds", "hfids") and sep:
        return name.strip().lower(), Path(rest).expanduser()
    if name.strip().lower() == "fashion-mnist":
        return "fashion-mnist", Path(rest).expanduser() if sep and rest else None
    path = Path(source).expanduser()
    if path.is_dir() and _fashion_mnist_in(path) is not None:
        return "fashion-mnist", path
    if is_shard_folder(path):
        return "shards", path
    return "images", path


def source_kind(source: str) -> str:
    """What a data source string names: ``"fashion-mnist"``, ``"shards"`` or ``"images"``."""
    return _parse_source(source)[0]


def build_dataset(
    source: str,
    train: bool = True,
    transform: Callable | None = None,
    on_error: str = "skip",
    labels: str = "auto",
    download: bool = False,
    exclude: tuple = (),
    stream: bool = False,
) -> Dataset:
    """A data set by name or path.

    ``"fashion-mnist"`` or ``"fashion-mnist:DIR"`` (or a folder holding the idx files) ->
    ``FashionMNIST`` (``train`` picks the split, ``download`` allows torchvision's download); any
    other string is a folder of images -> ``ImageFiles`` (``train`` is ignored: a folder has no
    split; ``exclude`` names folders left out of its scan, e.g. a run folder inside it). A folder
    of WebDataset shards (``tokenmorph data shards``: its ``_info.json``) -> ``TarShards`` of its
    ``train`` split (``train=False``: ``validation``, ``val`` or ``test``, the first it has).
    ``"wds:DIR_OR_PATTERN"`` -> with ``stream`` (pre-training) a :class:`~.stream.ShardStream`
    (WebDataset shards read as a stream, in a seeded order of whole shards; not indexable: the
    run's loader reads it), without (evaluation, fine-tuning) the same shards by index;
    ``"hfds:PATH"`` -> :class:`~.hf.HFImages` (a local Hugging Face data set, random access);
    ``"hfids:PATH"`` -> with ``stream`` :class:`~.hf.HFStream` (the same read as a
    ``datasets.IterableDataset``), without it by index. Raises ``DataError`` for a missing path
    or a folder without images.
    """
    kind, path = _parse_source(source)
    if kind == "wds":
        shards = ShardStream(source.partition(":")[2], train, transform, on_error)
        return shards if stream else shards.indexed(labels)
    if kind in ("hfds", "hfids"):
        from .hf import HFImages, HFStream  # imports datasets: only for these sources

        if kind == "hfids" and stream:
            return HFStream(path, train, transform, on_error)
        return HFImages(path, train, transform, on_error, labels)
    if kind == "fashion-mnist":
        return FashionMNIST(path, train=train, transform=transform, download=download)
    if kind == "shards":
        split = shard_split(path, train)
        return TarShards(path, split, transform=transform, on_error=on_error, labels=labels)
    if not path.exists():
        raise DataError(
            f"data source {source!r} is neither 'fashion-mnist[:DIR]' nor an existing folder; "
            f"pass one of those"
        )
    return ImageFiles(path, transform=transform, on_error=on_error, labels=labels, exclude=exclude)


def data_folder(source: str) -> Path | None:
    """The folder of images a data source names, or None (Fashion-MNIST, a missing path)."""
    kind, path = _parse_source(source)
    return path if kind == "images" and path.is_dir() else None


def dataset_stats(source: str) -> Stats:
    """Normalisation (mean, std) per RGB channel for a data source: Fashion-MNIST's own for
    "fashion-mnist[:DIR]" (or a folder holding its idx files), ImageNet's for everything else."""
    return DATASET_STATS[
        "fashion-mnist" if _parse_source(source)[0] == "fashion-mnist" else "imagenet"
    ]
