"""``tokenmorph export``: a pre-training checkpoint's student encoder as timm weights and a JSON
recipe."""

from __future__ import annotations

import argparse
import json

HELP = "export a student encoder as a timm-loadable safetensors file"
DESCRIPTION = """\
Export the student encoder of a pre-training checkpoint (a file, or a run folder: its newest
checkpoint) as a timm-compatible state dict in OUT.safetensors, and OUT.json with the timm model
name and keyword arguments that rebuild it. Load it in timm, strictly (no missing or unexpected
keys):

  spec = json.load(open("OUT.json"))
  model = timm.create_model(spec["timm_model"], pretrained=True,
                            pretrained_cfg_overlay=dict(file="OUT.safetensors"), **spec["kwargs"])

model.forward_features(x) gives the same tokens as tokenmorph's encoder for x normalised with the
checkpoint's mean/std (in OUT.json, and in model.pretrained_cfg for
timm.data.resolve_data_config). Add num_classes=K (and e.g. drop_path_rate=0.1) to the kwargs to
fine-tune: timm adds a new head.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="pre-training checkpoint file, a run folder (newest checkpoint), or dtm-release:FILE "
        "(a checkpoint of the official DTM release)",
    )
    parser.add_argument(
        "out", metavar="OUT.safetensors", help="weights file to write; the recipe goes to OUT.json"
    )
    parser.add_argument(
        "--global-pool",
        default="avg",
        choices=["avg", "token", "", "none"],
        metavar="{avg,token,none}",
        help="timm pooling: avg = mean of the normalised patch tokens (default), token = CLS "
        "token, none (or '') = model(x) returns the tokens; forward_features and the weights "
        "are the same",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite OUT.safetensors and OUT.json if they exist"
    )


def run(args: argparse.Namespace) -> int:
    """Write the files, print a one-line summary and the one-line timm call."""
    from ..hub.export import export_encoder, timm_call

    pool = "" if args.global_pool == "none" else args.global_pool
    weights, json_path = export_encoder(
        args.checkpoint, args.out, global_pool=pool, force=args.force
    )
    spec = json.loads(json_path.read_text())
    print(
        f"exported the {spec['student_size']} {spec['framework']} encoder "
        f"({spec['num_params'] / 1e6:.1f} M "
        f"params, {spec['depth']} blocks, {spec['img_size']} px, patch {spec['patch_size']}, "
        f"global_pool={pool!r}) "
        f"of {spec['source_checkpoint']} (step {spec['step']}) to {weights} and {json_path}"
    )
    print(timm_call(spec, weights, json_path))
    return 0
