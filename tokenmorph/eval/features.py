"""What every evaluation program shares: the data flags, the data sets, frozen-feature extraction, the report.

* ``extract_features(backbone, dataset)``: one pass of a frozen backbone over a data set ->
  ``Features(features (N, D) float32, labels (N,) int64, num_skipped)``, into preallocated CPU tensors.
* ``add_common_arguments(parser)`` / ``build_eval_datasets(args, img_size)``: ``--checkpoint``, ``--dataset
  fashion-mnist`` or ``--train DIR --val DIR`` (ImageFolder trees), ``--limit-train/--limit-val``, ...
* ``extract_eval_features(args)``: backbone + both splits' features + a record of what was evaluated.
* ``emit_report(title, header, rows, result, out)``: a small table, then the result as ONE JSON object on
  the last line of stdout.

torch is imported inside the functions that need it, so that the program modules' argument parsers (built
for ``tokenmorph --help``) stay light.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

if TYPE_CHECKING:  # annotations only
    import torch
    from torch.utils.data import Dataset

    from ..backbone import Backbone

__all__ = ["Features", "extract_features", "add_common_arguments", "build_eval_datasets", "extract_eval_features",
           "resolve_amp", "positive", "positive_list", "emit_report", "topk_correct"]

# The value of tokenmorph.data.TINY_IMAGE_SIDE (the rule is data.default_crop_pct), repeated here only for
# the --help text, so that building the parser does not import torch.
TINY_IMAGE_SIDE = 64


class Features(NamedTuple):
    """Frozen features of a data set: ``features`` (N, D) float32 and ``labels`` (N,) int64 on the CPU, in
    data set order; ``num_skipped`` undecodable images left out (N = len(dataset) - num_skipped)."""

    features: "torch.Tensor"
    labels: "torch.Tensor"
    num_skipped: int


def resolve_amp(amp: Optional[bool], device) -> bool:
    """``None`` -> bf16 autocast on CUDA only: on this project's CPUs it was no faster than fp32 for ViT
    features (0.70 vs 0.65 s per 256 images) and only costs precision."""
    import torch

    return torch.device(device).type == "cuda" if amp is None else bool(amp)


def extract_features(backbone: "Backbone", dataset: "Dataset", batch_size: int = 256, pool: str = "cls",
                     num_workers: int = 0, device=None, amp: Optional[bool] = None, progress: bool = True,
                     desc: str = "features") -> Features:
    """Run a frozen backbone over ``dataset`` once, in order.

    Args:
        backbone: a :class:`~tokenmorph.backbone.Backbone` (its model is put in eval mode).
        dataset: items ``(image (3, S, S) float in [0, 1], label)`` or ``None`` for an undecodable file
            (dropped and counted, via ``tokenmorph.data.collate_skip``).
        batch_size, num_workers: the ``DataLoader``'s.
        pool: ``"cls"`` or ``"mean"`` (see ``Backbone.features``).
        device: where the backbone runs (default: where its parameters are).
        amp: bf16 autocast; ``None`` = on CUDA only (see :func:`resolve_amp`).
        progress: a tqdm bar on stderr (images/s and ETA).

    Returns:
        ``Features``: (N, D) float32 features and (N,) int64 labels on the CPU. Memory is bounded by the
        output itself: it is allocated once and filled batch by batch.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ..data import collate_skip

    if device is None:
        device = next(backbone.model.parameters()).device
    device = torch.device(device)
    backbone.model.eval()
    total = len(dataset)
    feats = torch.empty(total, backbone.embed_dim, dtype=torch.float32)
    labels = torch.empty(total, dtype=torch.long)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip, pin_memory=device.type == "cuda")
    filled = skipped = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar, \
            torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_amp(amp, device)):
        for images, targets, n_skipped in loader:
            skipped += n_skipped
            n = len(targets)
            if n:
                out = backbone.features(images.to(device, non_blocking=True), pool)
                feats[filled:filled + n] = out.float().cpu()
                labels[filled:filled + n] = targets
                filled += n
            bar.update(n + n_skipped)
            bar.set_postfix(skipped=skipped, refresh=False)
    # Views of the first rows: the skipped images' unused rows are left behind, never copied.
    return Features(feats[:filled], labels[:filled], skipped)


# ------------------------------------------------------------------------------------------ data
def positive(kind=int):
    """argparse ``type=``: ``kind(text)``, refused unless > 0."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    return convert


def positive_list(kind=int):
    """argparse ``type=``: ``"1e-3,0.01"`` -> ``[0.001, 0.01]``, every item a positive ``kind``."""
    item = positive(kind)

    def convert(text: str) -> list:
        values = [item(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        return values

    return convert


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every evaluation program takes: backbone, data, extraction, output."""
    g = parser.add_argument_group("backbone")
    g.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a pretrain checkpoint file, a run folder (its newest checkpoint), or timm:NAME")
    g.add_argument("--random-init", action="store_true", help="timm:NAME with random weights (no download)")
    g.add_argument("--img-size", type=positive(int), help="timm:NAME input side (default: the model's)")
    g.add_argument("--pool", choices=["cls", "mean"], default="cls",
                   help="feature: the CLS token, or the mean of the patch tokens (default cls)")
    d = parser.add_argument_group("data: --dataset fashion-mnist, or --train DIR --val DIR")
    d.add_argument("--dataset", metavar="NAME",
                   help="fashion-mnist[:DIR]: its train split is the train set, its test split the val set")
    d.add_argument("--train", metavar="DIR", help="ImageFolder tree DIR/CLASS/IMAGE of training images")
    d.add_argument("--val", metavar="DIR", help="ImageFolder tree of validation images (the same classes)")
    d.add_argument("--crop-pct", type=positive(float),
                   help="centre-crop fraction of the evaluation view (default 0.875; 1.0, a plain resize, when the "
                        f"images' short side is at most {TINY_IMAGE_SIDE} px, e.g. Fashion-MNIST)")
    d.add_argument("--limit-train", type=positive(int), metavar="N",
                   help="use N training images: a random subset drawn with --seed, the same in every run")
    d.add_argument("--limit-val", type=positive(int), metavar="N", help="use N validation images (as --limit-train)")
    d.add_argument("--seed", type=int, default=0, help="seed of the --limit-* subsets and of any training (default 0)")
    r = parser.add_argument_group("running")
    r.add_argument("--batch-size", type=positive(int), default=256, help="feature extraction batch (default 256)")
    r.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader workers (default min(4, CPUs))")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="feature extraction: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on CPU)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--out", metavar="FILE.json", help="also write the result JSON here")


def _short_side(dataset: "Dataset") -> int:
    """Short side of a data set's images: Fashion-MNIST's array shape, or the first file's header."""
    from PIL import Image

    from ..data import FashionMNIST

    if isinstance(dataset, FashionMNIST):
        return min(dataset.data.shape[1:])
    with Image.open(dataset.files[0]) as im:
        return min(im.size)


def _check_labelled_tree(flag: str, root: Path) -> None:
    """``DataError`` unless ``root`` is an ImageFolder tree: images in class sub-folders, none at the top."""
    from ..data import IMAGE_EXTENSIONS, DataError

    if not root.is_dir():
        raise DataError(f"{flag} {root} {'is not a folder' if root.exists() else 'does not exist'}")
    flat = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
            and p.suffix.lower() in IMAGE_EXTENSIONS]
    if flat:
        raise DataError(f"{flag} {root} has no labels: it holds images directly (e.g. {flat[0].name}); evaluation "
                        f"needs an ImageFolder tree {root}/CLASS/IMAGE, one sub-folder per class")


def _subset(dataset: "Dataset", limit: Optional[int], seed: int) -> "Dataset":
    """A seeded random subset of ``limit`` items, kept in data set order (random, not the first N: those of a
    class-sorted tree would be a few classes only); the whole data set when ``limit`` is None or not smaller."""
    import torch
    from torch.utils.data import Subset

    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, order.sort().values.tolist())


def build_eval_datasets(args: argparse.Namespace, img_size: int) -> tuple["Dataset", "Dataset", int]:
    """``(train_ds, val_ds, num_classes)`` from the common data flags, items ``(image (3, img_size, img_size)
    in [0, 1], label)`` through ``tokenmorph.data.eval_transform``.

    ``--dataset fashion-mnist[:DIR]``: train and test splits of ``FashionMNIST``. ``--train DIR --val DIR``:
    ImageFolder trees (labels from the class sub-folders). ``--crop-pct`` defaults to 0.875, or 1.0 when the
    images are tiny (short side <= ``TINY_IMAGE_SIDE``). Raises ``DataError`` for missing or conflicting
    flags, folders without class sub-folders, fewer than 2 classes, or train/val class lists that differ.
    """
    from ..data import DataError, FashionMNIST, ImageFiles, default_crop_pct, eval_transform

    if args.dataset and (args.train or args.val):
        raise DataError("give either --dataset or --train DIR --val DIR, not both")
    if args.dataset:
        name, _, folder = args.dataset.partition(":")
        if name.strip().lower() != "fashion-mnist":
            raise DataError(f"--dataset {args.dataset!r}: only fashion-mnist[:DIR] is built in; for other data pass "
                            f"--train DIR --val DIR (ImageFolder trees)")
        train_ds, val_ds = (FashionMNIST(folder or None, train=split) for split in (True, False))
    elif args.train and args.val:
        for flag, root in (("--train", args.train), ("--val", args.val)):
            _check_labelled_tree(flag, Path(root).expanduser())
        train_ds, val_ds = (ImageFiles(Path(root).expanduser(), labels="folders") for root in (args.train, args.val))
        if train_ds.classes != val_ds.classes:
            only_train = sorted(set(train_ds.classes) - set(val_ds.classes))
            only_val = sorted(set(val_ds.classes) - set(train_ds.classes))
            raise DataError(f"--train and --val class folders differ: only in --train {only_train[:5]}, only in "
                            f"--val {only_val[:5]}; both need the same class sub-folders")
        if len(train_ds.classes) < 2:
            raise DataError(f"--train {args.train} has 1 class ({train_ds.classes[0]}); classification needs at "
                            f"least 2 class sub-folders")
    else:
        raise DataError("no evaluation data: pass --dataset fashion-mnist, or both --train DIR and --val DIR")
    crop_pct = args.crop_pct
    if crop_pct is None:
        crop_pct = default_crop_pct(_short_side(train_ds))
    try:
        train_ds.transform = val_ds.transform = eval_transform(img_size, crop_pct)
    except ValueError as e:
        raise DataError(f"--crop-pct: {e}") from None
    return (_subset(train_ds, args.limit_train, args.seed), _subset(val_ds, args.limit_val, args.seed + 1),
            len(train_ds.classes))


def extract_eval_features(args: argparse.Namespace) -> tuple[Features, Features, dict]:
    """Load the backbone of the common flags, extract train and val features once.

    Returns ``(train, val, info)``: the two :class:`Features` (on the CPU) and a JSON-ready record (backbone,
    num_train, num_val, num_classes, feature_dim, pool, skipped images, device, precision, and
    ``extract_seconds``: loading the backbone and data included).
    """
    from ..backbone import load_backbone
    from ..data import DataError
    from ..train import resolve_device

    device = resolve_device(args.device)
    start = time.perf_counter()
    backbone = load_backbone(args.checkpoint, device, random_init=args.random_init, img_size=args.img_size)
    train_ds, val_ds, num_classes = build_eval_datasets(args, backbone.img_size)
    amp = {"auto": None, "bf16": True, "fp32": False}[args.precision]
    common = dict(batch_size=args.batch_size, pool=args.pool, num_workers=args.num_workers, device=device,
                  amp=amp, progress=not args.no_progress)
    train = extract_features(backbone, train_ds, desc="train features", **common)
    val = extract_features(backbone, val_ds, desc="val features", **common)
    for split, f in (("train", train), ("val", val)):
        if len(f.labels) == 0:
            raise DataError(f"no {split} image could be decoded ({f.num_skipped} skipped)")
    info = {"backbone": backbone.name, "num_train": len(train.labels), "num_val": len(val.labels),
            "num_classes": num_classes, "feature_dim": backbone.embed_dim, "pool": args.pool,
            "skipped_images": train.num_skipped + val.num_skipped, "device": str(device),
            "precision": "bf16" if resolve_amp(amp, device) else "fp32",
            "extract_seconds": round(time.perf_counter() - start, 3)}
    return train, val, info


# ---------------------------------------------------------------------------------------- scoring
def topk_correct(scores: "torch.Tensor", labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Top-1 and top-5 hits of class scores ``(..., B, C)`` against ``labels`` (B,): two bool tensors
    ``(..., B)``. Equal scores rank by class index (e.g. the classes no k-NN neighbour voted for); with
    fewer than 5 classes, top-5 is top-C (always a hit)."""
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :5]
    hits = top == labels.unsqueeze(-1)
    return hits[..., 0], hits.any(dim=-1)


def emit_report(title: str, header: Sequence[str], rows: Sequence[Sequence], result: dict,
                out: Optional[str] = None) -> None:
    """Print ``title``, a table (``header`` + ``rows``), then ``result`` as one JSON object on the LAST line of
    stdout; with ``out``, also write that JSON to the file (parent folders created)."""
    print(title)
    cells = [[str(c) for c in header]] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    text = json.dumps(result)
    if out:
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text, flush=True)
