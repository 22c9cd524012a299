"""What a pixel-reconstruction checkpoint makes of an image (the program: ``tokenmorph viz
reconstruct``, :mod:`tokenmorph.commands.viz_reconstruct`; the picture:
:mod:`tokenmorph.viz.reconstruct`).

Rows are images; columns: the input the student saw (degraded, masked patches grey), the
prediction (normalised pixels turned back into pixels with each patch's clean statistics, as the
loss normalised and as in MAE's pictures, or with only the statistics of what the student saw:
``--stats``), the prediction with the visible patches pasted in (masked objectives), and the
target (the clean image). For the zoom-in objectives everything is drawn in the view's frame:
the input sits in its centre inside the grey border ring it never saw, and the prediction is the
output grid mapped back onto the view, as the loss maps it; for zoom-out, in the canvas frame,
the prediction mapped onto the canvas as the loss maps it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.teachers import PixelTeacher
from ..ops.degrade import content_to_canvas
from ..ops.patches import area_resize, patchify, unpatchify
from ..recipes.objectives import PretrainObjective
from ..runtime.sampling import batch_to_device, collate_keyed

__all__ = ["reconstruct"]


def _stats(teacher: PixelTeacher, images):
    """(mean, scale) per patch of images (B, 3, H, W), each (B, N, p*p*3): the teacher's
    normalisation (:func:`tokenmorph.ops.patches.patch_norm_stats`)."""
    x = patchify(images, teacher.patch_size)
    mean, scale = teacher.stats(x)
    return mean.expand_as(x), scale.expand_as(x)


def reconstruct(student, cfg, images, seed: int = 0, stats: str = "target") -> dict:
    """Reconstructions of ``images`` (B, 3, V, V) in [0, 1], V the objective's view side.

    The prediction is in normalised units of the output frame (the frame the student predicts);
    ``stats`` says which per-patch statistics turn it back into pixels there: ``"target"``
    (each patch's clean statistics, what the loss normalised with and what MAE's pictures use;
    a masked patch then shows its true mean colour, which the student did not predict) or
    ``"visible"`` (only what the student saw: the mean statistics of the visible input patches,
    and, where input and output frames coincide, a patch seen unmasked keeps its own). The
    pixels are then drawn in the frame the loss compares in: the input frame, the zoom-in view
    (area interpolation) or the zoom-out canvas (area resize + symmetric padding).

    Returns (B, 3, H, W) float tensors in [0, 1]: ``input``, ``prediction``, ``pasted``
    (prediction with the visible input patches; None when nothing is masked) and ``target``, all
    in the drawn frame, plus ``loss`` (the objective's loss on these images).
    """
    if stats not in ("visible", "target"):
        raise ValueError(f"stats must be 'visible' or 'target', got {stats!r}")
    norm = cfg.teacher_kwargs.get("norm", cfg.pixel_norm)
    grid = student.grid
    p = cfg.patch_size
    mean_std = tuple(student.mean.flatten().tolist()), tuple(student.std.flatten().tolist())
    teacher = PixelTeacher(p, norm, mean=mean_std[0], std=mean_std[1])
    objective = PretrainObjective(teacher, grid, cfg, mean_std)
    rng = np.random.default_rng(seed)
    batch = batch_to_device(
        collate_keyed([(img, 0, objective.sample(rng)) for img in images]), images.device
    )
    with torch.no_grad():
        d, mask = objective.degrade(batch, 0)
        pred = student(d.inputs, mask).float()
        loss, _ = objective.loss(pred, d, mask, 0)
    degradation = objective.degradation
    mean, scale = _stats(teacher, d.target)
    if stats == "visible":
        in_mean, in_scale = _stats(teacher, d.inputs)
        seen = torch.ones(in_mean.shape[:2], dtype=torch.bool, device=pred.device)
        seen = seen if mask is None else ~mask
        w = seen[..., None].float()
        pooled = [
            (t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
            for t in (in_mean, in_scale)
        ]
        mean, scale = pooled[0].expand_as(mean), pooled[1].expand_as(scale)
        if degradation.aligned:  # a patch seen unmasked at the same position keeps its own
            mean = torch.where(seen[..., None], in_mean, mean)
            scale = torch.where(seen[..., None], in_scale, scale)
    prediction = unpatchify(pred * scale + mean, p, grid)
    shown, ring = d.inputs, 0
    if d.view is not None:  # zoom-in: the output frame covers the whole view
        frame, ring = d.view, objective.ring * p
        prediction = area_resize(prediction, frame.shape[-1])
    elif d.offsets is not None:  # zoom-out: the output frame is the content, drawn on the canvas
        content = degradation.content
        frame = content_to_canvas(d.target, content, d.offsets)
        prediction = content_to_canvas(prediction, content, d.offsets)
    else:
        frame = d.target
    V = frame.shape[-1]
    pasted = None
    if mask is not None:  # masked patches grey; the visible ones pasted into the prediction
        m = unpatchify(mask[..., None].float().expand(-1, -1, p * p * 3), p, grid).bool()
        shown = torch.where(m, torch.full_like(shown, 0.5), shown)
        pasted = prediction.clone()
        pasted[..., ring : V - ring, ring : V - ring] = torch.where(
            m, prediction[..., ring : V - ring, ring : V - ring], d.inputs
        )
    if ring:  # the input in the middle of the view, inside the (darker) ring it never saw
        framed = torch.full_like(frame, 0.25)
        framed[..., ring : V - ring, ring : V - ring] = shown
        shown = framed
    clamp = lambda x: None if x is None else x.clamp(0, 1)  # noqa: E731
    return {
        "input": clamp(shown),
        "prediction": clamp(prediction),
        "pasted": clamp(pasted),
        "target": clamp(frame),
        "loss": float(loss),
    }
