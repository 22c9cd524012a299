"""``tokenmorph bench segment``: where a segmentation fine-tuning step's time goes."""

from __future__ import annotations

import argparse

from ..runtime.run_logger import dump_json

HELP = "UperNet segmentation training steps (ViT-B, 512 px, batch 2, bf16), timed per phase"
DESCRIPTION = """\
Runs the training step of tokenmorph segment (a random-init BEiT backbone's four blocks, the
multi-scale neck, UperNet + auxiliary FCN head, both cross-entropies, backward, AdamW with
layer-decay groups) on synthetic 512 x 512 images and reports images/s and the time of each
phase (backbone, neck, heads, loss, backward, optimizer); the defaults are the ADE20K setting
per GPU of the releases (ViT-B/16, batch 2, 150 classes) in bf16.

on a GPU:
  tokenmorph bench segment --device cuda --json
  tokenmorph bench segment --device cuda --model large --json       # ViT-L/16
on a CPU (minutes for ViT-B; a small setting for a quick look):
  tokenmorph bench segment --model tiny --img-size 128 --steps 2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models.arch import STUDENT_SIZES
    from ..runtime.precision import PRECISIONS

    parser.add_argument("--model", default="base", choices=list(STUDENT_SIZES), help="ViT size")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--img-size", type=int, default=512, help="crop side (default 512)")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument(
        "--head-channels", type=int, help="UperNet width (default: the backbone's, as BEiT)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..bench import bench_segment

    r = bench_segment(
        args.model,
        args.batch_size,
        args.img_size,
        args.steps,
        args.device,
        args.precision,
        args.num_classes,
        args.patch_size,
        args.head_channels,
        args.seed,
    )
    if args.json:
        print(dump_json(r))
        return 0
    print(
        f"UperNet step: ViT {r['model']} ({r['embed_dim']}/{r['depth']}, patch {r['patch_size']}), "
        f"{r['img_size']} px, batch {r['batch_size']}, {r['precision']} on {r['device']} "
        f"({r['threads']} threads)"
    )
    print(f"  {r['images_per_second']:.2f} img/s, {r['step_s'] * 1e3:.0f} ms/step")
    for name, t in r["phases_s"].items():
        print(f"    {name:10s} {t * 1e3:9.1f} ms  ({100 * t / r['step_s']:4.1f}%)")
    return 0
