"""``tokenmorph viz reconstruct``: what a pixel-reconstruction checkpoint makes of an image.

Rows are images; columns: the input the student saw (degraded, masked patches grey), the prediction
(normalised pixels turned back into pixels with each patch's clean statistics, as the loss normalised
and as in MAE's pictures, or with only the statistics of what the student saw: ``--stats``), the prediction with the visible patches pasted in (masked objectives), and the target (the clean
image of the frame the student predicts). For the misaligned objectives everything is drawn in the
zoom-in view's frame: the input sits in its centre inside the grey border ring it never saw, and the
prediction is the output grid mapped back onto the view, exactly as the loss maps it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["DESCRIPTION", "reconstruct", "save_reconstruction_figure", "add_arguments", "run"]

DESCRIPTION = """\
Draw inputs, predictions and targets of a pixel-reconstruction checkpoint (a pre-training run with
teacher=pixels, either framework and any objective) for one or more images. Each image is cropped the
way the objective's data loader crops (a centre square; the zoom-in view for zoom_in / zoom_in_mask)
and degraded / masked with the objective's own random parameters (--seed).

  tokenmorph viz reconstruct --checkpoint runs/mae-demo --image skimage:astronaut --out rec.png
"""


def _cfg_from_checkpoint(ckpt: dict):
    from dataclasses import fields

    from .config import PretrainConfig

    known = {f.name for f in fields(PretrainConfig)}
    return PretrainConfig(**{k: v for k, v in ckpt.get("config", {}).items() if k in known})


def _stats(images, patch: int, norm: str):
    """(mean, scale) per patch of images (B, 3, H, W), each (B, N, p*p*3): see teachers.patch_norm_stats."""
    from .images import patchify
    from .teachers import patch_norm_stats

    x = patchify(images, patch)
    mean, scale = patch_norm_stats(x, images.shape[1], norm)
    return mean.expand_as(x), scale.expand_as(x)


def reconstruct(student, cfg, images, seed: int = 0, stats: str = "target") -> dict:
    """Reconstructions of ``images`` (B, 3, V, V) in [0, 1], V the objective's view side.

    The prediction is in normalised units; ``stats`` says which per-patch statistics turn it back into
    pixels: ``"target"`` (each patch's clean statistics in the frame the student predicts, what the loss
    normalised with and what MAE's pictures use; a masked patch then shows its true mean colour, which
    the student did not predict) or ``"visible"`` (only what the student saw: a patch it saw unmasked at
    the same position keeps its own input statistics, every other patch gets the mean statistics of the
    image's visible patches).

    Returns (B, 3, H, W) float tensors in [0, 1]: ``input``, ``prediction``, ``pasted`` (prediction with
    the visible input patches; None when nothing is masked) and ``target``, all in the output frame (the
    view's frame for the misaligned objectives), plus ``loss`` (the objective's loss on these images).
    """
    import numpy as np
    import torch

    from .degrade import output_to_view, view_regions
    from .images import patchify, unpatchify
    from .objectives import PretrainObjective
    from .teachers import PixelTeacher
    from .train import batch_to_device, collate_keyed

    if stats not in ("visible", "target"):
        raise ValueError(f"stats must be 'visible' or 'target', got {stats!r}")
    norm = cfg.teacher_kwargs.get("norm", cfg.pixel_norm)
    grid = student.grid
    p = cfg.patch_size
    objective = PretrainObjective(PixelTeacher(p, norm), grid, cfg)
    rng = np.random.default_rng(seed)
    batch = batch_to_device(collate_keyed([(img, 0, objective.sample(rng)) for img in images]), images.device)
    with torch.no_grad():
        d, mask = objective.degrade(batch, 0)
        pred = student(d.inputs, mask).float()
        loss, _ = objective.loss(pred, d, mask, 0)
    aligned = objective.degradation.aligned
    ring = 0 if aligned else objective.ring
    frame = d.target if aligned else d.view  # the frame drawn
    fgrid = (grid[0] + 2 * ring, grid[1] + 2 * ring)
    if not aligned:  # the output grid covers the view: map it onto the view's patches, as the loss does
        pred = patchify(output_to_view(pred, p, grid, frame.shape[-1]), p)
    mean, scale = _stats(frame, p, norm)
    if stats == "visible":
        in_mean, in_scale = _stats(d.inputs, p, norm)
        seen = torch.ones(in_mean.shape[:2], dtype=torch.bool, device=pred.device) if mask is None else ~mask
        w = seen[..., None].float()
        pooled = [(t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1) for t in (in_mean, in_scale)]
        mean, scale = pooled[0].expand_as(mean).clone(), pooled[1].expand_as(scale).clone()
        if objective.degradation.name != "zoom_in":  # zoom_in's output patches never coincide with input patches
            idx = view_regions(grid[0], ring)[0].to(pred.device) if ring else torch.arange(seen.shape[1], device=pred.device)
            keep = seen[..., None]
            mean[:, idx] = torch.where(keep, in_mean, mean[:, idx])
            scale[:, idx] = torch.where(keep, in_scale, scale[:, idx])
    prediction = unpatchify(pred * scale + mean, p, fgrid)
    r = ring * p
    V = frame.shape[-1]
    shown = d.inputs
    pasted = None
    if mask is not None:  # masked patches grey; the visible ones pasted into the prediction
        m = unpatchify(mask[..., None].float().expand(-1, -1, p * p * 3), p, grid).bool()
        shown = torch.where(m, torch.full_like(shown, 0.5), shown)
        pasted = prediction.clone()
        pasted[..., r:V - r, r:V - r] = torch.where(m, prediction[..., r:V - r, r:V - r], d.inputs)
    if ring:  # the input in the middle of the view, inside the (darker) ring it never saw
        framed = torch.full_like(frame, 0.25)
        framed[..., r:V - r, r:V - r] = shown
        shown = framed
    clamp = lambda x: None if x is None else x.clamp(0, 1)  # noqa: E731
    return {"input": clamp(shown), "prediction": clamp(prediction), "pasted": clamp(pasted), "target": clamp(frame),
            "loss": float(loss)}


def save_reconstruction_figure(result: dict, out, title: str = "", dpi: int = 120) -> Path:
    """One row per image: input | prediction | prediction + visible | target."""
    from .viz import _pyplot, _save

    cols = [("input", "input"), ("prediction", "prediction"), ("pasted", "prediction + visible"), ("target", "target")]
    cols = [(k, label) for k, label in cols if result[k] is not None]
    n = result["input"].shape[0]
    plt = _pyplot()
    fig, axes = plt.subplots(n, len(cols), figsize=(2.4 * len(cols), 2.4 * n + (0.4 if title else 0)), squeeze=False)
    for i in range(n):
        for j, (k, label) in enumerate(cols):
            ax = axes[i][j]
            ax.imshow(result[k][i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, dpi)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="pre-training checkpoint with teacher=pixels, or its run folder (newest checkpoint)")
    parser.add_argument("--image", required=True, nargs="+", metavar="IMG",
                        help="image file(s), skimage:NAME (a photo that ships with scikit-image) or fashion-mnist:N "
                             "(image N of the Fashion-MNIST test split)")
    parser.add_argument("--out", required=True, metavar="PNG", help="picture to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks and degradation parameters")
    parser.add_argument("--stats", default="target", choices=["target", "visible"],
                        help="statistics that turn normalised predictions into pixels: target = each patch's clean "
                             "statistics, as the loss normalised (default; MAE's pictures), visible = only what the "
                             "student saw (masked patches get the mean statistics of the visible ones)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def run(args: argparse.Namespace) -> int:
    import torch

    from .backbone import load_pretrain_checkpoint, student_from_checkpoint
    from .cli import CLIError
    from .images import load_image
    from .objectives import resolve_loss, view_side

    ckpt, path = load_pretrain_checkpoint(args.checkpoint, "viz reconstruct")
    cfg = _cfg_from_checkpoint(ckpt)
    if cfg.teacher != "pixels":
        raise CLIError(f"{path} predicts {cfg.teacher} teacher tokens, not pixels: viz reconstruct needs a run with "
                       f"teacher=pixels")
    try:
        images = torch.stack([load_image(p, view_side(cfg)) for p in args.image])
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    student = student_from_checkpoint(ckpt).eval().to(args.device)
    result = reconstruct(student, cfg, images.to(args.device), args.seed, args.stats)
    title = (f"{cfg.framework} framework, objective {cfg.objective}, {resolve_loss(cfg)} loss "
             f"{result['loss']:.3f}, step {ckpt.get('step')}, {args.stats} statistics")
    out = save_reconstruction_figure(result, args.out, title)
    print(f"wrote {out} ({len(args.image)} image(s), {title})")
    return 0
