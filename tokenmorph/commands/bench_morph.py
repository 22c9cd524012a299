"""``tokenmorph bench morph``: the DTM loss forward + backward, tokenmorph against the release's
formulation."""

from __future__ import annotations

import argparse

from ..runtime.run_logger import dump_json
from .common import parse_schedule

HELP = "DTM loss forward+backward: tokenmorph vs the release's dense formulation"
DESCRIPTION = """\
Times the DTM loss forward+backward (fp32) of tokenmorph and of the official release's dense
formulation in the same run, checks both give the same loss, and reports the ratio."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64, help="B (default 64)")
    parser.add_argument("--tokens", type=int, default=196, help="N (default 196)")
    parser.add_argument("--dim", type=int, default=512, help="D (default 512)")
    parser.add_argument(
        "--schedule",
        action="append",
        metavar="S",
        help="one level's schedule, 'RxK' or a comma list; repeat per level "
        "(default 14x14 and 7x10)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs, median reported (default 5)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..bench import bench_morph

    schedules = [parse_schedule(s) for s in (args.schedule or ["14x14", "7x10"])]
    result = bench_morph(
        args.batch, args.tokens, args.dim, schedules, args.repeats, args.device, args.seed
    )
    if args.json:
        print(dump_json(result))
        return 0
    print(
        f"DTM loss forward+backward, B={args.batch} N={args.tokens} D={args.dim}, fp32, "
        f"{args.device}, "
        f"{result['threads']} threads"
    )
    print(f"  tokenmorph : {result['tokenmorph_s'] * 1e3:8.1f} ms")
    print(f"  dense      : {result['dense_s'] * 1e3:8.1f} ms   (the release's formulation)")
    print(
        f"  speed-up   : {result['speedup']:8.2f} x   |loss difference| = "
        f"{result['loss_abs_diff']:.2e}"
    )
    return 0
