"""Labelled image data for evaluation: ``fashion-mnist`` (its train and test splits) or
ImageFolder train/val trees, through the evaluation view, with seeded subsets. Shared by the
frozen-feature evaluations (:mod:`tokenmorph.eval.features`) and the k-NN monitor of
pre-training (:mod:`tokenmorph.runtime.monitor`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .collate import seeded_subset
from .fashion_mnist import FashionMNIST
from .folders import IMAGE_EXTENSIONS, ImageFiles
from .images import open_rgb
from .shards import is_shard_folder
from .sources import build_dataset
from .transforms import default_crop_pct, eval_transform

__all__ = ["EvalData", "build_eval_datasets"]


@dataclass
class EvalData:
    """Labelled evaluation data: ``dataset`` (``fashion-mnist[:DIR]``: its train split is the
           train
    set, its test split the val set) or ``train`` and ``val`` (ImageFolder trees with the same
    class sub-folders); the evaluation view's ``crop_pct`` (default: 0.875, or 1.0 for tiny
    images); seeded subsets of ``limit_train`` / ``limit_val`` images (``seed``, and ``seed + 1``
    for val)."""

    dataset: str | None = None
    train: str | None = None
    val: str | None = None
    crop_pct: float | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    seed: int = 0


def _short_side(dataset: Dataset, tries: int = 100) -> int:
    """Short side of a data set's images: Fashion-MNIST's array shape, or that of the first of
    its files that decodes (undecodable ones are skipped, as the extraction skips them)."""
    if isinstance(dataset, FashionMNIST):
        return min(dataset.data.shape[1:])
    if not isinstance(dataset, ImageFiles):  # shards, hfds: items are PIL images (None: skipped)
        items = (dataset[i] for i in range(min(tries, len(dataset))))
        sides = (min(item[0].size) for item in items if item is not None)
        side = next(sides, None)
        if side is None:
            raise DataError(f"none of the first {tries} samples of {dataset.root} decodes")
        return side
    for path in dataset.files[:tries]:
        try:
            return min(open_rgb(path).size)
        except DataError:
            continue
    raise DataError(
        f"none of the first {min(tries, len(dataset.files))} images under {dataset.root} "
        "decodes; check the evaluation data"
    )


def _is_source(spec: str) -> bool:
    """Whether ``spec`` names a source with a prefix (``wds:``, ``hfds:``) that holds splits."""
    return spec.partition(":")[0].strip().lower() in ("wds", "hfds", "hfids") and ":" in spec


def _check_labelled_tree(flag: str, root: Path) -> None:
    """``DataError`` unless ``root`` is an ImageFolder tree: images in class sub-folders, none at
    the top."""
    if not root.is_dir():
        raise DataError(f"{flag} {root} {'is not a folder' if root.exists() else 'does not exist'}")
    flat = [
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if flat:
        raise DataError(
            f"{flag} {root} has no labels: it holds images directly (e.g. {flat[0].name}); "
            "evaluation "
            f"needs an ImageFolder tree {root}/CLASS/IMAGE, one sub-folder per class"
        )


def _labelled(flag: str, root: str, train: bool):
    """The labelled data set of ``--train``/``--val``/``--dataset`` ``root``: a shard folder's,
    ``wds:`` shards' or ``hfds:`` data set's split (``train``, or its evaluation split), or an
    ImageFolder tree."""
    path = Path(root).expanduser()
    if _is_source(root) or is_shard_folder(path):
        ds = build_dataset(root if _is_source(root) else str(path), train=train)
        if min(ds.targets, default=-1) < 0:
            raise DataError(
                f"{flag} {root}: its {ds.split} split has unlabelled samples; evaluation needs "
                "labelled data (shards written from an ImageFolder tree or Fashion-MNIST, a "
                "label column)"
            )
        return ds
    _check_labelled_tree(flag, path)
    return ImageFiles(path, labels="folders")


def build_eval_datasets(args: EvalData, img_size: int) -> tuple[Dataset, Dataset, int]:
    """``(train_ds, val_ds, num_classes)`` of :class:`EvalData`, items ``(image (3, img_size,
    img_size) in [0, 1], label)`` through ``tokenmorph.data.eval_transform``.

    ``--dataset fashion-mnist[:DIR]``: train and test splits of ``FashionMNIST``; ``--dataset
    SHARDS``: a shard folder's train and evaluation splits. ``--train DIR --val DIR``:
    ImageFolder trees (labels from the class sub-folders) or shard folders (the train split of
    ``--train``, the evaluation split of ``--val``). ``--crop-pct`` defaults to 0.875, or 1.0
    when the images are tiny (short side <= ``TINY_IMAGE_SIDE``). Raises ``DataError`` for
    missing or conflicting flags, folders without class sub-folders, fewer than 2 classes, or
    train/val class lists that differ.
    """
    if args.dataset and (args.train or args.val):
        raise DataError("give either --dataset or --train DIR --val DIR, not both")
    if args.dataset and (
        _is_source(args.dataset) or is_shard_folder(Path(args.dataset).expanduser())
    ):
        train_ds, val_ds = (_labelled("--dataset", args.dataset, t) for t in (True, False))
    elif args.dataset:
        name, _, folder = args.dataset.partition(":")
        if name.strip().lower() != "fashion-mnist":
            raise DataError(
                f"--dataset {args.dataset!r}: only fashion-mnist[:DIR], shard folders "
                "(tokenmorph data shards), wds:SHARDS and hfds:PATH hold both splits; for "
                "other data pass --train DIR --val DIR (ImageFolder trees)"
            )
        train_ds, val_ds = (FashionMNIST(folder or None, train=split) for split in (True, False))
    elif args.train and args.val:
        train_ds = _labelled("--train", args.train, True)
        val_ds = _labelled("--val", args.val, False)
        if train_ds.classes != val_ds.classes:
            only_train = sorted(set(train_ds.classes) - set(val_ds.classes))
            only_val = sorted(set(val_ds.classes) - set(train_ds.classes))
            raise DataError(
                f"--train and --val class folders differ: only in --train {only_train[:5]}, only "
                "in "
                f"--val {only_val[:5]}; both need the same class sub-folders"
            )
        if len(train_ds.classes) < 2:
            raise DataError(
                f"--train {args.train} has 1 class ({train_ds.classes[0]}); classification needs "
                "at "
                f"least 2 class sub-folders"
            )
    else:
        raise DataError(
            "no evaluation data: pass --dataset fashion-mnist, or both --train DIR and --val DIR"
        )
    crop_pct = args.crop_pct
    if crop_pct is None:
        crop_pct = default_crop_pct(_short_side(train_ds))
    try:
        train_ds.transform = val_ds.transform = eval_transform(img_size, crop_pct)
    except ValueError as e:
        raise DataError(f"--crop-pct: {e}") from None
    return (
        seeded_subset(train_ds, args.limit_train, torch.Generator().manual_seed(args.seed)),
        seeded_subset(val_ds, args.limit_val, torch.Generator().manual_seed(args.seed + 1)),
        len(train_ds.classes),
    )
