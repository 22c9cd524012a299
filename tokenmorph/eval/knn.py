"""Weighted k-NN classification on frozen features (DINO's protocol, after InstDisc); the program
is ``tokenmorph eval knn`` (:mod:`tokenmorph.commands.eval_knn`).

Features are L2-normalised; each query's k most cosine-similar training features vote for their
class with weight exp(similarity / T), T = 0.07; the class with the largest total wins. Reported:
top-1 / top-5 for each k in {10, 20, 100, 200} (capped at the training set size). The
computation is :func:`tokenmorph.ops.knn.weighted_knn` (shared with the k-NN monitor of
pre-training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..ops.knn import weighted_knn

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
    """Weighted k-NN accuracy of ``test_feats`` against ``train_feats``
    (:func:`~tokenmorph.ops.knn.weighted_knn`), with ``progress``: the query chunks reported
    (:class:`tokenmorph.runtime.progress.Progress`).

    Returns:
        ``{k: {"top1": float, "top5": float}}`` for each capped k, ascending; fractions in [0,
        1]. Peak extra memory is about chunk_size x N similarities (4 bytes each; 1024 x 1.28 M
        ImageNet images = 5 GB: use a smaller chunk there).
    """
    from ..runtime.progress import Progress

    report = Progress(len(test_labels), "k-NN queries", "img", enabled=progress)
    try:
        return weighted_knn(
            train_feats, train_labels, test_feats, test_labels, ks, temperature, num_classes,
            chunk_size, on_chunk=report.update,
        )  # fmt: skip
    finally:
        report.close()
