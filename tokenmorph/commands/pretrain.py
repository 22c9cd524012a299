"""``tokenmorph pretrain``: pre-train a student ViT (DTM, MAE, Beyond Masking) from a config."""

from __future__ import annotations

import argparse

from .common import (
    RUN_FLAGS,
    add_run_arguments,
    config_from_args,
    format_loss,
    report_training,
    run_training,
)

HELP = "pre-training of a ViT: DTM, MAE, Beyond Masking (one CPU, or many GPUs: torchrun or srun)"
DESCRIPTION = """\
Pre-train a student ViT: Dynamic Token Morphing in the BEiT framework (default), or the MAE
framework (framework=mae) with masking or a Beyond Masking objective
(objective=zoom_in|zoom_out|distort|blur| decolorize|zoom_in_mask) and pixel (teacher=pixels) or
teacher targets. A run folder is resumed
automatically: rerun the same command after an interruption. Multi-process: torchrun
--nproc_per_node N -m tokenmorph pretrain ... (gloo on CPU, NCCL on GPU; multi-node with
torchrun's --nnodes/--rdzv-* flags), or on SLURM srun alone, one task per GPU (its SLURM_*
variables are read; docs/cluster.md). --data takes a folder of images, fashion-mnist[:DIR], a
folder of WebDataset shards (tokenmorph data shards; read by index), wds:DIR_OR_PATTERN
(WebDataset .tar shards read as a stream, e.g. 'wds:/data/in1k-train-{000000..000127}.tar'; its
position is saved in every checkpoint: a resume repeats and skips no sample), hfds:PATH (a
local Hugging Face data set: a save_to_disk folder, parquet) or hfids:PATH (the same streamed,
with a saved position too). Start from published weights with
init_from=SOURCE (a tokenmorph checkpoint, run folder or export, an official MAE or DTM release
checkpoint, timm:NAME, local-dir:DIR; init_strict=false loads what fits); follow representation
quality with the k-NN monitor (monitor_every=N, monitor_data, monitor_limit, monitor_bank); log to
loggers=tensorboard,csv,wandb. Every key: --list-keys.

examples:
  tokenmorph pretrain --config smoke --data DIR --output-dir OUT --max-steps 8
  tokenmorph pretrain --config smoke --data wds:SHARDS --output-dir OUT --max-steps 8
  tokenmorph pretrain --config demo
  tokenmorph pretrain --config vit-b16-in1k --data /data/imagenet/train batch_size=2048 lr=3e-4
  tokenmorph pretrain --config mae-zoom-in-mask-demo
  tokenmorph pretrain --config mae-vit-b16-in1k --data /data/imagenet/train
  init_from=mae_pretrain_vit_base.pth tokenmorph pretrain --config smoke --data DIR
  init_from=OUT/export.json monitor_every=4
      \\ loggers=tensorboard,csv
  tokenmorph pretrain --config smoke framework=mae objective=zoom_in_mask teacher=pixels --data DIR
      \\ --output-dir OUT --max-steps 4"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "pretrain")
    parser.add_argument(
        "--data",
        help="training data: a folder of images (flat or class tree), fashion-mnist[:DIR], a "
        "shard folder, wds:DIR_OR_PATTERN (a stream of .tar shards), hfds:PATH (a local Hugging "
        "Face data set) or hfids:PATH (streamed)",
    )


def run(args: argparse.Namespace) -> int:
    from ..runtime.distributed import env_rank

    cfg = config_from_args(args, "pretrain", ("data", *RUN_FLAGS))
    if cfg is None:
        return 0
    from ..recipes.pretrain import pretrain

    summary = run_training(pretrain, cfg)
    if summary.get("world_size", 1) == 1 or env_rank() == 0:
        report_training(
            summary,
            f"[tokenmorph] done: {summary['steps']} steps in {summary['wall_time_s']:.0f} s "
            f"({summary['img_per_s']:.1f} img/s), final loss {format_loss(summary['final_loss'])}, "
            f"{summary['skipped_images']} undecodable images skipped; checkpoint "
            f"{summary['checkpoint']}",
        )
    return 0
