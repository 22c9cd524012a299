"""``tokenmorph eval seg-linear``: the frozen-feature segmentation probe
(:mod:`tokenmorph.eval.segmentation`, DINOv2's linear protocol) as a program."""

from __future__ import annotations

import argparse
import time

from ..eval import PROTOCOLS
from .common import add_backbone_arguments, add_running_arguments, positive

HELP = PROTOCOLS["seg-linear"]
DESCRIPTION = """\
DINOv2's linear segmentation probe: the frozen backbone's normalised patch tokens of the last
block (--layers last; or the last four concatenated, --layers last4) -> BatchNorm -> 1x1 conv
-> bilinear upsampling, trained with AdamW (lr 1e-3, wd 1e-4), poly decay after a linear
warm-up, on DINOv2's pipeline (short side crop x U[0.5, 2), random crop, flip, photometric
distortion); evaluated by sliding window. Prints the per-class IoU / Acc, then one JSON object
as the last line (mIoU, mAcc, aAcc, per class, ...). DINOv2 trains 40000 steps of 16 at 512 px
(the defaults); the Fashion-MNIST proxy (--data fashion-mnist-seg, the default) uses 32 px.

examples:
  tokenmorph eval seg-linear --checkpoint outputs/demo --steps 300 --warmup-steps 30
  tokenmorph eval seg-linear --checkpoint runs/vit-b16-in1k --data /data/ADEChallengeData2016
  tokenmorph eval seg-linear --checkpoint timm:vit_small_patch16_224 --random-init --steps 20"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..eval.segmentation import PROBE_LAYERS
    from ..ops.segmentation import INFERENCE_MODES

    g = add_backbone_arguments(parser)
    g.add_argument(
        "--layers",
        choices=list(PROBE_LAYERS),
        default="last",
        help="last: the last block's tokens (DINOv2's linear); last4: the last four concatenated",
    )
    d = parser.add_argument_group("data")
    d.add_argument(
        "--data",
        default="fashion-mnist-seg",
        help="fashion-mnist-seg (default), an ADE20K folder, or a folder with images/ + masks/",
    )
    d.add_argument("--val-data", help="validation folder with images/ + masks/ (own data)")
    d.add_argument("--num-classes", type=positive(int), help="own data without classes.txt")
    d.add_argument(
        "--reduce-zero-label", action="store_true", help="own data: label 0 = ignore, v -> v - 1"
    )
    d.add_argument(
        "--on-bad-image",
        choices=["skip", "raise"],
        default="skip",
        help="a bad pair: skip and count (default), or stop",
    )
    t = parser.add_argument_group("training")
    t.add_argument(
        "--crop-size",
        type=positive(int),
        help="crop side (default 32 on fashion-mnist-seg, 512 otherwise)",
    )
    t.add_argument("--steps", type=positive(int), default=40000, help="steps (default 40000)")
    t.add_argument(
        "--warmup-steps", type=int, default=1500, help="linear warm-up steps (default 1500)"
    )
    t.add_argument("--batch-size", type=positive(int), default=16, help="batch (default 16)")
    t.add_argument("--lr", type=positive(float), default=1e-3, help="AdamW lr (default 1e-3)")
    t.add_argument(
        "--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the head, order, augmentations")
    e = parser.add_argument_group("evaluation")
    e.add_argument("--eval-mode", choices=list(INFERENCE_MODES), default="slide")
    e.add_argument("--stride", type=positive(int), help="sliding stride (default 2/3 of the crop)")
    e.add_argument(
        "--eval-batch-size",
        type=positive(int),
        default=1,
        help="validation images per forward (> 1 needs images of one size, e.g. the proxy set)",
    )
    e.add_argument("--limit-val", type=positive(int), help="the first N validation images")
    r = parser.add_argument_group("running")
    add_running_arguments(r, "training and evaluation")
    r.add_argument(
        "--out-dir", metavar="DIR", help="also write per_class.md and segmentation_metrics.json"
    )


def run(args: argparse.Namespace) -> int:
    from ..eval.features import emit_report
    from ..eval.segmentation import seg_linear_probe
    from ..recipes.segment import write_segmentation_report

    start = time.perf_counter()
    result = seg_linear_probe(
        args.checkpoint,
        args.data,
        val_data=args.val_data,
        num_classes=args.num_classes,
        reduce_zero_label=args.reduce_zero_label,
        layers=args.layers,
        crop=args.crop_size,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        mode=args.eval_mode,
        stride=args.stride,
        eval_batch_size=args.eval_batch_size,
        limit_val=args.limit_val,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        num_workers=args.num_workers,
        random_init=args.random_init,
        on_bad_image=args.on_bad_image,
        progress=not args.no_progress,
    )
    result = {"protocol": "seg-linear", **result, "seconds": round(time.perf_counter() - start, 3)}
    if args.out_dir:
        result.update(write_segmentation_report(args.out_dir, result, result["classes"]))
    nan = float("nan")
    rows = [
        (name, nan if iou != iou else 100 * iou, nan if acc != acc else 100 * acc)
        for name, iou, acc in zip(result["classes"], result["IoU"], result["Acc"])
    ]
    emit_report(
        f"seg-linear ({result['layers']}: blocks {result['blocks']}, {result['steps']} steps of "
        f"{result['batch_size']} at {result['crop']} px) of {result['backbone']}: mIoU "
        f"{100 * result['mIoU']:.2f}, mAcc {100 * result['mAcc']:.2f}, aAcc "
        f"{100 * result['aAcc']:.2f} on {result['val_images']} images",
        ("class", "IoU %", "Acc %"),
        rows,
        _without_nan(result),
        args.out,
    )
    return 0


def _without_nan(value):
    """NaN (a class absent from ground truth and predictions) as JSON null, in nested values."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value
