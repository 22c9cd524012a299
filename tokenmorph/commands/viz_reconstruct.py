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
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="pre-training checkpoint with teacher=pixels, or its run folder (newest checkpoint)",
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

    ckpt, path, record = load_pretrain_checkpoint(args.checkpoint, "viz reconstruct")
    cfg = config_from_checkpoint(ckpt)
    if cfg.teacher != "pixels":
        raise ConfigError(
            f"{path} predicts {cfg.teacher} teacher tokens, not pixels: viz reconstruct needs a "
            "run with "
            f"teacher=pixels"
        )
    images = torch.stack([load_image(p, view_side(cfg)) for p in args.image])
    student = student_from_checkpoint(ckpt, record, str(path)).eval().to(args.device)
    result = reconstruct(student, cfg, images.to(args.device), args.seed, args.stats)
    title = (
        f"{cfg.framework} framework, objective {cfg.objective}, {resolve_loss(cfg)} loss "
        f"{result['loss']:.3f}, step {record.step}, {args.stats} statistics"
    )
    out = save_reconstruction_figure(result, args.out, title)
    print(f"wrote {out} ({len(args.image)} image(s), {title})")
    return 0
