"""``tokenmorph analyze consistency``: the spatial consistency of a teacher's targets before and
after morphing (:mod:`tokenmorph.eval.consistency`) as a program."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime.run_logger import dump_json
from .common import add_teacher_arguments, parse_int_list, parse_schedule

HELP = "spatial consistency of teacher targets, before and after morphing"
DESCRIPTION = """\
Spatial consistency of a teacher's target tokens, before and after DTM morphing (the paper's
pilot study, for any teacher on any data set). Images are resized (centre crop) to --img-size;
the teacher's tokens are resampled to the (img-size / patch-size)^2 grid a student would use;
each image's tokens are morphed with each schedule (grouping from the tokens themselves, as DTM
does), every token replaced by its group mean.

Measured (definitions: docs/analysis.md):
  (a) mean cosine similarity of 4-adjacent tokens (each unordered pair once), the fraction of
      adjacent pairs in one group, and the mean cosine over adjacent pairs in different groups;
  (b) labelled data only (fashion-mnist, an ImageFolder tree): a linear classifier fitted on
      every (morphed) token of the training images, scored per token on held-out images:
      accuracy, neighbour agreement (4-adjacent tokens predict the same class), agree-and-right
      (both predict the label).

Writes OUT/consistency.json and OUT/consistency.png, and prints a Markdown table."""


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="fashion-mnist[:DIR], an ImageFolder tree (labels: (a) and (b)) or a flat folder of "
        "images ((a) only)",
    )
    parser.add_argument(
        "--out", required=True, help="output folder for consistency.json and consistency.png"
    )
    add_teacher_arguments(
        parser,
        "efficientnet-lite0",
        "token source: efficientnet-lite0 (default; offline ImageNet "
        "weights), clip-vit-b16, pixels, timm:NAME, or raw-pixels",
    )
    parser.add_argument("--img-size", type=int, default=224, help="image side (default 224)")
    parser.add_argument(
        "--patch-size",
        type=int,
        default=16,
        help="patch side: grid = img-size / patch-size (default 16)",
    )
    parser.add_argument(
        "--groups",
        help="target group counts, comma-separated (default N, N/2, N/4, N/12, N/24: "
        "196,98,49,16,8 at 224/16)",
    )
    parser.add_argument(
        "--schedule",
        action="append",
        metavar="S",
        help="explicit schedule instead of --groups ('RxK' or a comma list); repeat per row",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=14,
        help="matching rounds per --groups schedule (default 14)",
    )
    parser.add_argument(
        "--mode", choices=["reference", "paper"], default="reference", help="morphing mode"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=1000,
        help="images analysed: training images for labelled data, all images of a flat folder "
        "(default 1000; 0 = all)",
    )
    parser.add_argument(
        "--test-limit",
        type=int,
        help="held-out images for (b): from Fashion-MNIST's test split, or held out of an "
        "ImageFolder (at most half of it) (default: limit / 2; with --limit 0: the whole "
        "test split, a quarter of an ImageFolder)",
    )
    parser.add_argument(
        "--crop-pct",
        type=float,
        help="centre-crop fraction (default 1.0 for Fashion-MNIST, 0.875 otherwise)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per teacher forward (default 64)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="data-loading worker processes (default 0)"
    )
    parser.add_argument(
        "--probe-iterations",
        type=int,
        default=100,
        help="L-BFGS iterations of the classifier (default 100)",
    )
    parser.add_argument(
        "--probe-weight-decay",
        type=float,
        default=1e-4,
        help="L2 penalty of the classifier (default 1e-4)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--seed", type=int, default=0, help="image subsets, held-out split, paper-mode splits"
    )


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..eval.consistency import consistency_analysis, load_splits, markdown_table
    from ..models.teachers import build_feature_source
    from ..ops.morph import default_groups, resolve_schedules
    from ..runtime.distributed import resolve_device
    from ..viz import plot_consistency

    if args.img_size <= 0 or args.patch_size <= 0 or args.img_size % args.patch_size:
        raise ConfigError(
            f"--img-size {args.img_size} must be a positive multiple of --patch-size "
            f"{args.patch_size}"
        )
    for flag in ("limit", "test_limit", "batch_size", "workers"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag == "batch_size" else 0):
            raise ConfigError(
                f"--{flag.replace('_', '-')} must be >= {1 if flag == 'batch_size' else 0}, got "
                f"{value}"
            )
    device = resolve_device(args.device)
    grid = (args.img_size // args.patch_size,) * 2
    N = grid[0] * grid[1]
    groups = (
        parse_int_list(args.groups, "--groups") if args.groups else default_groups(N, args.mode)
    )
    schedules = resolve_schedules(
        N, groups, [parse_schedule(s) for s in args.schedule or []], args.iterations, args.mode
    )
    teacher = build_feature_source(
        args.teacher,
        patch_size=args.patch_size,
        weights=args.teacher_weights,
        random_init=args.random_init,
        input_size=args.teacher_input_size,
        device=device,
    )
    limit = args.limit or None
    test_limit = args.test_limit if args.test_limit is not None else (limit // 2 if limit else None)
    train, test, classes = load_splits(
        args.data, args.img_size, limit, test_limit or None, args.seed, args.crop_pct
    )
    result = consistency_analysis(
        teacher,
        train,
        test,
        classes,
        grid,
        schedules,
        mode=args.mode,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        seed=args.seed,
        probe_iterations=args.probe_iterations,
        probe_weight_decay=args.probe_weight_decay,
    )
    result = {
        "teacher": args.teacher,
        "data": args.data,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "definitions": "docs/analysis.md",
        **result,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "consistency.json").write_text(dump_json(result, indent=2) + "\n")
    plot_consistency(result, out / "consistency.png")
    n = result["images"]
    split = f" ({n['train']} train / {n['test']} held out)" if n["train"] is not None else ""
    print(
        f"{args.teacher} tokens on {args.data}: {n['analysed']} images{split}, {grid[0]}x{grid[1]} "
        "grid, "
        f"{result['token_dim']}-d, mode={args.mode}, {n['skipped']} undecodable skipped"
    )
    print(markdown_table(result))
    print(f"wrote {out / 'consistency.json'} and {out / 'consistency.png'}")
    return 0
