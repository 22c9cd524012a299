"""``tokenmorph compare``: pre-train several configs under the same budget and evaluate them side
   by
side."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime.run_logger import dump_json

HELP = "DTM vs token-wise distillation (or any configs) under the same budget"
DESCRIPTION = """Pre-train each config under the same budget, then evaluate each (k-NN, linear
                 probe
on frozen features, token-wise distillation loss on held-out images) and print a side-by-side
table.
Run folders are OUT/CONFIG: an interrupted comparison resumes, a finished run is not trained
    again.

examples:
  tokenmorph compare --configs demo demo-tokenwise --output-dir outputs/compare
  tokenmorph compare --configs demo --output-dir outputs            # the README's main job
  tokenmorph compare --configs smoke --data DIR --eval-train T --eval-val V max_steps=10"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--configs",
        nargs="+",
        default=["demo", "demo-tokenwise"],
        metavar="CONFIG",
        help="pre-training configs to compare (default: demo demo-tokenwise)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every config"
    )
    p.add_argument(
        "--output-dir",
        default="outputs/compare",
        help="parent of the run folders (default outputs/compare)",
    )
    p.add_argument("--data", help="pre-training data for every config")
    p.add_argument(
        "--eval-dataset",
        default=None,
        help="fashion-mnist (default when the training data is fashion-mnist)",
    )
    p.add_argument(
        "--eval-train",
        metavar="DIR",
        help="evaluation ImageFolder train tree (instead of --eval-dataset)",
    )
    p.add_argument("--eval-val", metavar="DIR", help="evaluation ImageFolder val tree")
    p.add_argument(
        "--limit-train", type=int, help="evaluate with N training images (seeded subset)"
    )
    p.add_argument(
        "--limit-val", type=int, help="evaluate with N validation images (seeded subset)"
    )
    p.add_argument(
        "--probe-epochs",
        type=int,
        default=100,
        help="linear-probe epochs over cached features (default 100)",
    )
    p.add_argument(
        "--loss-images",
        type=int,
        default=2000,
        help="held-out images for the token-wise loss (default 2000)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def run(args: argparse.Namespace) -> int:
    from ..eval.compare import compare, markdown_table
    from ..eval.features import EvalData
    from ..recipes.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.data:
        overrides["data"] = args.data
    if args.eval_train or args.eval_val:
        data = EvalData(
            train=args.eval_train,
            val=args.eval_val,
            limit_train=args.limit_train,
            limit_val=args.limit_val,
        )
    else:
        data = EvalData(
            dataset=args.eval_dataset, limit_train=args.limit_train, limit_val=args.limit_val
        )
    out = Path(args.output_dir)
    rows = compare(
        args.configs,
        overrides,
        out,
        data,
        probe_epochs=args.probe_epochs,
        loss_images=args.loss_images,
        device=args.device,
    )
    print(markdown_table(rows))
    print(
        dump_json(
            {
                "runs": rows,
                "table": str(out / "compare.md"),
                "curves": str(out / "compare_curves.png"),
            }
        )
    )
    return 0
