"""``tokenmorph compare``: pre-train several configs under the same budget and evaluate them side
   by
side."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime.run_logger import dump_json

HELP = "DTM vs token-wise distillation (or any configs) under the same budget"
DESCRIPTION = """Pre-train each config under the same budget, then evaluate each (k-NN, linear
probe on frozen features, token-wise distillation loss on held-out images) and print a
side-by-side table. Run folders are OUT/CONFIG (and OUT/CONFIG/seed-S for the other seeds of
--seeds N): an interrupted comparison resumes, a finished run is not trained again. --seeds N
trains every config with N seeds and reports mean, standard deviation and the paired difference
to the first config with its 95% t-interval, for every metric: k-NN, linear probe, and the
segmentation mIoU of --seg-linear (the frozen probe) and --segment CONFIG (an UperNet
fine-tune).

examples:
  tokenmorph compare --configs demo demo-tokenwise --output-dir outputs/compare
  tokenmorph compare --configs demo --output-dir outputs            # the README's main job
  tokenmorph compare --configs smoke --data DIR --eval-train T --eval-val V max_steps=10
  tokenmorph compare --configs demo demo-tokenwise mae-demo mae-zoom-in-mask-demo --seeds 3 \\
      --seg-linear --segment fashion-mnist-seg-tiny max_steps=150   # docs/segmentation.md"""


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
    s = p.add_argument_group("seeds")
    s.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per config with seeds seed, seed + 1, ... (OUT/CONFIG, OUT/CONFIG/seed-S); "
        "with N > 1 the table adds mean, spread and paired differences to the first config",
    )
    g = p.add_argument_group("segmentation")
    g.add_argument(
        "--seg-linear",
        action="store_true",
        help="add the seg-linear probe's mIoU (tokenmorph eval seg-linear) of every run",
    )
    g.add_argument(
        "--seg-data",
        default="fashion-mnist-seg",
        help="segmentation data of --seg-linear (default: the Fashion-MNIST proxy set)",
    )
    g.add_argument(
        "--seg-steps",
        type=int,
        default=300,
        help="--seg-linear steps (default 300; a warm-up of a tenth of them)",
    )
    g.add_argument(
        "--segment",
        metavar="CONFIG",
        help="add an UperNet fine-tune's mIoU of every run: a segment config (e.g. "
        "fashion-mnist-seg-tiny) or YAML file; its folder is RUN/segment-CONFIG",
    )
    g.add_argument(
        "--segment-steps",
        type=int,
        help="--segment: its max_steps (and a warm-up of a tenth of them)",
    )
    g.add_argument(
        "--seg-limit-val", type=int, help="segmentation metrics on the first N validation images"
    )


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..eval.compare import compare
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
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: give 1 or more")
    seg_probe = None
    if args.seg_linear:
        proxy = args.seg_data.split(":")[0] == "fashion-mnist-seg"
        seg_probe = {
            "data": args.seg_data,
            "steps": args.seg_steps,
            "warmup_steps": max(args.seg_steps // 10, 1),
            "limit_val": args.seg_limit_val,
            "eval_batch_size": 32 if proxy else 1,
        }
    seg_overrides = {}
    if args.segment_steps is not None:  # a shorter run warms up for a tenth of it
        seg_overrides["max_steps"] = str(args.segment_steps)
        seg_overrides["warmup_steps"] = str(max(args.segment_steps // 10, 1))
    if args.seg_limit_val is not None:
        seg_overrides["limit_val"] = str(args.seg_limit_val)
    rows = compare(
        args.configs,
        overrides,
        out,
        data,
        probe_epochs=args.probe_epochs,
        loss_images=args.loss_images,
        device=args.device,
        seeds=args.seeds,
        seg_probe=seg_probe,
        segment_config=args.segment,
        segment_overrides=seg_overrides,
    )
    print((out / "compare.md").read_text(), end="")
    result = {
        "runs": rows,
        "table": str(out / "compare.md"),
        "curves": str(out / "compare_curves.png"),
    }
    if args.seeds > 1:
        result["seeds"] = str(out / "compare_seeds.json")
    print(dump_json(result))
    return 0
