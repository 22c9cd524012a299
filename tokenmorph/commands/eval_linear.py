"""``tokenmorph eval linear``: the frozen-feature linear protocol (:mod:`tokenmorph.eval.linear`)
   as
a program."""

from __future__ import annotations

import argparse
import time

from ..eval import PROTOCOLS
from .common import add_eval_arguments, eval_features_from_args, positive, positive_list

HELP = PROTOCOLS["linear"]
DESCRIPTION = """\
Linear probe on the frozen features of a backbone: features are extracted once (CLS or
mean-pooled), then one linear classifier per learning rate is trained on them in a single pass
(SGD, momentum 0.9, cosine schedule, optional BatchNorm without affine in front as in MAE). The
best learning rate is picked on the val split (so its accuracy is slightly optimistic, as in
DINOv2's sweep). Prints a table, then one JSON object as the last line: top1 / top5 of the best
learning rate (the headline), per-lr results, num_train, num_val, feature_dim, pool, seconds.

examples:
  tokenmorph eval linear --checkpoint outputs/demo --dataset fashion-mnist --batchnorm
  tokenmorph eval linear --checkpoint ckpt.pt --train DIR/train --val DIR/val --lrs 0.01,0.1
  --epochs 50"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..eval.linear import DEFAULT_LRS

    add_eval_arguments(parser)
    g = parser.add_argument_group("linear probe")
    g.add_argument(
        "--lrs",
        type=positive_list(float),
        default=list(DEFAULT_LRS),
        metavar="LR,LR,...",
        help=f"learning rates trained together (default {','.join(map(str, DEFAULT_LRS))})",
    )
    g.add_argument(
        "--epochs",
        type=positive(int),
        default=100,
        help="epochs over the cached features (default 100)",
    )
    g.add_argument(
        "--probe-batch-size", type=positive(int), default=256, help="training batch (default 256)"
    )
    g.add_argument(
        "--batchnorm",
        action="store_true",
        help="BatchNorm without affine before the classifier (MAE)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import ConfigError
    from ..eval.features import emit_report
    from ..eval.linear import linear_probe

    start = time.perf_counter()
    train, val, info = eval_features_from_args(args)
    device = torch.device(info["device"])
    probe_start = time.perf_counter()
    try:
        results = linear_probe(
            train.features.to(device),
            train.labels,
            val.features,
            val.labels,
            info["num_classes"],
            args.lrs,
            args.epochs,
            args.probe_batch_size,
            args.batchnorm,
            args.seed,
            progress=not args.no_progress,
        )
    except ValueError as e:  # too little data for the flags given (e.g. --limit-train 1)
        raise ConfigError(f"linear probe: {e}") from None
    best = results["best"]
    result = {
        "protocol": "linear",
        "top1": best["top1"],
        "top5": best["top5"],
        "lr": best["lr"],
        "per_lr": results["per_lr"],
        "epochs": args.epochs,
        "batch_size": args.probe_batch_size,
        "batchnorm": args.batchnorm,
        "seed": args.seed,
        **info,
        "probe_seconds": round(time.perf_counter() - probe_start, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    rows = [
        (f"{r['lr']:g}" + (" *" if r is best else ""), r["top1"], r["top5"])
        for r in results["per_lr"]
    ]
    emit_report(
        f"linear probe ({args.epochs} epochs, {'BN + ' if args.batchnorm else ''}linear) on "
        f"{info['num_train']} train / {info['num_val']} val {info['pool']} features "
        f"(D={info['feature_dim']}) "
        f"of {info['backbone']}; * = best on val",
        ("lr", "top1", "top5"),
        rows,
        result,
        args.out,
    )
    return 0
