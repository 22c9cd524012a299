"""``tokenmorph export``: a pre-training checkpoint's student encoder in timm's hub format (or as
one safetensors file with a JSON recipe), optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json

HELP = "export a student encoder in timm's hub format (config.json + model.safetensors)"
DESCRIPTION = """\
Export the student encoder of a pre-training checkpoint (a file, or a run folder: its newest
checkpoint) for timm.

OUT a folder (the default format, timm's own hub format): config.json, model.safetensors and a
README.md model card, written by timm's save_for_hf. timm loads it strictly with no other
argument, also without tokenmorph installed:

  model = timm.create_model("local-dir:OUT", pretrained=True)

--push-to-hub REPO then uploads the folder to the Hugging Face Hub (huggingface_hub, a network
and a token needed), after which timm.create_model("hf-hub:REPO", pretrained=True) loads it.

OUT.safetensors (the older format): the weights, and OUT.json with the timm model name and
keyword arguments that rebuild the encoder (the printed one-line call loads it).

Either way model.forward_features(x) gives the same tokens as tokenmorph's encoder for x
normalised with the checkpoint's mean/std (in model.pretrained_cfg, for
timm.data.resolve_data_config). Add num_classes=K to create_model to fine-tune: timm adds a new
head and loads everything else. Every command that takes a backbone (--checkpoint) accepts the
export, as OUT, local-dir:OUT or hf-hub:REPO.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="pre-training checkpoint file, a run folder (newest checkpoint), or dtm-release:FILE "
        "(a checkpoint of the official DTM release)",
    )
    parser.add_argument(
        "out",
        metavar="OUT",
        help="folder to write in timm's hub format, or OUT.safetensors for the older "
        "weights + OUT.json recipe",
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
    parser.add_argument("--force", action="store_true", help="replace an existing export at OUT")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload the hub folder to this Hugging Face Hub repository (created if "
        "missing; needs huggingface_hub, a network and a token)",
    )
    parser.add_argument(
        "--private", action="store_true", help="with --push-to-hub: create the repository private"
    )


def run(args: argparse.Namespace) -> int:
    """Write the files, print a one-line summary and the one-line timm call (then push)."""
    from ..errors import ConfigError
    from ..hub.export import (
        HUB_CONFIG,
        export_encoder,
        export_hub,
        push_to_hub,
        timm_call,
    )

    pool = "" if args.global_pool == "none" else args.global_pool
    if str(args.out).endswith(".safetensors"):
        if args.push_to_hub:
            raise ConfigError(
                "--push-to-hub uploads timm's hub format: give a folder as OUT, not a .safetensors"
            )
        weights, json_path = export_encoder(
            args.checkpoint, args.out, global_pool=pool, force=args.force
        )
        spec = json.loads(json_path.read_text())
        where, call = f"{weights} and {json_path}", timm_call(spec, weights, json_path)
    else:
        folder = export_hub(args.checkpoint, args.out, global_pool=pool, force=args.force)
        spec = json.loads((folder / HUB_CONFIG).read_text())["tokenmorph"]
        where = str(folder)
        call = f"timm.create_model({'local-dir:' + str(folder.resolve())!r}, pretrained=True)"
    print(
        f"exported the {spec['student_size']} {spec['framework']} encoder "
        f"({spec['num_params'] / 1e6:.1f} M "
        f"params, {spec['depth']} blocks, {spec['img_size']} px, patch {spec['patch_size']}, "
        f"global_pool={pool!r}) "
        f"of {spec['source_checkpoint']} (step {spec['step']}) to {where}"
    )
    print(call)
    if args.push_to_hub:
        repo = push_to_hub(args.out, args.push_to_hub, private=args.private)
        print(
            f"pushed to https://huggingface.co/{repo}: timm.create_model('hf-hub:{repo}', "
            "pretrained=True)"
        )
    return 0
