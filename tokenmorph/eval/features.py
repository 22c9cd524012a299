"""What every frozen-feature evaluation shares: the data sets, feature extraction, scoring, the
report.

* :class:`EvalData`: which labelled data to evaluate on (``fashion-mnist``, or ImageFolder
  train/val trees, optional seeded subsets); :func:`build_eval_datasets` turns it into data sets
  (both live in :mod:`tokenmorph.data.labelled`, which the k-NN monitor of pre-training shares).
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
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import DataError, collate_skip
from ..data.labelled import EvalData, build_eval_datasets
from ..hub.backbone import Backbone, load_backbone
from ..ops.knn import topk_correct
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
