"""What every frozen-feature evaluation shares: the data sets, feature extraction, scoring, the
report.

* :class:`EvalData`: which labelled data to evaluate on (``fashion-mnist``, or ImageFolder
  train/val trees, optional seeded subsets); :func:`build_eval_datasets` turns it into data sets.
* :func:`extract_features`: one pass of a frozen backbone over a data set ->
  ``Features(features (N, D) float32, labels (N,) int64, num_skipped)``, into preallocated CPU
  tensors.
* :func:`extract_eval_features`: backbone + both splits' features + a record of what was
  evaluated.
* :func:`emit_report`: a small table, then the result as ONE JSON object on the last line of
  stdout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import (
    IMAGE_EXTENSIONS,
    DataError,
    FashionMNIST,
    ImageFiles,
    build_dataset,
    collate_skip,
    default_crop_pct,
    eval_transform,
    open_rgb,
    seeded_subset,
)
from ..data.shards import TarShards, is_shard_folder
from ..hub.backbone import Backbone, load_backbone
from ..runtime.distributed import resolve_device
from ..runtime.progress import Progress
from ..runtime.run_logger import dump_json

__all__ = [
    "Features",
    "EvalData",
    "extract_features",
    "build_eval_datasets",
    "extract_eval_features",
    "resolve_amp",
    "emit_report",
    "topk_correct",
]


class Features(NamedTuple):
    """Frozen features of a data set: ``features`` (N, D) float32 and ``labels`` (N,) int64 on
           the
    CPU, in data set order; ``num_skipped`` undecodable images left out (N = len(dataset) -
    num_skipped)."""

    features: torch.Tensor
    labels: torch.Tensor
    num_skipped: int


def resolve_amp(amp: bool | None, device) -> bool:
    """``None`` -> bf16 autocast on CUDA only (on a CPU it was measured no faster than fp32 for
       ViT
    features, and only costs precision)."""
    return torch.device(device).type == "cuda" if amp is None else bool(amp)


def extract_features(
    backbone: Backbone,
    dataset: Dataset,
    batch_size: int = 256,
    pool: str = "cls",
    num_workers: int = 0,
    device=None,
    amp: bool | None = None,
    progress: bool = True,
    desc: str = "features",
) -> Features:
    """Run a frozen backbone over ``dataset`` once, in order.

    Args:
        backbone: a :class:`~tokenmorph.backbone.Backbone` (its model is put in eval mode).
        dataset: items ``(image (3, S, S) float in [0, 1], label)`` or ``None`` for an
            undecodable file (dropped and counted, via ``tokenmorph.data.collate_skip``).
        batch_size, num_workers: the ``DataLoader``'s.
        pool: ``"cls"`` or ``"mean"`` (see ``Backbone.features``).
        device: where the backbone runs (default: where its parameters are).
        amp: bf16 autocast; ``None`` = on CUDA only (see :func:`resolve_amp`).
        progress: report it (images/s and ETA): a bar on a terminal, plain lines in a log
            (:class:`tokenmorph.runtime.progress.Progress`).

    Returns:
        ``Features``: (N, D) float32 features and (N,) int64 labels on the CPU. Memory is bounded
        by the output itself: it is allocated once and filled batch by batch.
    """
    if device is None:
        device = next(backbone.model.parameters()).device
    device = torch.device(device)
    backbone.model.eval()
    total = len(dataset)
    feats = torch.empty(total, backbone.embed_dim, dtype=torch.float32)
    labels = torch.empty(total, dtype=torch.long)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip,
        pin_memory=device.type == "cuda",
    )
    filled = skipped = 0
    with (
        Progress(total, desc, "img", enabled=progress) as bar,
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_amp(amp, device)),
    ):
        for images, targets, n_skipped in loader:
            skipped += n_skipped
            n = len(targets)
            if n:
                out = backbone.features(images.to(device, non_blocking=True), pool)
                feats[filled : filled + n] = out.float().cpu()
                labels[filled : filled + n] = targets
                filled += n
            bar.update(n + n_skipped, skipped=skipped)
    # Views of the first rows: the skipped images' unused rows are left behind, never copied.
    return Features(feats[:filled], labels[:filled], skipped)


# ------------------------------------------------------------------------------------------ data
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
    if isinstance(dataset, TarShards):  # no transform yet: items are PIL images (None: skipped)
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
    """The labelled data set of ``--train``/``--val``/``--dataset`` ``root``: a shard folder's
    split (``train``, or its evaluation split), or an ImageFolder tree."""
    path = Path(root).expanduser()
    if is_shard_folder(path):
        ds = build_dataset(str(path), train=train)
        if min(ds.targets, default=-1) < 0:
            raise DataError(
                f"{flag} {root}: its {ds.split} split has unlabelled samples; evaluation needs "
                "shards written from an ImageFolder tree or Fashion-MNIST"
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
    if args.dataset and is_shard_folder(Path(args.dataset).expanduser()):
        train_ds, val_ds = (_labelled("--dataset", args.dataset, t) for t in (True, False))
    elif args.dataset:
        name, _, folder = args.dataset.partition(":")
        if name.strip().lower() != "fashion-mnist":
            raise DataError(
                f"--dataset {args.dataset!r}: only fashion-mnist[:DIR] and shard folders "
                "(tokenmorph "
                "data shards) are data sets; for other data pass --train DIR --val DIR "
                "(ImageFolder trees)"
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


def extract_eval_features(
    checkpoint: str,
    data: EvalData,
    *,
    pool: str = "cls",
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    random_init: bool = False,
    img_size: int | None = None,
) -> tuple[Features, Features, dict]:
    """Load the backbone ``checkpoint`` (see :func:`tokenmorph.hub.backbone.load_backbone`),
       extract
    the train and val features of ``data`` once.

    ``precision``: ``auto`` (bf16 autocast on CUDA, fp32 on a CPU), ``bf16`` or ``fp32``.
    ``random_init`` and ``img_size`` apply to ``timm:NAME`` backbones.

    Returns ``(train, val, info)``: the two :class:`Features` (on the CPU) and a JSON-ready
    record (backbone, num_train, num_val, num_classes, feature_dim, pool, skipped images, device,
    precision, and ``extract_seconds``: loading the backbone and data included).
    """
    device = resolve_device(device)
    start = time.perf_counter()
    backbone = load_backbone(checkpoint, device, random_init=random_init, img_size=img_size)
    train_ds, val_ds, num_classes = build_eval_datasets(data, backbone.img_size)
    amp = {"auto": None, "bf16": True, "fp32": False}[precision]
    common = dict(
        batch_size=batch_size,
        pool=pool,
        num_workers=num_workers,
        device=device,
        amp=amp,
        progress=progress,
    )
    train = extract_features(backbone, train_ds, desc="train features", **common)
    val = extract_features(backbone, val_ds, desc="val features", **common)
    for split, f in (("train", train), ("val", val)):
        if len(f.labels) == 0:
            raise DataError(f"no {split} image could be decoded ({f.num_skipped} skipped)")
    info = {
        "backbone": backbone.name,
        "num_train": len(train.labels),
        "num_val": len(val.labels),
        "num_classes": num_classes,
        "feature_dim": backbone.embed_dim,
        "pool": pool,
        "skipped_images": train.num_skipped + val.num_skipped,
        "device": str(device),
        "precision": "bf16" if resolve_amp(amp, device) else "fp32",
        "extract_seconds": round(time.perf_counter() - start, 3),
    }
    return train, val, info


# ----------------------------------------------------------------------------------------
# scoring
def topk_correct(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 hits of class scores ``(..., B, C)`` against ``labels`` (B,): two bool
    tensors ``(..., B)``. Equal scores rank by class index (e.g. the classes no k-NN neighbour
    voted for); with fewer than 5 classes, top-5 is top-C (always a hit)."""
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :5]
    hits = top == labels.unsqueeze(-1)
    return hits[..., 0], hits.any(dim=-1)


def emit_report(
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence],
    result: dict,
    out: str | None = None,
) -> None:
    """Print ``title``, a table (``header`` + ``rows``), then ``result`` as one JSON object on
       the
    LAST line of stdout; with ``out``, also write that JSON to the file (parent folders created)."""
    print(title)
    cells = [[str(c) for c in header]] + [
        [f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    text = dump_json(result)
    if out:
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text, flush=True)
