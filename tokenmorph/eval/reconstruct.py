"""What a pixel-reconstruction checkpoint makes of an image (the program: ``tokenmorph viz
reconstruct``, :mod:`tokenmorph.commands.viz_reconstruct`; the picture:
:mod:`tokenmorph.viz.reconstruct`).

Rows are images; columns: the input the student saw (degraded, masked patches grey), the
prediction (normalised pixels turned back into pixels with each patch's clean statistics, as the
loss normalised and as in MAE's pictures, or with only the statistics of what the student saw:
``--stats``), the prediction with the visible patches pasted in (masked objectives), and the
target (the clean image of the frame the student predicts). For the misaligned objectives
everything is drawn in the zoom-in view's frame: the input sits in its centre inside the grey
border ring it never saw, and the prediction is the output grid mapped back onto the view,
exactly as the loss maps it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.teachers import PixelTeacher
from ..ops.degrade import output_to_view, view_regions
from ..ops.patches import patch_norm_stats, patchify, unpatchify
from ..recipes.objectives import PretrainObjective
from ..runtime.sampling import batch_to_device, collate_keyed

__all__ = ["reconstruct"]


def _stats(images, patch: int, norm: str):
    """(mean, scale) per patch of images (B, 3, H, W), each (B, N, p*p*3): see
    ops.patches.patch_norm_stats."""
    x = patchify(images, patch)
    mean, scale = patch_norm_stats(x, images.shape[1], norm)
    return mean.expand_as(x), scale.expand_as(x)


def reconstruct(student, cfg, images, seed: int = 0, stats: str = "target") -> dict:
    """Reconstructions of ``images`` (B, 3, V, V) in [0, 1], V the objective's view side.

    The prediction is in normalised units; ``stats`` says which per-patch statistics turn it back
    into pixels: ``"target"`` (each patch's clean statistics in the frame the student predicts,
    what the loss normalised with and what MAE's pictures use; a masked patch then shows its true
    mean colour, which the student did not predict) or ``"visible"`` (only what the student saw:
    a patch it saw unmasked at the same position keeps its own input statistics, every other
    patch gets the mean statistics of the image's visible patches).

    Returns (B, 3, H, W) float tensors in [0, 1]: ``input``, ``prediction``, ``pasted``
    (prediction with the visible input patches; None when nothing is masked) and ``target``, all
    in the output frame (the view's frame for the misaligned objectives), plus ``loss`` (the
    objective's loss on these images).
    """
    if stats not in ("visible", "target"):
        raise ValueError(f"stats must be 'visible' or 'target', got {stats!r}")
    norm = cfg.teacher_kwargs.get("norm", cfg.pixel_norm)
    grid = student.grid
    p = cfg.patch_size
    objective = PretrainObjective(PixelTeacher(p, norm), grid, cfg)
    rng = np.random.default_rng(seed)
    batch = batch_to_device(
        collate_keyed([(img, 0, objective.sample(rng)) for img in images]), images.device
    )
    with torch.no_grad():
        d, mask = objective.degrade(batch, 0)
        pred = student(d.inputs, mask).float()
        loss, _ = objective.loss(pred, d, mask, 0)
    aligned = objective.degradation.aligned
    ring = 0 if aligned else objective.ring
    frame = d.target if aligned else d.view  # the frame drawn
    fgrid = (grid[0] + 2 * ring, grid[1] + 2 * ring)
    if (
        not aligned
    ):  # the output grid covers the view: map it onto the view's patches, as the loss does
        pred = patchify(output_to_view(pred, p, grid, frame.shape[-1]), p)
    mean, scale = _stats(frame, p, norm)
    if stats == "visible":
        in_mean, in_scale = _stats(d.inputs, p, norm)
        seen = (
            torch.ones(in_mean.shape[:2], dtype=torch.bool, device=pred.device)
            if mask is None
            else ~mask
        )
        w = seen[..., None].float()
        pooled = [
            (t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
            for t in (in_mean, in_scale)
        ]
        mean, scale = pooled[0].expand_as(mean).clone(), pooled[1].expand_as(scale).clone()
        if (
            objective.degradation.name != "zoom_in"
        ):  # zoom_in's output patches never coincide with input patches
            idx = (
                view_regions(grid[0], ring)[0].to(pred.device)
                if ring
                else torch.arange(seen.shape[1], device=pred.device)
            )
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
        pasted[..., r : V - r, r : V - r] = torch.where(
            m, prediction[..., r : V - r, r : V - r], d.inputs
        )
    if ring:  # the input in the middle of the view, inside the (darker) ring it never saw
        framed = torch.full_like(frame, 0.25)
        framed[..., r : V - r, r : V - r] = shown
        shown = framed
    clamp = lambda x: None if x is None else x.clamp(0, 1)  # noqa: E731
    return {
        "input": clamp(shown),
        "prediction": clamp(prediction),
        "pasted": clamp(pasted),
        "target": clamp(frame),
        "loss": float(loss),
    }
