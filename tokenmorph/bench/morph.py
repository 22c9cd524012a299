"""``tokenmorph bench morph``: the DTM loss forward + backward of tokenmorph against the
   release's
dense formulation, in the same run, with the loss and gradient differences."""

from __future__ import annotations

import platform
from collections.abc import Sequence

import torch

from ..ops.losses import dtm_loss
from .release import release_dense_dtm_loss
from .timing import timeit

__all__ = ["bench_morph"]


def bench_morph(
    batch: int = 64,
    tokens: int = 196,
    dim: int = 512,
    schedules: Sequence[Sequence[int]] = ((14,) * 14, (7,) * 10),
    repeats: int = 5,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """DTM loss forward + backward: tokenmorph vs the release's dense formulation, fp32."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, tokens, dim, generator=gen).to(device)
    pred0 = torch.randn(batch, tokens, dim, generator=gen).to(device)
    schedules = [list(s) for s in schedules]

    def run(loss_fn):
        pred = pred0.clone().requires_grad_(True)
        loss = loss_fn(pred, target, schedules)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return loss.detach(), pred.grad

    ours = lambda p, t, s: dtm_loss(p, t, s)  # noqa: E731
    dense = lambda p, t, s: release_dense_dtm_loss(p, t, s)  # noqa: E731
    loss_ours, grad_ours = run(ours)
    loss_dense, grad_dense = run(dense)
    t_ours = timeit(lambda: run(ours), repeats)
    t_dense = timeit(lambda: run(dense), repeats)
    return {
        "benchmark": "morph",
        "what": "DTM loss forward+backward, fp32",
        "batch": batch,
        "tokens": tokens,
        "dim": dim,
        "schedules": schedules,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "tokenmorph_s": t_ours["median_s"],
        "dense_s": t_dense["median_s"],
        "speedup": t_dense["median_s"] / t_ours["median_s"],
        "repeats": repeats,
        "loss_tokenmorph": float(loss_ours),
        "loss_dense": float(loss_dense),
        "loss_abs_diff": float((loss_ours - loss_dense).abs()),
        "grad_max_abs_diff": float((grad_ours - grad_dense).abs().max()),
    }
