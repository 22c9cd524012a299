"""``tokenmorph bench pretrain``: where a pre-training step's time goes, against the release's
step."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..runtime.run_logger import dump_json

HELP = "full DTM pre-training steps, timed per phase, against the release's step"
DESCRIPTION = """\
Runs full DTM pre-training steps (teacher forward, student forward/backward on masked input, DTM
loss with two sampled levels, clipping, AdamW) on synthetic images and reports images/s, a
per-phase breakdown (seconds, FLOPs, fraction of the matrix-product peak measured in the same
run), the bf16/fp32 peak ratio, both attention kernels timed on a student block, the error of the
bf16 teacher's targets against an fp32 teacher; then the same for the official release's step
(fp32 on a CPU, fp16 on CUDA; explicit attention, dense morphing) and the ratio. The steps of
both and the peaks are measured in rounds (one step of each, then the peaks), so the ratios
compare numbers taken seconds apart on a machine whose speed drifts: times are the rounds'
medians, ratios the medians of the rounds' ratios. With --framework and/or --objective it times
instead the real step of tokenmorph pretrain for every framework x objective."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models.arch import DECODER_PRESETS, FRAMEWORKS, STUDENT_SIZES
    from ..models.attention import ATTENTION_KERNELS
    from ..ops.degrade import OBJECTIVES
    from ..runtime.precision import PRECISIONS

    parser.add_argument(
        "--model", default="small", choices=list(STUDENT_SIZES), help="student size"
    )
    parser.add_argument(
        "--teacher", default="clip-vit-b16", help="teacher name (default clip-vit-b16)"
    )
    parser.add_argument(
        "--random-init", action="store_true", help="random teacher weights (no download)"
    )
    parser.add_argument("--teacher-weights", help="teacher weights file")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="images per step (default 128 on CUDA: a GPU-sized step; 16 on the CPU)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed rounds after warm-up (one step of tokenmorph's and one of the release's "
        "each; with --framework/--objective: timed steps of each)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the release-step comparison"
    )
    parser.add_argument(
        "--framework",
        help=f"comma-separated {','.join(FRAMEWORKS)}: time the real step of each "
        "framework x objective (tokenmorph pretrain's objective) in one run, with ratios, instead "
        "of the release comparison",
    )
    parser.add_argument(
        "--objective",
        help=f"comma-separated objectives ({', '.join(OBJECTIVES)}) for --framework "
        f"(default mask; --objective alone implies --framework {','.join(FRAMEWORKS)})",
    )
    parser.add_argument(
        "--decoder",
        default="release",
        choices=list(DECODER_PRESETS),
        help="MAE decoder preset (release 4x384 or mae 8x512)",
    )
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="MAE framework mask ratio")
    parser.add_argument(
        "--attention",
        default="auto",
        choices=list(ATTENTION_KERNELS),
        help="attention kernel (auto: the rule tokenmorph pretrain uses)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile student and teacher (the first step, with the compilation, is "
        "reported apart)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _common(args: argparse.Namespace) -> dict:
    """The arguments both benchmarks take."""
    keys = ("model", "teacher", "random_init", "batch_size", "steps", "device", "precision")
    more = ("img_size", "patch_size", "seed", "teacher_weights")
    return {k: getattr(args, k) for k in keys + more}


def _objectives(args: argparse.Namespace) -> int:
    from ..bench import bench_objectives
    from ..models.arch import FRAMEWORKS
    from ..ops.degrade import OBJECTIVES

    frameworks = [f for f in (args.framework or ",".join(FRAMEWORKS)).split(",") if f]
    objectives = [o for o in (args.objective or "mask").split(",") if o]
    for value, allowed, flag in (
        (frameworks, tuple(FRAMEWORKS), "--framework"),
        (objectives, OBJECTIVES, "--objective"),
    ):
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ConfigError(
                f"{flag} {','.join(bad)}: not one of {', '.join(allowed)} (give a comma-separated "
                "list)"
            )
    r = bench_objectives(
        frameworks,
        objectives,
        **_common(args),
        decoder=args.decoder,
        mask_ratio=args.mask_ratio,
    )
    if args.json:
        print(dump_json(r))
        return 0
    print(
        f"pre-training steps: student {r['student']}, teacher {r['teacher']}, batch "
        f"{r['batch_size']}, "
        f"{r['img_size']} px / patch {r['patch_size']}, decoder {r['decoder']}, {r['precision']} "
        f"on {r['device']} "
        f"({r['threads']} threads)"
    )
    for x in r["results"]:
        ratios = "".join(
            f", {x[k]:.2f}x the {label} step"
            for k, label in (("step_vs_beit", "beit"), ("step_vs_mask", "mask"))
            if k in x
        )
        print(
            f"  {x['framework']:5s} {x['objective']:13s} {x['step_s'] * 1e3:8.0f} ms/step  "
            f"{x['images_per_second']:7.2f} img/s{ratios}"
        )
        print("      " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in x["phases_s"].items()))
    return 0


def run(args: argparse.Namespace) -> int:
    from ..bench import bench_pretrain

    if args.batch_size is None:
        args.batch_size = 128 if args.device.startswith("cuda") else 16
    if args.framework or args.objective:
        return _objectives(args)
    r = bench_pretrain(
        **_common(args),
        baseline=not args.no_baseline,
        attention=args.attention,
        compile=args.compile,
    )
    if args.json:
        print(dump_json(r))
        return 0
    print(
        f"DTM pre-training step: student {r['student']}, teacher {r['teacher']}, batch "
        f"{r['batch_size']}, "
        f"{r['precision']} on {r['device']} ({r['threads']} threads)"
    )
    print(
        f"  {r['images_per_second']:.2f} img/s, {r['step_s'] * 1e3:.0f} ms/step, "
        f"{r['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of "
        "the "
        f"{r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak"
    )
    if r["spec_peak_flops_per_s"]:
        print(
            f"  {100 * r['fraction_of_spec_peak']:.0f}% of the {r['gpu']} data sheet's "
            f"{r['spec_peak_flops_per_s'] / 1e12:.0f} TFLOP/s dense {r['precision']} peak"
        )
    fractions = r["phases_fraction_of_peak"]
    for name, t in r["phases_s"].items():
        of_peak = "" if fractions[name] is None else f", {100 * fractions[name]:3.0f}% of peak"
        print(
            f"    {name:16s} {t * 1e3:8.1f} ms  ({100 * t / r['step_s']:4.1f}% of the "
            f"step{of_peak})"
        )
    att = r["attention"]
    if "sdpa_s" in att:
        print(
            f"  attention: {att['kernel']} (setting {att['setting']}); one block's forward + "
            f"backward: sdpa {att['sdpa_s'] * 1e3:.1f} ms, explicit {att['explicit_s'] * 1e3:.1f} "
            f"ms"
        )
    if "teacher_target_error" in r:
        e = r["teacher_target_error"]
        print(
            f"  teacher targets vs fp32: relative error {e['relative_l2']:.4f}, lowest token "
            f"cosine {e['min_token_cosine']:.4f}"
        )
    if "baseline" in r:
        b = r["baseline"]
        allowed = (
            f" (the {b['precision']} -> {r['precision']} peak ratio alone allows "
            f"{r['peak_ratio_vs_fp32']:.2f}x)"
            if b["precision"] == "fp32"
            else ""
        )
        print(
            f"  {b['what']}: {b['images_per_second']:.2f} img/s -> speed-up "
            f"{r['speedup_vs_release']:.2f}x{allowed}"
        )
    return 0
