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
from .analysis import add_teacher_arguments
from .config import add_run_arguments


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


def _bench_objectives(args: argparse.Namespace) -> int:
    from .bench import bench_objectives
    from .degrade import OBJECTIVES

    frameworks = [f for f in (args.framework or "beit,mae").split(",") if f]
    objectives = [o for o in (args.objective or "mask").split(",") if o]
    for value, allowed, flag in ((frameworks, ("beit", "mae"), "--framework"), (objectives, OBJECTIVES, "--objective")):
        bad = [v for v in value if v not in allowed]
        if bad:
            raise CLIError(f"{flag} {','.join(bad)}: not one of {', '.join(allowed)} (give a comma-separated list)")
    r = bench_objectives(frameworks, objectives, args.model, args.teacher, args.random_init, args.batch_size, args.steps,
                         args.device, args.precision, args.img_size, args.patch_size, args.decoder, args.mask_ratio,
                         args.seed, args.teacher_weights)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"pre-training steps: student {r['student']}, teacher {r['teacher']}, batch {r['batch_size']}, "
          f"{r['img_size']} px / patch {r['patch_size']}, decoder {r['decoder']}, {r['precision']} on {r['device']} "
          f"({r['threads']} threads)")
    for x in r["results"]:
        ratios = "".join(f", {x[k]:.2f}x the {label} step" for k, label in
                         (("step_vs_beit", "beit"), ("step_vs_mask", "mask")) if k in x)
        print(f"  {x['framework']:5s} {x['objective']:13s} {x['step_s'] * 1e3:8.0f} ms/step  "
              f"{x['images_per_second']:7.2f} img/s{ratios}")
        print("      " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in x["phases_s"].items()))
    return 0


def cmd_bench_pretrain(args: argparse.Namespace) -> int:
    from .bench import bench_pretrain

    if args.framework or args.objective:
        return _bench_objectives(args)
    r = bench_pretrain(args.model, args.teacher, args.random_init, args.batch_size, args.steps, args.device,
                       args.precision, args.img_size, args.patch_size, not args.no_baseline, args.seed, args.teacher_weights)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"DTM pre-training step: student {r['student']}, teacher {r['teacher']}, batch {r['batch_size']}, "
          f"{r['precision']} on {r['device']} ({r['threads']} threads)")
    print(f"  {r['images_per_second']:.2f} img/s, {r['step_s'] * 1e3:.0f} ms/step, "
          f"{r['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of the "
          f"{r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak")
    for name, t in r["phases_s"].items():
        print(f"    {name:16s} {t * 1e3:8.1f} ms  ({100 * t / r['step_s']:4.1f}%)")
    if "baseline" in r:
        print(f"  release step (fp32, explicit attention, dense morphing): {r['baseline']['images_per_second']:.2f} img/s"
              f"  -> speed-up {r['speedup_vs_release']:.2f}x")
    return 0


# ------------------------------------------------------------------------------------------- viz
def cmd_viz_morph(args: argparse.Namespace) -> int:
    import torch

    from .analysis import build_feature_teacher, resolve_schedules
    from .images import SAMPLE_PHOTOS, load_image
    from .viz import morph_gallery

    if args.teacher and args.features:
        raise CLIError("--features and --teacher both choose the token features; pass one of them")
    if args.size % args.patch:
        raise CLIError(f"--size {args.size} is not a multiple of --patch {args.patch}")
    N = (args.size // args.patch) ** 2
    schedules = resolve_schedules(N, None if args.schedule else parse_int_list(args.groups, "--groups"),
                                  [parse_schedule(s) for s in args.schedule or []], args.iterations, args.mode)
    source = args.teacher or args.features or "raw-pixels"
    # --features pixels (before --teacher existed): per-patch normalisation over all p*p*3 values jointly.
    extra = {"norm": "joint"} if args.features == "pixels" else {}
    teacher = build_feature_teacher(source, patch_size=args.patch, weights=args.teacher_weights,
                                    random_init=args.random_init, input_size=args.teacher_input_size, **extra)
    sources = args.images or [f"skimage:{n}" for n in SAMPLE_PHOTOS[:4]]
    try:
        images = torch.stack([load_image(s, args.size) for s in sources])
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    names = [s.split(":", 1)[-1].split("/")[-1] for s in sources]
    out = morph_gallery(images, teacher, schedules, args.out, patch_size=args.patch, mode=args.mode, row_names=names,
                        seed=args.seed, suptitle=f"DTM token morphing of {source} features, mode={args.mode}")
    print(f"wrote {out}  ({len(images)} images x {len(schedules)} schedules)")
    return 0


# ------------------------------------------------------------------------------------- pretrain
def cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import config_from_args

    cfg = config_from_args(args, "pretrain", ("data", "output_dir", "max_steps", "save_every", "device"))
    if cfg is None:
        return 0
    from .pretrain import pretrain
    from .train import shutdown_distributed

    try:
        summary = pretrain(cfg)
    finally:
        shutdown_distributed()
    if summary.get("world_size", 1) == 1 or _rank() == 0:
        print(f"[tokenmorph] done: {summary['steps']} steps in {summary['wall_time_s']:.0f} s "
              f"({summary['img_per_s']:.1f} img/s), final loss {summary['final_loss']:.4f}, "
              f"{summary['skipped_images']} undecodable images skipped; checkpoint {summary['checkpoint']}")
        print(json.dumps(summary))
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


# ------------------------------------------------------------------------------------------ main
# Sub-commands that live in their own modules: (group, name, module, help). Each module defines
# ``add_arguments(parser)`` and ``run(args) -> int`` and imports torch only inside ``run``, so that
# building the parser (``tokenmorph --help``) stays instant.
MODULE_COMMANDS = [
    ("eval", "knn", "tokenmorph.eval.knn", "weighted k-NN classification on frozen features"),
    ("eval", "linear", "tokenmorph.eval.linear", "linear probe on frozen features"),
    (None, "finetune", "tokenmorph.finetune", "fine-tune a pre-trained backbone (the paper's protocol)"),
    (None, "export", "tokenmorph.export", "export a student encoder as a timm-loadable safetensors file"),
    (None, "compare", "tokenmorph.compare", "DTM vs token-wise distillation under the same budget"),
    ("analyze", "consistency", "tokenmorph.analysis", "spatial consistency of teacher targets, before and after morphing"),
    (None, "plot", "tokenmorph.plots", "training curves of one or more runs"),
    ("viz", "reconstruct", "tokenmorph.reconstruct", "inputs, predictions and targets of a pixel-reconstruction run"),
]


def _add_module_commands(sub, groups: dict) -> None:
    import importlib

    for group, name, module, help_text in MODULE_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real missing dependency inside the module
                raise
            continue
        if group is None:
            parent = sub
        else:
            if group not in groups:
                g = sub.add_parser(group, help=f"{group} commands")
                groups[group] = (g, g.add_subparsers(dest=f"{group}_command", metavar=group.upper()))
                g.set_defaults(func=lambda a, _p=g: (_p.print_help(), 2)[1])
            parent = groups[group][1]
        parser = parent.add_parser(name, help=help_text, description=getattr(mod, "DESCRIPTION", help_text),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(parser)
        parser.set_defaults(func=mod.run)


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
    bp = bsub.add_parser(
        "pretrain",
        help="full DTM pre-training steps, timed per phase, against the release's step",
        description="Runs full DTM pre-training steps (teacher forward, student forward/backward on masked input, "
        "DTM loss with two sampled levels, clipping, AdamW) on synthetic images and reports images/s, a per-phase "
        "breakdown, the step's model FLOPs, achieved FLOP/s and their fraction of a matrix-product peak measured in "
        "the same run; then the same for the official release's step (fp32, explicit attention, dense morphing).",
    )
    bp.add_argument("--model", default="small", choices=["tiny", "small", "base", "large"], help="student size")
    bp.add_argument("--teacher", default="clip-vit-b16", help="teacher name (default clip-vit-b16)")
    bp.add_argument("--random-init", action="store_true", help="random teacher weights (no download)")
    bp.add_argument("--teacher-weights", help="teacher weights file")
    bp.add_argument("--batch-size", type=int, default=16)
    bp.add_argument("--steps", type=int, default=3, help="timed steps after warm-up (one; two with --framework/--objective)")
    bp.add_argument("--device", default="cpu")
    bp.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    bp.add_argument("--img-size", type=int, default=224)
    bp.add_argument("--patch-size", type=int, default=16)
    bp.add_argument("--no-baseline", action="store_true", help="skip the release-step comparison")
    bp.add_argument("--framework", help="comma-separated beit,mae: time the real step of each framework x objective "
                    "(tokenmorph pretrain's objective) in one run, with ratios, instead of the release comparison")
    bp.add_argument("--objective", help="comma-separated objectives (mask, zoom_in, zoom_out, distort, blur, decolorize, "
                    "zoom_in_mask) for --framework (default mask; --objective alone implies --framework beit,mae)")
    bp.add_argument("--decoder", default="release", choices=["release", "mae"], help="MAE decoder preset (4x384 or 8x512)")
    bp.add_argument("--mask-ratio", type=float, default=0.75, help="MAE framework mask ratio")
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--json", action="store_true", help="print one JSON object")
    bp.set_defaults(func=cmd_bench_pretrain)

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
    vm.add_argument("--features", choices=["raw-pixels", "pixels"],
                    help="pixel token features without --teacher: raw patch pixels in [-1, 1] (the default), or "
                         "per-patch normalised pixels")
    add_teacher_arguments(vm, None, "token features from a teacher: pixels, efficientnet-lite0 (offline ImageNet "
                                    "weights), clip-vit-b16, timm:NAME, or raw-pixels")
    vm.add_argument("--mode", choices=["reference", "paper"], default="reference")
    vm.add_argument("--size", type=int, default=224, help="image side after centre crop (default 224)")
    vm.add_argument("--patch", type=int, default=16, help="patch size (default 16)")
    vm.add_argument("--seed", type=int, default=0, help="seed of paper mode's random split")
    vm.set_defaults(func=cmd_viz_morph)

    pt = sub.add_parser(
        "pretrain",
        help="pre-training of a ViT: DTM, MAE, Beyond Masking (one CPU, or many GPUs through torchrun)",
        description="Pre-train a student ViT: Dynamic Token Morphing in the BEiT framework (default), or the MAE "
        "framework (framework=mae) with masking or a Beyond Masking objective (objective=zoom_in|zoom_out|distort|"
        "blur|decolorize|zoom_in_mask) and pixel (teacher=pixels) or teacher targets. A run folder is resumed "
        "automatically: "
        "rerun the same command after an interruption. Multi-process: torchrun --nproc_per_node N -m tokenmorph "
        "pretrain ... (gloo on CPU, NCCL on GPU; multi-node with torchrun's --nnodes/--rdzv-* flags).",
        epilog="Examples:\n  tokenmorph pretrain --config smoke --data DIR --output-dir OUT --max-steps 8\n"
        "  tokenmorph pretrain --config demo\n  tokenmorph pretrain --config vit-b16-in1k --data /data/imagenet/train "
        "batch_size=2048 lr=3e-4\n  tokenmorph pretrain --config mae-zoom-in-mask-demo\n"
        "  tokenmorph pretrain --config smoke framework=mae objective=zoom_in_mask teacher=pixels --data DIR "
        "--output-dir OUT --max-steps 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(pt, "pretrain")
    pt.add_argument("--data", help="training data: a folder of images (flat or class tree), or fashion-mnist")
    pt.set_defaults(func=cmd_pretrain)

    for parser in (bench, viz):
        parser.set_defaults(func=lambda a, _p=parser: (_p.print_help(), 2)[1])
    _add_module_commands(sub, {"bench": (bench, bsub), "viz": (viz, vsub)})
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may sit anywhere among the flags (argparse alone takes them in one run)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`: not an error
        sys.stderr.close()
        return 0
    except Exception as e:  # user-facing errors are one line; anything else is a bug: full traceback
        if not _is_user_error(e):
            raise
        if _rank() == 0:
            print(f"tokenmorph: error: {e}", file=sys.stderr)
        return 2


def _is_user_error(e: Exception) -> bool:
    from .config import ConfigError
    from .data import DataError
    from .teachers import TeacherError
    from .train import TrainingError

    return isinstance(e, (CLIError, ConfigError, DataError, TeacherError, TrainingError))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
