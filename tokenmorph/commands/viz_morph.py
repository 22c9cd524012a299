"""``tokenmorph viz morph``: the patch groups of images at several morphing schedules."""

from __future__ import annotations

import argparse

from .common import add_teacher_arguments, parse_int_list, parse_schedule

HELP = "draw the patch groups of images at several morphing schedules"
DESCRIPTION = """\
Morph the patch tokens of images and draw the groups (one colour per group, borders outlined),
one column per schedule. Without IMAGE arguments, four photos that ship with scikit-image are
used. An IMAGE is a file path, skimage:NAME or fashion-mnist:N."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models.teachers import FEATURE_SOURCES
    from ..ops.morph import MODES

    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files or skimage:NAME (default: 4 sample photos)",
    )
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument(
        "--groups",
        default="196,98,49,16,8",
        help="target group counts, one column each (default 196,98,49,16,8)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=14,
        help="matching iterations per schedule for --groups (default 14)",
    )
    parser.add_argument(
        "--schedule",
        action="append",
        metavar="S",
        help="explicit schedule per column instead of --groups, e.g. 14x14",
    )
    parser.add_argument(
        "--features",
        choices=["raw-pixels", "pixels"],
        help="pixel token features without --teacher: raw patch pixels in [-1, 1] (the "
        "default), or per-patch normalised pixels",
    )
    add_teacher_arguments(parser, None, f"token features from: {', '.join(FEATURE_SOURCES)}")
    parser.add_argument("--mode", choices=list(MODES), default="reference")
    parser.add_argument(
        "--size", type=int, default=224, help="image side after centre crop (default 224)"
    )
    parser.add_argument("--patch", type=int, default=16, help="patch size (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of paper mode's random split")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import SAMPLE_PHOTOS, load_image
    from ..errors import ConfigError
    from ..models.teachers import RAW_PIXELS, build_feature_source
    from ..ops.morph import resolve_schedules
    from ..viz import morph_gallery

    if args.teacher and args.features:
        raise ConfigError(
            "--features and --teacher both choose the token features; pass one of them"
        )
    if args.size % args.patch:
        raise ConfigError(f"--size {args.size} is not a multiple of --patch {args.patch}")
    N = (args.size // args.patch) ** 2
    schedules = resolve_schedules(
        N,
        None if args.schedule else parse_int_list(args.groups, "--groups"),
        [parse_schedule(s) for s in args.schedule or []],
        args.iterations,
        args.mode,
    )
    source = args.teacher or args.features or RAW_PIXELS
    # --features pixels (before --teacher existed): per-patch normalisation over all p*p*3 values
    # jointly.
    extra = {"norm": "joint"} if args.features == "pixels" else {}
    teacher = build_feature_source(
        source,
        patch_size=args.patch,
        weights=args.teacher_weights,
        random_init=args.random_init,
        input_size=args.teacher_input_size,
        **extra,
    )
    sources = args.images or [f"skimage:{n}" for n in SAMPLE_PHOTOS[:4]]
    images = torch.stack([load_image(s, args.size) for s in sources])
    names = [s.split(":", 1)[-1].split("/")[-1] for s in sources]
    out = morph_gallery(
        images,
        teacher,
        schedules,
        args.out,
        patch_size=args.patch,
        mode=args.mode,
        row_names=names,
        seed=args.seed,
        suptitle=f"DTM token morphing of {source} features, mode={args.mode}",
    )
    print(f"wrote {out}  ({len(images)} images x {len(schedules)} schedules)")
    return 0
