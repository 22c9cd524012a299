"""Weighted k-NN classification on frozen features (DINO's protocol, after InstDisc); the program
   is
``tokenmorph eval knn`` (:mod:`tokenmorph.commands.eval_knn`).

Features are L2-normalised; each query's k most cosine-similar training features vote for their
class with weight exp(similarity / T), T = 0.07; the class with the largest total wins. Reported:
top-1 / top-5 for each k in {10, 20, 100, 200} (capped at the training set size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .features import topk_correct

if TYPE_CHECKING:  # annotations only
    import torch

__all__ = ["DEFAULT_KS", "knn_classify"]

DEFAULT_KS = (10, 20, 100, 200)
HEADLINE_K = 20


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
) -> dict:
    """Weighted k-NN accuracy of ``test_feats`` against ``train_feats``.

    Args:
        train_feats: (N, D) features; train_labels: (N,) int64 in [0, num_classes).
        test_feats: (M, D) features; test_labels: (M,) int64.
        ks: neighbour counts; each is capped at N (so duplicates after capping merge).
        temperature: T of the vote weights exp(cos / T).
        num_classes: C (default: the largest label + 1).
        chunk_size: queries per chunk. Peak extra memory is about chunk_size x N similarities (4
            bytes each; 1024 x 1.28 M ImageNet images = 5 GB: use a smaller chunk there).
        progress: report the query chunks (:class:`tokenmorph.runtime.progress.Progress`).

    Returns:
        ``{k: {"top1": float, "top5": float}}`` for each capped k, ascending; fractions in [0,
        1]. Top-5 is top-C when C < 5. Everything runs on ``train_feats``' device.
    """
    import torch
    import torch.nn.functional as F

    from ..runtime.progress import Progress

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
    report = Progress(n_test, "k-NN queries", "img", enabled=progress)
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
        report.update(len(queries))
    report.close()
    return {
        k: {"top1": h[0].item() / n_test, "top5": h[1].item() / n_test} for k, h in hits.items()
    }
