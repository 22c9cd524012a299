"""``tokenmorph segment``: semantic-segmentation fine-tuning (UperNet on a pre-trained ViT, the
ADE20K protocol)."""

from __future__ import annotations

import argparse

from ..runtime.run_logger import dump_json
from .common import BACKBONE_HELP, add_run_arguments, config_from_args, run_training

HELP = "semantic-segmentation fine-tuning (UperNet, the ADE20K protocol)"
DESCRIPTION = """Fine-tune a pre-trained encoder for semantic segmentation: BEiT's UperNet (four
blocks -> multi-scale neck -> pyramid pooling + FPN, auxiliary FCN head), mmseg's ADE20K
pipeline, layer-wise lr decay, poly schedule; then mIoU / mAcc / aAcc on the validation set
(sliding window) with the per-class table in the run folder (per_class.md).

Backbones (--checkpoint): a tokenmorph pre-training checkpoint or run folder (either framework),
an export (the folder, or OUT.json / OUT.safetensors, of tokenmorph export), local-dir:DIR,
hf-hub:NAME or timm:NAME (any timm ViT; random_init=true for no download). Data (--data): the
ADE20K release folder (ADEChallengeData2016 or its parent), a folder with images/ and masks/
(class-index PNGs, 255 = ignore, optional classes.txt; --val-data another one), or
fashion-mnist-seg (the CPU proxy).

examples:
  tokenmorph segment --config fashion-mnist-seg-tiny --checkpoint outputs/demo
  tokenmorph segment --config vit-b16-ade20k --checkpoint runs/vit-b16-in1k \\
      --data /data/ADEChallengeData2016
  torchrun --nproc_per_node 8 -m tokenmorph segment --config vit-b16-ade20k ...
A run folder is resumed automatically."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "segment")
    parser.add_argument(
        "--checkpoint",
        help=BACKBONE_HELP,
    )
    parser.add_argument(
        "--data",
        help="ADE20K folder, a folder with images/ + masks/, or fashion-mnist-seg",
    )
    parser.add_argument("--val-data", help="validation folder with images/ + masks/ (own data)")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(
        args,
        "segment",
        ("checkpoint", "data", "val_data", "output_dir", "max_steps", "save_every", "device"),
    )
    if cfg is None:
        return 0
    from ..recipes.segment import segment

    summary = run_training(segment, cfg)
    if summary is not None:
        print(
            f"[tokenmorph] segmentation fine-tuned {summary['steps']} steps in "
            f"{summary['wall_time_s']:.0f} s: mIoU {100 * summary['mIoU']:.2f}, mAcc "
            f"{100 * summary['mAcc']:.2f}, aAcc {100 * summary['aAcc']:.2f} on "
            f"{summary['val_images']} images; per class: {summary['per_class_table']}"
        )
        print(dump_json(summary))
    return 0
