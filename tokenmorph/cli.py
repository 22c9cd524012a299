"""The ``tokenmorph`` command line (also ``python -m tokenmorph``).

Each sub-command parses its arguments here and calls the library; heavy imports happen inside the
command so that ``tokenmorph --help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from . import __version__


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def parse_schedule(text: str) -> list[int]:
    """'14x14' -> [14] * 14; '14,14,7' -> [14, 14, 7]; '0' -> [0]."""
    text = text.strip().lower()
    try:
        if "x" in text:
            r, k = text.split("x")
            return [int(r)] * int(k)
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"bad schedule {text!r}: use 'RxK' (e.g. 14x14) or a comma list (e.g. 14,14,7)") from None


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"bad {what} {text!r}: expected comma-separated integers, e.g. 196,98,49") from None


# ----------------------------------------------------------------------------------------- bench
def cmd_bench_morph(args: argparse.Namespace) -> int:
    from .bench import bench_morph

    schedules = [parse_schedule(s) for s in (args.schedule or ["14x14", "7x10"])]
    result = bench_morph(args.batch, args.tokens, args.dim, schedules, args.repeats, args.device, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"DTM loss forward+backward, B={args.batch} N={args.tokens} D={args.dim}, fp32, {args.device}, "
              f"{result['threads']} threads")
        print(f"  tokenmorph : {result['tokenmorph_s'] * 1e3:8.1f} ms")
        print(f"  dense      : {result['dense_s'] * 1e3:8.1f} ms   (the release's formulation)")
        print(f"  speed-up   : {result['speedup']:8.2f} x   |loss difference| = {result['loss_abs_diff']:.2e}")
    return 0


# ------------------------------------------------------------------------------------------- viz
def cmd_viz_morph(args: argparse.Namespace) -> int:
    import torch

    from .images import SAMPLE_PHOTOS, load_image, patchify
    from .morph import bipartite_morph, effective_schedule, spread_schedule
    from .viz import save_morph_figure

    sources = args.images or [f"skimage:{n}" for n in SAMPLE_PHOTOS[:4]]
    if args.size % args.patch:
        raise CLIError(f"--size {args.size} is not a multiple of --patch {args.patch}")
    grid = (args.size // args.patch, args.size // args.patch)
    N = grid[0] * grid[1]
    protect = args.mode == "reference"
    if args.schedule:
        schedules = [parse_schedule(s) for s in args.schedule]
    else:
        groups = parse_int_list(args.groups, "--groups")
        lowest = 2 if protect else 1
        bad = [g for g in groups if not lowest <= g <= N]
        if bad:
            raise CLIError(f"--groups {bad} out of range: each must be in [{lowest}, {N}] for a {grid[0]}x{grid[1]} grid")
        schedules = [spread_schedule(N, g, args.iterations, protect) for g in groups]
    try:
        images = [load_image(s, args.size) for s in sources]
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    x = torch.stack(images)
    feats = patchify(x * 2 - 1, args.patch)  # raw patch pixels in [-1, 1]
    if args.features == "pixels":  # per-patch normalised (MAE targets)
        feats = (feats - feats.mean(-1, keepdim=True)) / (feats.std(-1, keepdim=True) + 1e-6)
    gen = torch.Generator().manual_seed(args.seed)
    labels, titles = [], []
    for s in schedules:
        m = bipartite_morph(feats, s, mode=args.mode, generator=gen)
        labels.append(m.labels)
        eff = effective_schedule(N, s, protect)
        titles.append("token-wise" if m.num_groups == N else f"{m.num_groups} groups ({len([r for r in eff if r])} it.)")
    names = [s.split(":", 1)[-1].split("/")[-1] for s in sources]
    per_image = [[lab[i] for lab in labels] for i in range(len(images))]
    out = save_morph_figure(images, per_image, titles, names, grid, args.out,
                            suptitle=f"DTM token morphing of {args.features} features, mode={args.mode}")
    print(f"wrote {out}  ({len(images)} images x {len(schedules)} schedules)")
    return 0


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenmorph",
        description="Masked-image-modelling pre-training with Dynamic Token Morphing (DTM).",
    )
    p.add_argument("--version", action="version", version=f"tokenmorph {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench", help="benchmarks that print numbers (JSON with --json)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bm = bsub.add_parser(
        "morph",
        help="DTM loss forward+backward: tokenmorph vs the release's dense formulation",
        description="Times the DTM loss forward+backward (fp32) of tokenmorph and of the official release's "
        "dense formulation in the same run, checks both give the same loss, and reports the ratio.",
    )
    bm.add_argument("--batch", type=int, default=64, help="B (default 64)")
    bm.add_argument("--tokens", type=int, default=196, help="N (default 196)")
    bm.add_argument("--dim", type=int, default=512, help="D (default 512)")
    bm.add_argument("--schedule", action="append", metavar="S",
                    help="one level's schedule, 'RxK' or a comma list; repeat per level (default 14x14 and 7x10)")
    bm.add_argument("--repeats", type=int, default=5, help="timed runs, median reported (default 5)")
    bm.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    bm.add_argument("--seed", type=int, default=0)
    bm.add_argument("--json", action="store_true", help="print one JSON object")
    bm.set_defaults(func=cmd_bench_morph)

    viz = sub.add_parser("viz", help="pictures")
    vsub = viz.add_subparsers(dest="viz_command", metavar="VIZ")
    vm = vsub.add_parser(
        "morph",
        help="draw the patch groups of images at several morphing schedules",
        description="Morph the patch tokens of images and draw the groups (one colour per group, borders "
        "outlined), one column per schedule. Without IMAGE arguments, four photos that ship with "
        "scikit-image are used. An IMAGE is a file path or skimage:NAME.",
    )
    vm.add_argument("images", nargs="*", metavar="IMAGE", help="image files or skimage:NAME (default: 4 sample photos)")
    vm.add_argument("--out", required=True, help="output PNG path")
    vm.add_argument("--groups", default="196,98,49,16,8",
                    help="target group counts, one column each (default 196,98,49,16,8)")
    vm.add_argument("--iterations", type=int, default=14, help="matching iterations per schedule for --groups (default 14)")
    vm.add_argument("--schedule", action="append", metavar="S", help="explicit schedule per column instead of --groups, e.g. 14x14")
    vm.add_argument("--features", choices=["raw-pixels", "pixels"], default="raw-pixels",
                    help="token features: raw patch pixels in [-1, 1], or per-patch normalised pixels")
    vm.add_argument("--mode", choices=["reference", "paper"], default="reference")
    vm.add_argument("--size", type=int, default=224, help="image side after centre crop (default 224)")
    vm.add_argument("--patch", type=int, default=16, help="patch size (default 16)")
    vm.add_argument("--seed", type=int, default=0, help="seed of paper mode's random split")
    vm.set_defaults(func=cmd_viz_morph)

    for parser in (bench, viz):
        parser.set_defaults(func=lambda a, _p=parser: (_p.print_help(), 2)[1])
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"tokenmorph: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
