"""The official release's DTM formulation, as it computes it, for the benchmarks' baseline: a
   dense
(B, n, N) membership matrix per iteration and aggregation by matrix products."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "release_dense_membership",
    "release_dense_dtm_loss",
    "release_precision",
]


def release_dense_membership(
    tokens: torch.Tensor, schedule: Sequence[int], half: bool = False
) -> torch.Tensor:
    """The release's morphing, as it computes it: (B, N, D) -> binary membership (B, G, N).

    Every iteration normalises the size-weighted group features, matches the alternating halves
    with a (B, n/2, n/2) similarity product, merges features (``x * size`` summed) and the (B, n,
    N) source matrix with gather/scatter. First token protected (the release's class-token flag).
    ``half=True`` emulates the release under fp16 autocast: features and merges in fp16, the
    norm in fp32 (autocast's fp32 list), the similarity product in fp16 (ties in the maxima then
    break by index here, by CUDA's unstable sort in the release).
    """
    B, N, D = tokens.shape
    x = tokens.detach().half() if half else tokens.detach().float()
    size = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
    for r in schedule:
        t = x.shape[1]
        r = min(int(r), (t - 1) // 2)
        if r <= 0:
            continue
        metric = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = metric[:, ::2], metric[:, 1::2]
        if half:
            a, b = a.half(), b.half()
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


def release_dense_dtm_loss(
    pred: torch.Tensor, target: torch.Tensor, schedules, beta: float = 2.0
) -> torch.Tensor:
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


def release_precision(device_type: str) -> torch.dtype | None:
    """The autocast dtype of the release's step on a device: fp16 on CUDA (its
    ``torch.cuda.amp.autocast()`` around the teacher, the student, matching and loss), None
    (fp32) on a CPU, where that autocast changes nothing."""
    return torch.float16 if device_type == "cuda" else None
