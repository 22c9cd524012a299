"""``tokenmorph finetune``: fine-tune a pre-trained encoder (or train from scratch) for
classification."""

from __future__ import annotations

import argparse

from .common import (
    BACKBONE_HELP,
    RUN_FLAGS,
    add_run_arguments,
    config_from_args,
    report_training,
    run_training,
)

HELP = "fine-tune a pre-trained backbone (the paper's protocol)"
DESCRIPTION = """Fine-tune a tokenmorph pre-trained encoder (or train from scratch) for
classification.

Examples:
  tokenmorph finetune --config fashion-mnist-tiny --checkpoint outputs/demo
  tokenmorph finetune --config vit-b16-in1k --checkpoint runs/vit-b16-in1k --data
      /data/imagenet/train \\ --val-data /data/imagenet/val
  torchrun --nproc_per_node 8 -m tokenmorph finetune --config vit-b16-in1k ...

A run folder is resumed automatically. --checkpoint takes a pre-training run folder or
checkpoint, dtm-release:FILE (a checkpoint of the official DTM release), an export folder (or its
.safetensors/.json), local-dir:DIR, hf-hub:NAME or timm:NAME (a timm Beit or plain ViT). The
pre-trained final norm is not used with mean pooling (BEiT's protocol: a new fc_norm normalises
the pooled feature); each block's relative position table starts from its own pre-trained table
plus the shared one (rel_pos_init=own_plus_shared, the release's documented launch; shared_only,
own_only, as_pretrained); the command prints every key it drops or adds. A checkpoint of the MAE
framework gives a timm ViT (learnable position embedding; rel_pos_init is ignored)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "finetune")
    parser.add_argument(
        "--checkpoint",
        help=BACKBONE_HELP,
    )
    parser.add_argument("--data", help="training data: an ImageFolder tree, or fashion-mnist")
    parser.add_argument(
        "--val-data", help="validation ImageFolder tree (fashion-mnist uses its test split)"
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "finetune", ("checkpoint", "data", "val_data", *RUN_FLAGS))
    if cfg is None:
        return 0
    from ..recipes.finetune import finetune

    summary = run_training(finetune, cfg)
    if summary is not None:
        report_training(
            summary,
            f"[tokenmorph] fine-tuned {summary['steps']} steps in {summary['wall_time_s']:.0f} s: "
            f"val top-1 {100 * summary['val_top1']:.2f}%, top-5 {100 * summary['val_top5']:.2f}% "
            f"on {summary['val_images']} images",
        )
    return 0
