"""Training objectives: what one step computes from a batch. The engine
(:mod:`tokenmorph.runtime.engine`) does the rest.

An objective is called as ``objective(model, batch, step) -> (loss, logs)`` and provides
``sample(rng)``, the per-sample extras (mask, degradation parameters) drawn in the data loader
from the sample's seeded generator. Parameters the release draws once per GPU batch (the
zoom-out offset, the de-colorisation weights) are drawn once per chunk of ``chunk_size``
images of the global batch, seeded by (seed, step, chunk): a sample's chunk is its position
in the global batch (``batch["positions"]``) // chunk_size, so the draws do not depend on the
number of processes or accumulation steps.

One class covers every combination of

* framework (``beit``: the student sees every token, masked ones replaced by a mask token, block
  masks; ``mae``: the encoder sees the visible tokens only, per-sample random masks of
  ``mask_ratio``),
* objective (``mask`` or a Beyond Masking degradation, :mod:`tokenmorph.ops.degrade`),
* target (a teacher's tokens with the DTM loss, or normalised pixels with MSE).

The teacher always sees the *clean* image of the frame the student predicts (for zoom-in: the
whole view), so DTM combines with every degradation; DTM + zoom-in is a combination no published
system has.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..data import dataset_stats
from ..models.teachers import PixelTeacher
from ..ops.degrade import Degradation, ZoomInMask, ZoomOut, build_degradation
from ..ops.losses import DTMLoss, patch_mse, zoom_in_mask_loss, zoom_out_loss
from ..ops.masking import BlockMasking, num_random_masked
from ..ops.morph import effective_schedule
from ..runtime.seeding import mix_seed

__all__ = [
    "PretrainObjective",
    "resolve_loss",
    "zoom_ring_patches",
    "num_random_masked",
    "build_objective_degradation",
    "build_block_masking",
    "view_side",
]


def resolve_loss(cfg) -> str:
    """``loss=auto``: MSE for pixel targets (MAE, Beyond Masking), DTM for teacher tokens."""
    if cfg.loss != "auto":
        return cfg.loss
    return "mse" if cfg.teacher == "pixels" else "dtm"


def zoom_ring_patches(cfg) -> int:
    """Zoom-in border width in patches: ``zoom_ring_patches`` or S / 7 pixels rounded to patches
           (2
    at 224 / 16: the 288 view of docs/method.md 2), at least one."""
    if cfg.zoom_ring_patches is not None:
        return cfg.zoom_ring_patches
    return max(1, round(cfg.img_size / 7 / cfg.patch_size))


def build_objective_degradation(cfg, stats=None):
    """The :class:`~tokenmorph.ops.degrade.Degradation` of a config's objective; ``stats`` =
    (mean, std) of the student's input (default: the data set's)."""
    mean, std = stats or dataset_stats(cfg.data)
    return build_degradation(
        cfg.objective,
        cfg.img_size,
        cfg.patch_size,
        ring_patches=zoom_ring_patches(cfg),
        content=cfg.zoom_out_content,
        saturation=cfg.decolorize_saturation,
        seed=mix_seed(cfg.seed, 0xB1A5),  # the blur's bias: one draw per run
        mean=tuple(mean),
        std=tuple(std),
    )


def build_block_masking(cfg, grid: tuple[int, int]) -> BlockMasking:
    """The BEiT framework's mask generator of a config: ``num_masked`` patches, block target
    areas from ``min_mask_block`` (the release's generator; no floor at ``num_masked``)."""
    return BlockMasking(grid, cfg.num_masked, min_num_patches=cfg.min_mask_block)


def view_side(cfg) -> int:
    """Side of the crop the data loader makes for a config (the zoom-in view, else img_size)."""
    return build_objective_degradation(cfg).view_side


class PretrainObjective:
    """One pre-training step for a framework, objective and target (see the module docstring).

    Args:
        teacher: a :class:`tokenmorph.models.teachers.Teacher` (frozen; ``pixels`` for pixel
        targets).
        grid: the student's patch grid (h, w); the output grid has the same shape.
        cfg: the run config (framework, objective, masking, loss and DTM keys, seed,
            chunk_size).
        stats: (mean, std) of the student's input normalisation (default: the data set's).
    """

    def __init__(self, teacher, grid: tuple[int, int], cfg, stats=None) -> None:
        self.teacher, self.grid, self.seed = teacher, tuple(grid), cfg.seed
        self.framework, self.loss_kind = cfg.framework, resolve_loss(cfg)
        self.ring = zoom_ring_patches(cfg)
        self.ring_weight = cfg.ring_loss_weight
        self.patch_size = cfg.patch_size
        self.chunk_size = cfg.chunk_size
        self.degradation = build_objective_degradation(cfg, stats)
        n = self.grid[0] * self.grid[1]
        self.block_masking = self.num_random = None
        if self.degradation.masked:
            if cfg.framework == "beit":
                self.block_masking = build_block_masking(cfg, self.grid)
            else:
                self.num_random = num_random_masked(n, cfg.mask_ratio)
        self.criterion = None
        # the loss of this framework x objective x target, chosen once
        if self.loss_kind == "dtm":
            self._loss = self._dtm_loss
        elif isinstance(self.degradation, ZoomInMask) and isinstance(teacher, PixelTeacher):
            self._loss = self._zoom_in_mask_loss
        elif isinstance(self.degradation, ZoomOut) and isinstance(teacher, PixelTeacher):
            self._loss = self._zoom_out_loss
        else:
            self._loss = self._mse_loss
        if self.loss_kind == "dtm":
            self.criterion = DTMLoss(
                num_levels=cfg.num_levels,
                n_max=cfg.n_max,
                k_max=cfg.k_max,
                scheduler=cfg.scheduler,
                mode=cfg.morph_mode,
                distance=cfg.distance,
                beta=cfg.beta,
                normalize_target=cfg.normalize_target,
                per_group=cfg.per_group,
                masked_only=cfg.loss_on == "masked",
            )

    def sample(self, rng: np.random.Generator) -> dict:
        """Per-sample extras: ``mask`` (N,) bool when the input is masked, and degradation
        parameters."""
        out = {}
        n = self.grid[0] * self.grid[1]
        if self.block_masking is not None:
            out["mask"] = self.block_masking.sample(rng).reshape(-1)
        elif self.num_random is not None:
            mask = np.zeros(n, dtype=bool)
            mask[rng.permutation(n)[: self.num_random]] = True
            out["mask"] = mask
        out.update(self.degradation.sample(rng))
        return out

    def unused_parameters(self) -> tuple[str, ...]:
        """The student's parameters this objective never gives a gradient: the mask token when
        no mask reaches the student (zoom_in, distort, blur, decolorize); DDP must leave them
        out of its all-reduce."""
        masked = "mask" in self.sample(np.random.default_rng(0))
        return () if masked else ("mask_token",)

    def __call__(self, model, batch: dict, step: int):
        d, mask = self.degrade(batch, step)
        return self.loss(model(d.inputs, mask), d, mask, step, batch.get("positions"))

    def degrade(self, batch: dict, step: int):
        """(:class:`~tokenmorph.ops.degrade.Degraded`, (B, N) bool mask or None) of a batch at
        ``step``."""
        extra = dict(batch["extra"] or {})
        mask = extra.pop("mask", None)
        mask = mask.bool() if mask is not None else None
        params = {**extra, **self.chunk_params(batch, step)}
        return self.degradation.apply(batch["images"], params), mask

    def chunk_params(self, batch: dict, step: int) -> dict:
        """The degradation's per-chunk parameters of each sample of ``batch``, each (B, ...): one
        draw per chunk of the global batch, seeded by (seed, step, chunk), so identical on every
        rank, accumulation step and resume. Samples without a recorded position (a batch built
        outside the training loader) count from 0."""
        if type(self.degradation).step_params is Degradation.step_params:
            return {}  # nothing drawn per chunk: no host sync for the positions
        images = batch["images"]
        chunks, inverse = np.unique(
            np.asarray(self.chunks(batch.get("positions"), images.shape[0])), return_inverse=True
        )
        draws = [
            self.degradation.step_params(np.random.default_rng(mix_seed(self.seed, step, 0xDE6, c)))
            for c in chunks
        ]
        if not draws or not draws[0]:
            return {}
        return {
            k: torch.as_tensor(np.stack([d[k] for d in draws])[inverse], device=images.device)
            for k in draws[0]
        }

    def loss(self, pred, d, mask, step: int, positions=None):
        """(loss, logs) of the student's prediction (B, N, target_dim) for :meth:`degrade`'s
        output; ``positions``: the samples' places in their global batch (default 0..B-1)."""
        # the mask marks input-frame tokens; a misaligned output frame has no masked tokens of
        # its own
        out_mask = mask if self.degradation.aligned else None
        return self._loss(pred, d, mask, out_mask, step, positions)

    def chunks(self, positions, batch_size: int) -> list[int]:
        """The chunk of every sample: its position in the global batch // ``chunk_size``
        (positions None: a batch built outside the training loader, counted from 0)."""
        positions = range(batch_size) if positions is None else positions
        return [p // self.chunk_size for p in positions]

    def schedule_rng(self, step: int):
        """chunk -> the random generator of that chunk's schedules at ``step``."""
        return lambda chunk: random.Random(mix_seed(self.seed, step, 0xD7, chunk))

    def _dtm_loss(self, pred, d, mask, out_mask, step: int, positions):
        target = self.teacher(d.target, self.grid)
        # one set of schedules per chunk of the global batch, seeded by (seed, step, chunk): the
        # same whichever rank or micro-batch a sample is in (the release: one set per GPU)
        loss = self.criterion(
            pred,
            target,
            out_mask,
            rng=self.schedule_rng(step),
            chunks=self.chunks(positions, pred.shape[0]),
        )
        n = pred.shape[1]
        protect = self.criterion.mode == "reference"
        groups = [n - sum(effective_schedule(n, s, protect)) for s in self.criterion.last_schedules]
        return loss, {"groups": sum(groups) / len(groups)}

    def _zoom_in_mask_loss(self, pred, d, mask, out_mask, step: int, positions):
        # the masked term's targets on the input frame, the ring's on the output frame
        input_target = self.teacher(d.inputs, self.grid)
        output_target = self.teacher(d.target, self.grid)
        return zoom_in_mask_loss(
            pred,
            input_target,
            output_target,
            mask,
            self.patch_size,
            self.grid[0],
            self.ring,
            self.ring_weight,
        )

    def _zoom_out_loss(self, pred, d, mask, out_mask, step: int, positions):
        # targets normalised on the output grid (the content stretched to S); prediction and
        # target mapped to the canvas, the loss over its masked tokens (the release's rule)
        target = self.teacher(d.target, self.grid)
        loss = zoom_out_loss(
            pred, target, mask, self.patch_size, self.grid, self.degradation.content, d.offsets
        )
        return loss, {}

    def _mse_loss(self, pred, d, mask, out_mask, step: int, positions):
        # MAE: the masked tokens when the input is masked; every token for the other degradations
        # (and for zoom_in_mask with teacher tokens: the teacher's tokens of the whole view)
        return patch_mse(pred, self.teacher(d.target, self.grid), out_mask), {}
