"""Benchmarks that print numbers (``tokenmorph bench ...``): where a step's time goes.

``bench morph`` times the DTM loss forward + backward of this library against the official release's
dense formulation (:func:`release_dense_dtm_loss`, reproduced here as the baseline) in the same run, and
checks that both give the same loss.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .losses import dtm_loss

__all__ = ["release_dense_membership", "release_dense_dtm_loss", "bench_morph", "timeit"]


def release_dense_membership(tokens: torch.Tensor, schedule: Sequence[int]) -> torch.Tensor:
    """The release's morphing, as it computes it: (B, N, D) -> binary membership (B, G, N).

    Every iteration normalises the size-weighted group features, matches the alternating halves with a
    (B, n/2, n/2) similarity product, merges features (``x * size`` summed) and the (B, n, N) source
    matrix with gather/scatter. First token protected (the release's class-token flag).
    """
    B, N, D = tokens.shape
    x = tokens.detach().float()
    size = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
    for r in schedule:
        t = x.shape[1]
        r = min(int(r), (t - 1) // 2)
        if r <= 0:
            continue
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1).values
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)

        def merge(y: torch.Tensor, reduce: str) -> torch.Tensor:
            src, dst = y[:, ::2], y[:, 1::2]
            c = y.shape[-1]
            unm = src.gather(1, unm_idx.expand(-1, -1, c))
            src = src.gather(1, src_idx.expand(-1, -1, c))
            dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), src, reduce=reduce)
            return torch.cat([unm, dst], dim=1)

        x = merge(x * size, "sum")
        size = merge(size, "sum")
        x = x / size
        source = merge(source, "amax")
    return source


def release_dense_dtm_loss(pred: torch.Tensor, target: torch.Tensor, schedules, beta: float = 2.0) -> torch.Tensor:
    """The release's DTM loss: dense aggregation ``source @ x / size``, broadcast back with
    ``source^T @``, smooth-L1 mean over all B x N x C, averaged over levels."""
    losses = []
    for schedule in schedules:
        source = release_dense_membership(target, schedule)
        size = source.sum(-1, keepdim=True)
        u = source.transpose(1, 2) @ ((source @ pred) / size)
        v = source.transpose(1, 2) @ ((source @ target) / size)
        losses.append(F.smooth_l1_loss(u, v, beta=beta))
    return torch.stack(losses).mean()


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median and min wall time (seconds) of ``fn`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


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
