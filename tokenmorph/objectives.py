"""Training objectives: what one step computes from a batch. The engine (train.py) does the rest.

An objective is called as ``objective(model, batch, step) -> (loss, logs)`` and may provide
``mask_fn(rng)``, drawn per sample in the data loader (seeded by the sample's key).
"""
from __future__ import annotations

import random

import numpy as np

from .losses import DTMLoss
from .masking import BlockMasking
from .morph import effective_schedule
from .train import mix_seed

__all__ = ["DTMObjective"]


class DTMObjective:
    """DTM in the BEiT framework (method.md 1.2): the teacher sees the clean image, the student the
    block-masked one (mask token in place of masked patch embeddings) and predicts teacher tokens at
    every position; the DTM loss is averaged over L sampled morphing schedules.

    Args:
        teacher: a :class:`tokenmorph.teachers.Teacher` (frozen).
        grid: the student's patch grid (h, w).
        cfg: the run config (masking, DTM and seed keys).
    """

    def __init__(self, teacher, grid: tuple[int, int], cfg) -> None:
        self.teacher, self.grid, self.seed = teacher, tuple(grid), cfg.seed
        self.masking = BlockMasking(self.grid, cfg.num_masked, min_num_patches=min(cfg.min_mask_block, max(cfg.num_masked, 1)))
        self.criterion = DTMLoss(num_levels=cfg.num_levels, n_max=cfg.n_max, k_max=cfg.k_max, scheduler=cfg.scheduler,
                                 mode=cfg.morph_mode, distance=cfg.distance, beta=cfg.beta,
                                 normalize_target=cfg.normalize_target, per_group=cfg.per_group,
                                 masked_only=cfg.loss_on == "masked")

    def mask_fn(self, rng: np.random.Generator) -> np.ndarray:
        """(N,) bool block mask for one sample."""
        return self.masking.sample(rng).reshape(-1)

    def __call__(self, model, batch: dict, step: int):
        images = batch["images"]
        mask = batch["extra"].bool()
        target = self.teacher(images, self.grid)
        pred = model(images, mask)
        # One schedule draw per step for the whole batch, identical on every rank.
        rng = random.Random(mix_seed(self.seed, step, 0xD7))
        loss = self.criterion(pred, target, mask, rng=rng)
        n = pred.shape[1]
        protect = self.criterion.mode == "reference"
        groups = [n - sum(effective_schedule(n, s, protect)) for s in self.criterion.last_schedules]
        return loss, {"groups": sum(groups) / len(groups)}
