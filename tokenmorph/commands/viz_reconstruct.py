"""``tokenmorph viz reconstruct``: inputs, predictions and targets of a pixel-reconstruction
checkpoint."""

from __future__ import annotations

import argparse

HELP = "inputs, predictions and targets of a pixel-reconstruction run"
DESCRIPTION = """\
Draw inputs, predictions and targets of a pixel-reconstruction checkpoint (a pre-training run
with teacher=pixels, either framework and any objective) for one or more images. Each image is
cropped the way the objective's data loader crops (a centre square; the zoom-in view for zoom_in
/ zoom_in_mask) and degraded / masked with the objective's own random parameters (--seed).

  tokenmorph viz reconstruct --checkpoint runs/mae-demo --image skimage:astronaut --out rec.png

An official MAE checkpoint with its decoder (facebookresearch/mae's mae_visualize_vit_*.pth)
works too, with MAE's masking (--mask-ratio, 0.75) and pixel targets (--pixel-norm: input, the
normalised pixels those files were trained on; joint for a norm_pix_loss decoder):

  tokenmorph viz reconstruct --mae-checkpoint mae_visualize_vit_large.pth --image IMG --out rec.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="pre-training checkpoint with teacher=pixels, or its run folder (newest checkpoint)",
    )
    source.add_argument(
        "--mae-checkpoint",
        metavar="PTH",
        help="an official MAE checkpoint with its decoder (mae_visualize_vit_*.pth)",
    )
    parser.add_argument(
        "--pixel-norm",
        default="input",
        choices=["input", "joint", "per_channel", "none"],
        help="--mae-checkpoint: what its decoder predicts (default input: MAE's visualize "
        "checkpoints were trained without norm_pix_loss)",
    )
    parser.add_argument(
        "--mask-ratio",
        type=float,
        default=0.75,
        help="--mae-checkpoint: fraction of patches masked (default 0.75)",
    )
    parser.add_argument(
        "--image",
        required=True,
        nargs="+",
        metavar="IMG",
        help="image file(s), skimage:NAME (a photo that ships with scikit-image) or "
        "fashion-mnist:N (image N of the Fashion-MNIST test split)",
    )
    parser.add_argument("--out", required=True, metavar="PNG", help="picture to write")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the masks and degradation parameters"
    )
    parser.add_argument(
        "--stats",
        default="target",
        choices=["target", "visible"],
        help="statistics that turn normalised predictions into pixels: target = each patch's clean "
        "statistics, as the loss normalised (default; MAE's pictures), visible = only what the "
        "student saw (masked patches get the mean statistics of the visible ones)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_image
    from ..errors import ConfigError
    from ..eval.reconstruct import reconstruct
    from ..hub.backbone import load_pretrain_checkpoint
    from ..models import student_from_checkpoint
    from ..recipes.config import config_from_checkpoint
    from ..recipes.objectives import resolve_loss, view_side
    from ..viz import save_reconstruction_figure

    if args.mae_checkpoint is not None:
        student, cfg, step = _official_mae(args)
    else:
        ckpt, path, record = load_pretrain_checkpoint(args.checkpoint, "viz reconstruct")
        cfg = config_from_checkpoint(ckpt)
        if cfg.teacher != "pixels":
            raise ConfigError(
                f"{path} predicts {cfg.teacher} teacher tokens, not pixels: viz reconstruct needs "
                "a run with teacher=pixels"
            )
        student, step = student_from_checkpoint(ckpt, record, str(path)), record.step
    images = torch.stack([load_image(p, view_side(cfg)) for p in args.image])
    student = student.eval().to(args.device)
    result = reconstruct(student, cfg, images.to(args.device), args.seed, args.stats)
    title = (
        f"{cfg.framework} framework, objective {cfg.objective}, {resolve_loss(cfg)} loss "
        f"{result['loss']:.3f}, step {step}, {args.stats} statistics"
    )
    out = save_reconstruction_figure(result, args.out, title)
    print(f"wrote {out} ({len(args.image)} image(s), {title})")
    return 0


def _official_mae(args):
    """(student, config, step label) of an official MAE checkpoint with its decoder."""
    from ..errors import CheckpointError
    from ..hub.mae_checkpoint import mae_student_from_checkpoint
    from ..recipes.config import PretrainConfig

    student, layout, arch = mae_student_from_checkpoint(args.mae_checkpoint)
    if layout != "visualize":
        raise CheckpointError(
            f"{args.mae_checkpoint} holds MAE's encoder only: viz reconstruct needs a checkpoint "
            "with the decoder (mae_visualize_vit_*.pth)"
        )
    cfg = PretrainConfig(
        framework="mae",
        objective="mask",
        teacher="pixels",
        pixel_norm=args.pixel_norm,
        mask_ratio=args.mask_ratio,
        img_size=arch["img_size"],
        patch_size=arch["patch_size"],
        seed=args.seed,
        data="imagenet",
    ).validate()
    return student, cfg, "MAE release"
