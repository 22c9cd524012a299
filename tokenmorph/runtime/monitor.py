"""The k-NN monitor of a training run: every ``monitor_every`` steps, the weighted k-NN top-1 of
the current encoder's CLS features on a fixed labelled subset (a memory bank of training images,
queries from the validation split), the protocol of ``tokenmorph eval knn`` (its computation is
:func:`tokenmorph.ops.knn.weighted_knn`) at one k.

It must not change the training: the model is put in eval mode and back, nothing is written to
it, no gradient is kept, and :func:`preserved_rng` restores every random generator afterwards
(a DataLoader draws its base seed from torch's generator, so a monitor without it would shift a
run's random stream). The engine runs it on the main process while the others wait in a
collective that also stops them when it fails (:meth:`tokenmorph.runtime.engine.Engine.train`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import collate_skip
from ..data.labelled import EvalData, build_eval_datasets
from ..errors import DataError
from ..ops.knn import weighted_knn
from .precision import autocast

__all__ = ["preserved_rng", "KnnMonitor"]

# decoded evaluation views are kept in memory below this size (else decoded at every call)
CACHE_BYTES = 512 * 2**20


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Python's, NumPy's and torch's generators (CPU and every CUDA device) as they were, after
    the block."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _cls_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (B, D): the CLS token after the final norm (the default pooling
    of ``tokenmorph eval knn``); either student's ``forward_features`` with nothing masked."""
    return model.forward_features(images)[:, 0]


class KnnMonitor:
    """Weighted k-NN top-1 / top-5 of a student's encoder on a fixed labelled subset.

    Args:
        data: the labelled data and its seeded subsets (``limit_train``: the memory bank,
            ``limit_val``: the queries), as ``tokenmorph eval knn`` takes them.
        img_size: the student's input side (the evaluation view is resized to it).
        device: where the student is.
        k, temperature: the vote (DINO's: 20, 0.07).
        batch_size: images per forward.
        amp_dtype: autocast dtype of the forward (the run's precision), or None.
    """

    def __init__(
        self,
        data: EvalData,
        img_size: int,
        device: torch.device,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 256,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.bank, self.queries, self.num_classes = build_eval_datasets(data, img_size)
        self.device, self.k, self.temperature = torch.device(device), k, temperature
        self.batch_size, self.amp_dtype = batch_size, amp_dtype
        per_image = 3 * img_size * img_size * 4
        self._cache = (len(self.bank) + len(self.queries)) * per_image <= CACHE_BYTES
        self._views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls, self.seconds = 0, 0.0

    def describe(self) -> str:
        return (
            f"{len(self.queries)} queries against a bank of {len(self.bank)} images, "
            f"{self.num_classes} classes, k={self.k}"
        )

    def _images(self, name: str, dataset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches (images, labels) of a split: decoded once and kept when small enough."""
        if name in self._views:
            images, labels = self._views[name]
            for i in range(0, len(labels), self.batch_size):
                yield images[i : i + self.batch_size], labels[i : i + self.batch_size]
            return
        loader = DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_skip
        )
        kept = []
        for images, labels, _ in loader:
            if len(labels):
                if self._cache:
                    kept.append((images, labels))
                yield images, labels
        if self._cache and kept:
            self._views[name] = (torch.cat([i for i, _ in kept]), torch.cat([t for _, t in kept]))

    @torch.no_grad()
    def _features(self, model: nn.Module, name: str, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        for images, targets in self._images(name, dataset):
            images = images.to(self.device, non_blocking=True)
            with autocast(self.device.type, self.amp_dtype):
                out = _cls_features(model, images)
            feats.append(out.float())
            labels.append(targets.to(self.device))
        if not feats:
            raise DataError(f"the k-NN monitor's {name} images: none could be decoded")
        return torch.cat(feats), torch.cat(labels)

    def __call__(self, model: nn.Module) -> dict:
        """The monitor's numbers for ``model`` now: ``knn_top1``, ``knn_top5`` (fractions) and
        ``knn_seconds`` (this call's cost); the model and every generator are left as they were."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with preserved_rng():
                bank = self._features(model, "bank", self.bank)
                queries = self._features(model, "queries", self.queries)
                result = weighted_knn(
                    *bank, *queries, ks=(self.k,), temperature=self.temperature,
                    num_classes=self.num_classes,
                )  # fmt: skip
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        self.calls += 1
        self.seconds += seconds
        (scores,) = result.values()
        return {"knn_top1": scores["top1"], "knn_top5": scores["top5"], "knn_seconds": seconds}
