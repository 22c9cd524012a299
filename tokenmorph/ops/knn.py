"""Weighted k-NN classification of features (DINO's protocol, after InstDisc), and top-k hits
of class scores. Pure tensor functions: the evaluation program (:mod:`tokenmorph.eval.knn`) and
the k-NN monitor of pre-training (:mod:`tokenmorph.runtime.monitor`) both call
:func:`weighted_knn`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["topk_correct", "weighted_knn"]


def topk_correct(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 hits of class scores ``(..., B, C)`` against ``labels`` (B,): two bool
    tensors ``(..., B)``. Equal scores rank by class index (e.g. the classes no k-NN neighbour
    voted for); with fewer than 5 classes, top-5 is top-C (always a hit)."""
    top = scores.sort(dim=-1, descending=True, stable=True).indices[..., :5]
    hits = top == labels.unsqueeze(-1)
    return hits[..., 0], hits.any(dim=-1)


def weighted_knn(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Weighted k-NN accuracy of ``test_feats`` against ``train_feats``.

    Features are L2-normalised; each query's k most cosine-similar training features vote for
    their class with weight exp(similarity / ``temperature``); the class with the largest total
    wins.

    Args:
        train_feats: (N, D) features; train_labels: (N,) int64 in [0, num_classes).
        test_feats: (M, D) features; test_labels: (M,) int64.
        ks: neighbour counts; each is capped at N (so duplicates after capping merge).
        num_classes: C (default: the largest label + 1).
        chunk_size: queries per chunk. Peak extra memory is about chunk_size x N similarities (4
            bytes each).
        on_chunk: called with the number of queries of each chunk done (progress).

    Returns:
        ``{k: {"top1": float, "top5": float}}`` for each capped k, ascending; fractions in [0,
        1]. Top-5 is top-C when C < 5. Everything runs on ``train_feats``' device.
    """
    n_train, n_test = len(train_labels), len(test_labels)
    if n_train == 0 or n_test == 0:
        raise ValueError(f"k-NN needs training and test features, got {n_train} and {n_test}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    capped = sorted({min(int(k), n_train) for k in ks})
    device = train_feats.device
    train = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.to(device)
    hits = {k: torch.zeros(2, dtype=torch.long, device=device) for k in capped}
    for start in range(0, n_test, chunk_size):
        queries = F.normalize(test_feats[start : start + chunk_size].to(device).float(), dim=1)
        labels = test_labels[start : start + chunk_size].to(device)
        # One top-k at the largest k serves every k: its columns come sorted by similarity.
        sims, index = (queries @ train.T).topk(capped[-1], dim=1)
        weights = (sims / temperature).exp()
        neighbour_labels = train_labels[index]
        for k in capped:
            votes = torch.zeros(len(queries), num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            top1, top5 = topk_correct(votes, labels)
            hits[k] += torch.stack([top1.sum(), top5.sum()])
        if on_chunk is not None:
            on_chunk(len(queries))
    return {
        k: {"top1": h[0].item() / n_test, "top5": h[1].item() / n_test} for k, h in hits.items()
    }
