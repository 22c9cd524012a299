"""What several commands share: the run flags and config of ``pretrain``/``finetune``, the
       teacher
flags, the frozen-feature evaluation flags, and parsers for schedules and number lists.

Nothing here imports torch at module level: ``cli.py`` imports command modules to list them. A
command's ``add_arguments`` runs only when that command is asked for, so it may import the
registries its help text comes from.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..errors import ConfigError

__all__ = [
    "BACKBONE_HELP",
    "add_run_arguments",
    "config_from_args",
    "add_teacher_arguments",
    "positive",
    "positive_list",
    "add_eval_arguments",
    "add_running_arguments",
    "eval_data_from_args",
    "eval_features_from_args",
    "parse_schedule",
    "parse_int_list",
    "run_training",
    "report_training",
    "format_loss",
    "RUN_FLAGS",
]

# what every --checkpoint that takes a backbone accepts (tokenmorph.hub.backbone.resolve_encoder)
BACKBONE_HELP = (
    "the backbone: a run folder (its newest checkpoint), a pretrain checkpoint file, "
    "dtm-release:FILE (the official DTM release's), an export folder (tokenmorph export; or its "
    "older .safetensors/.json), local-dir:DIR (a timm hub folder), hf-hub:NAME or timm:NAME"
)

# The flags of add_run_arguments that set config keys of the same name.
RUN_FLAGS = ("output_dir", "max_steps", "save_every", "device", "apply_changes")


# ----------------------------------------------------------------------------------- pretrain /
# finetune
def add_run_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """The flags every ``tokenmorph pretrain|finetune`` takes (config, overrides, run folder,
    length)."""
    parser.add_argument(
        "--config", help=f"shipped {kind} config (see --list-configs) or a YAML file"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lr=1e-3"
    )
    parser.add_argument(
        "--output-dir",
        help="run folder (checkpoints, metrics.jsonl, tb/); resumed if it holds checkpoints",
    )
    parser.add_argument(
        "--max-steps", type=int, help="stop after N optimiser steps (the schedule spans N steps)"
    )
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps")
    parser.add_argument(
        "--apply-changes",
        action="store_true",
        default=None,
        help="resume a run folder with changed settings, applied from its current step (the "
        "schedules follow the new values; recorded in run_history.jsonl); without it a resume "
        "with changed settings is refused",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where to train (default from the config: auto)",
    )
    parser.add_argument(
        "--list-configs", action="store_true", help=f"print the shipped {kind} configs and exit"
    )
    parser.add_argument(
        "--list-keys", action="store_true", help="print every config key with its default and exit"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


def config_from_args(args, kind: str, flags: Sequence[str]):
    """The validated config of a ``tokenmorph pretrain|finetune`` invocation: ``--config`` plus
    KEY=VALUE overrides plus the given ``flags`` (argparse dests named like config keys).
    ``--list-configs``, ``--list-keys`` and ``--print-config`` print and return None."""
    import yaml

    from ..recipes.config import config_names, describe_keys, load_config, parse_overrides

    if args.list_configs:
        print("\n".join(config_names(kind)))
        return None
    if args.list_keys:
        print(describe_keys(kind))
        return None
    if not args.config:
        raise ConfigError(
            f"--config is required: a YAML file or one of {', '.join(config_names(kind))}"
        )
    overrides = parse_overrides(args.overrides)
    for key in flags:
        if getattr(args, key) is not None:
            overrides[key] = str(getattr(args, key))
    cfg = load_config(args.config, overrides, kind=kind)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return None
    return cfg


def report_training(summary: dict, done_line: str) -> None:
    """Print how a training invocation ended, then its summary as one JSON line: ``done_line``
    for a run that finished now, a line saying so for one finished earlier (nothing was done), or
    where it stopped (``stop_after``) and how to go on."""
    from ..runtime.run_logger import dump_json

    if summary.get("already_finished"):
        print(
            f"[tokenmorph] already finished: {summary['steps']} steps; checkpoint "
            f"{summary['checkpoint']}"
        )
    elif not summary.get("finished"):
        print(
            f"[tokenmorph] stopped at step {summary['steps']} of {summary['total_steps']} "
            f"(stop_after) after {summary['wall_time_s']:.0f} s; checkpoint "
            f"{summary['checkpoint']}; not finished: rerun the same command to go on"
        )
    else:
        print(done_line)
    print(dump_json(summary))


def format_loss(value) -> str:
    """A loss for a message: 4 decimals, or n/a when there is none (no step trained)."""
    return "n/a" if value is None else f"{value:.4f}"


def run_training(train, cfg) -> dict | None:
    """``train(cfg)`` (a recipe), leaving the process group afterwards whatever happens."""
    from ..runtime.distributed import shutdown_distributed

    try:
        return train(cfg)
    finally:
        shutdown_distributed()


# --------------------------------------------------------------------------------------------
# teachers
def add_teacher_arguments(
    parser: argparse.ArgumentParser, default: str | None, help_text: str
) -> None:
    """The teacher flags of the commands that turn images into tokens (viz morph, analyze
    consistency)."""
    parser.add_argument("--teacher", default=default, metavar="NAME", help=help_text)
    parser.add_argument("--teacher-weights", metavar="FILE", help="teacher state-dict file")
    parser.add_argument("--random-init", action="store_true", help="random teacher weights (tests)")
    parser.add_argument(
        "--teacher-input-size",
        type=int,
        metavar="N",
        help="side the teacher sees (default: its own)",
    )


# ----------------------------------------------------------------------------------
# frozen-feature eval
def positive(kind=int):
    """argparse ``type=``: ``kind(text)``, refused unless > 0."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    return convert


def positive_list(kind=int):
    """argparse ``type=``: ``"1e-3,0.01"`` -> ``[0.001, 0.01]``, every item a positive ``kind``."""
    item = positive(kind)

    def convert(text: str) -> list:
        values = [item(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
        return values

    return convert


def add_backbone_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "backbone" flags of the frozen-feature programs (``--checkpoint``, ``--random-init``);
    returns the group, for the program's own backbone flags."""
    g = parser.add_argument_group("backbone")
    g.add_argument("--checkpoint", required=True, metavar="CKPT", help=BACKBONE_HELP)
    g.add_argument(
        "--random-init", action="store_true", help="timm:NAME with random weights (no download)"
    )
    return g


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every frozen-feature evaluation program takes: backbone, data, extraction,
    output."""
    from ..data import TINY_IMAGE_SIDE

    g = add_backbone_arguments(parser)
    g.add_argument(
        "--img-size", type=positive(int), help="timm:NAME input side (default: the model's)"
    )
    g.add_argument(
        "--pool",
        choices=["cls", "mean"],
        default="cls",
        help="feature: the CLS token, or the mean of the patch tokens (default cls)",
    )
    d = parser.add_argument_group("data: --dataset fashion-mnist, or --train DIR --val DIR")
    d.add_argument(
        "--dataset",
        metavar="NAME",
        help="fashion-mnist[:DIR]: its train split is the train set, its test split the val set",
    )
    d.add_argument(
        "--train", metavar="DIR", help="ImageFolder tree DIR/CLASS/IMAGE of training images"
    )
    d.add_argument(
        "--val", metavar="DIR", help="ImageFolder tree of validation images (the same classes)"
    )
    d.add_argument(
        "--crop-pct",
        type=positive(float),
        help="centre-crop fraction of the evaluation view (default 0.875; 1.0, a plain resize, "
        f"when the images' short side is at most {TINY_IMAGE_SIDE} px, e.g. Fashion-MNIST)",
    )
    d.add_argument(
        "--limit-train",
        type=positive(int),
        metavar="N",
        help="use N training images: a random subset drawn with --seed, the same in every run",
    )
    d.add_argument(
        "--limit-val",
        type=positive(int),
        metavar="N",
        help="use N validation images (as --limit-train)",
    )
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the --limit-* subsets and of any training (default 0)",
    )
    r = parser.add_argument_group("running")
    r.add_argument(
        "--batch-size",
        type=positive(int),
        default=256,
        help="feature extraction batch (default 256)",
    )
    add_running_arguments(r, "feature extraction")


def add_running_arguments(group, what: str) -> None:
    """The running flags of an evaluation program: --num-workers, --device, --precision (for
    ``what``), --no-progress, --out FILE.json."""
    group.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data loader workers (default min(4, CPUs))",
    )
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help=f"{what}: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on CPU)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--out", metavar="FILE.json", help="also write the result JSON here")


def eval_data_from_args(args: argparse.Namespace):
    """The :class:`~tokenmorph.eval.features.EvalData` of the evaluation flags."""
    from ..eval.features import EvalData

    return EvalData(
        dataset=args.dataset,
        train=args.train,
        val=args.val,
        crop_pct=args.crop_pct,
        limit_train=args.limit_train,
        limit_val=args.limit_val,
        seed=args.seed,
    )


def eval_features_from_args(args: argparse.Namespace):
    """``(train, val, info)`` features of the evaluation flags (see ``extract_eval_features``)."""
    from ..eval.features import extract_eval_features

    return extract_eval_features(
        args.checkpoint,
        eval_data_from_args(args),
        pool=args.pool,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        random_init=args.random_init,
        img_size=args.img_size,
    )


# -------------------------------------------------------------------------------------------
# parsers
def parse_schedule(text: str) -> list[int]:
    """'14x14' -> [14] * 14; '14,14,7' -> [14, 14, 7]; '0' -> [0]."""
    text = text.strip().lower()
    try:
        if "x" in text:
            r, k = text.split("x")
            return [int(r)] * int(k)
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"bad schedule {text!r}: use 'RxK' (e.g. 14x14) or a comma list (e.g. 14,14,7)"
        ) from None


def parse_int_list(text: str, what: str) -> list[int]:
    """'196,98,49' -> [196, 98, 49]; ``what`` names the flag in the error."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"bad {what} {text!r}: expected comma-separated integers, e.g. 196,98,49"
        ) from None
