"""The training engine shared by every objective (DTM pre-training, pixel objectives,
fine-tuning).

An objective is a callable ``step_fn(model, batch, step) -> (loss, logs)``; the engine owns
everything else: the data order (:mod:`.sampling`), the optimiser step (:mod:`.optim`), autocast,
accumulation, the non-finite guard, DDP through torchrun, checkpoints (:mod:`.checkpoints`),
exact resume, logs (:mod:`.run_logger`), and the control of the loop (``stop_after``,
``save_every``, signals).

Exact resume: the data order and every sample's randomness are functions of (seed, epoch, index)
(:mod:`.sampling`), the training RNG (drop path) is re-seeded from (seed, step, rank) at every
step, and DTM's schedules are drawn from (seed, step, chunk of the global batch) by the
objective. So a checkpoint needs only the step, the model and the optimiser state; no
RNG state is saved.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from ..errors import CheckpointError, ConfigError, TrainingError
from .checkpoints import (
    CHECKPOINT_FORMAT,
    atomic_save,
    fault,
    find_checkpoints,
    latest_checkpoint,
    load_checkpoint,
)
from .distributed import DistInfo, all_reduce
from .optim import OptimizerStep
from .precision import autocast, autocast_dtype
from .run_logger import RunLogger
from .sampling import KeyedDataset, StepBatchSampler, batch_to_device, collate_keyed
from .seeding import mix_seed, seed_all

__all__ = ["Engine", "StepResult"]


@dataclass
class StepResult:
    """What one optimiser step did: its loss (mean over micro-batches and ranks; NaN when
           skipped),
    images trained on and skipped (all ranks), gradient norm, weight decay, and whether it was
    non-finite."""

    loss: float
    images: int
    skipped_images: int
    grad_norm: float
    weight_decay: float
    bad: bool
    logs: dict = field(default_factory=dict)


class Engine:
    """Runs ``step_fn`` over the data for ``total_steps`` optimiser steps.

    Args:
        cfg: the run's config (fields used: batch_size, accum_steps, lr & schedule keys,
            weight_decay, beta1/2, clip_grad, precision, seed, save_every, keep_last, log_every,
            nan_policy, tensorboard, num_workers, epochs, max_steps, warmup_*, stop_after).
        model: the trainable module (wrapped in DDP when distributed); its parameters are
            optimised.
        step_fn: ``(model, batch, step) -> (loss, logs)``; batch is the dict of
            :func:`~.sampling.collate_keyed` with tensors on the device.
        dataset: a :class:`~.sampling.KeyedDataset`.
        run_dir: output folder (checkpoints/, metrics.jsonl, tb/).
        kind: checkpoint kind, checked on resume ("pretrain", "finetune").
        compat: config values that must match on resume (e.g. model size, objective).
        param_groups: optimiser groups (default: timm's weight-decay groups of ``model``).
        extra_state: entries added to every checkpoint (e.g. the student record).
    """

    def __init__(
        self,
        cfg,
        model: nn.Module,
        step_fn: Callable,
        dataset: KeyedDataset,
        run_dir: Path,
        dist_info: DistInfo,
        kind: str,
        compat: dict,
        param_groups: list | None = None,
        extra_state: dict | None = None,
    ) -> None:
        self.cfg, self.dist, self.kind, self.compat = cfg, dist_info, kind, compat
        self.run_dir = Path(run_dir)
        self.model, self.step_fn, self.dataset = model, step_fn, dataset
        self.extra_state = extra_state or {}
        self.sampler = StepBatchSampler(
            len(dataset),
            cfg.batch_size,
            cfg.accum_steps,
            dist_info.rank,
            dist_info.world_size,
            cfg.seed,
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = (
            cfg.max_steps
            if cfg.max_steps is not None
            else max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        )
        if cfg.precision == "fp16" and dist_info.device.type != "cuda":
            raise ConfigError(
                "precision=fp16 needs CUDA (it uses a GradScaler); use precision=bf16 on the CPU"
            )
        self.optim = OptimizerStep(cfg, model, self.total_steps, self.steps_per_epoch, param_groups)
        self.lr = self.optim.lr
        self.autocast_dtype = autocast_dtype(cfg.precision)
        self.ddp_model = model
        if dist_info.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
            )
        self.log = RunLogger(
            self.run_dir,
            dist_info.is_main,
            self.total_steps,
            self.steps_per_epoch,
            cfg.log_every,
            cfg.tensorboard,
            desc=f"{kind} {self.run_dir.name}",
        )
        self.step = 0
        self.images_seen = self.skipped_images = self.skipped_steps = 0
        self._stop_signal = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "compat": self.compat,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "world_size": self.dist.world_size,
            "images_seen": self.images_seen,
            "skipped_images": self.skipped_images,
            "skipped_steps": self.skipped_steps,
            "model": self.model.state_dict(),
            **self.optim.state_dict(),
            **self.extra_state,
        }

    def save(self) -> Path | None:
        """Write this step's checkpoint (main process) and keep the newest ``keep_last``."""
        if not self.dist.is_main:
            return None
        ckpt_dir = self.run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"step_{self.step:08d}.pt"
        atomic_save(self.state_dict(), path, self.step)
        for old in find_checkpoints(self.run_dir)[: -self.cfg.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def check_compatible(self, ckpt: dict, path: Path) -> None:
        if ckpt.get("kind") != self.kind:
            raise CheckpointError(
                f"{path} is a {ckpt.get('kind')!r} checkpoint, this run is {self.kind!r}"
            )
        theirs = ckpt.get("compat", {})
        diffs = [
            f"{k}: checkpoint {theirs.get(k)!r} vs run {v!r}"
            for k, v in self.compat.items()
            if theirs.get(k) != v
        ]
        if diffs:
            raise CheckpointError(
                f"{path} does not fit this run ({'; '.join(diffs)}); use another --output-dir or "
                f"the checkpoint's settings"
            )

    def resume(self) -> Path | None:
        """Load the newest readable checkpoint of the run folder, if any (falls back past
           unreadable
        ones)."""
        for path in reversed(find_checkpoints(self.run_dir)):
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as e:
                self.log.message(f"warning: skipping {e}")
                continue
            self.check_compatible(ckpt, path)
            missing, unexpected = self.model.load_state_dict(ckpt["model"], strict=False)
            if missing or unexpected:
                raise CheckpointError(
                    f"{path}: model weights do not match (missing {list(missing)[:5]}, "
                    f"unexpected {list(unexpected)[:5]})"
                )
            self.optim.load_state_dict(ckpt)
            self.step = ckpt["step"]
            self.images_seen = ckpt.get("images_seen", 0)
            self.skipped_images = ckpt.get("skipped_images", 0)
            self.skipped_steps = ckpt.get("skipped_steps", 0)
            if ckpt.get("world_size") != self.dist.world_size:
                per_rank = self.cfg.batch_size // self.cfg.accum_steps // self.dist.world_size
                self.log.message(
                    f"resuming a {ckpt.get('world_size')}-process run with {self.dist.world_size} "
                    f"processes: same global batches, per-rank batch {per_rank}"
                )
            return path
        return None

    # ------------------------------------------------------------------ one step
    def make_loader(self) -> DataLoader:
        cfg = self.cfg
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler.span(self.step, self.total_steps),
            num_workers=cfg.num_workers,
            collate_fn=collate_keyed,
            pin_memory=self.dist.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            worker_init_fn=_worker_ignore_signals,
        )

    def train_step(self, micro_batches, last_good: Path | None) -> StepResult:
        """One optimiser step over the next ``accum_steps`` micro-batches of ``micro_batches``."""
        cfg = self.cfg
        wd = self.optim.begin(self.step)
        seed_all(mix_seed(cfg.seed, self.step, self.dist.rank, 0x7E))
        loss_sum, images, skipped = 0.0, 0, 0
        for a in range(cfg.accum_steps):
            batch = batch_to_device(next(micro_batches), self.dist.device)
            skipped += batch["skipped"]
            sync = a == cfg.accum_steps - 1 or not self.dist.distributed
            with nullcontext() if sync else self.ddp_model.no_sync():
                if batch["images"].shape[0] == 0:  # every image of this shard was undecodable
                    loss = sum(p.sum() for p in self.model.parameters()) * 0.0
                    logs = {}
                else:
                    with autocast(self.dist.device.type, self.autocast_dtype):
                        loss, logs = self.step_fn(self.ddp_model, batch, self.step)
                self.optim.backward(loss, cfg.accum_steps)
            loss_sum += float(loss.detach()) / cfg.accum_steps
            images += batch["images"].shape[0]
            self.log.add_logs(logs, 1.0 / cfg.accum_steps)
        if fault("nan", self.step + 1):  # steps are counted from 1, as in metrics.jsonl
            loss_sum = float("nan")
        bad = all_reduce(self.dist, 0.0 if math.isfinite(loss_sum) else 1.0, "max") > 0
        grad_norm = float("nan")
        if bad:
            if cfg.nan_policy == "stop":
                where = (
                    f"last good checkpoint: {last_good}"
                    if last_good
                    else "no checkpoint was written yet"
                )
                raise TrainingError(
                    f"non-finite loss ({loss_sum}) at step {self.step + 1}; stopped without "
                    "updating "
                    f"the weights; {where}. Rerun to resume from it, or set nan_policy=skip"
                )
            self.optim.skip()
        else:
            grad_norm = self.optim.apply()
        self.step += 1
        mean_loss = float("nan") if bad else all_reduce(self.dist, loss_sum) / self.dist.world_size
        return StepResult(
            mean_loss,
            int(all_reduce(self.dist, images)),
            int(all_reduce(self.dist, skipped)),
            grad_norm,
            wd,
            bad,
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train from the current step to ``total_steps`` (or ``stop_after`` more); returns the
        summary."""
        cfg = self.cfg
        old_handlers = self._install_signal_handlers()
        last_good = latest_checkpoint(self.run_dir)
        micro_batches = iter(self.make_loader())
        self.model.train()
        start_step = self.step
        end_step = (
            self.total_steps
            if cfg.stop_after is None
            else min(self.total_steps, start_step + cfg.stop_after)
        )
        last_loss = float("nan")
        self.log.open(start_step)
        try:
            while self.step < end_step:
                r = self.train_step(micro_batches, last_good)
                self.images_seen += r.images
                self.skipped_images += r.skipped_images
                if r.bad:
                    self.skipped_steps += 1
                    self.log.message(
                        f"warning: non-finite loss at step {self.step}: step skipped "
                        f"({self.skipped_steps} so far)"
                    )
                else:
                    last_loss = r.loss
                self.log.step(
                    self.step,
                    None if r.bad else r.loss,
                    r.images,
                    self.optim.current_lr,
                    r.weight_decay,
                    r.grad_norm,
                    {
                        "images_seen": self.images_seen,
                        "skipped_images": self.skipped_images,
                        "skipped_steps": self.skipped_steps,
                    },
                )
                if self.step % cfg.save_every == 0 and self.step < end_step:
                    last_good = self.save() or last_good
                if self._stop_signal is not None:
                    path = self.save()
                    raise TrainingError(
                        f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint "
                        f"saved: {path}; rerun the same command to resume"
                    )
            final = self.save()
        finally:
            self.log.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        elapsed = self.log.elapsed
        return {
            "kind": self.kind,
            "steps": self.step,
            "total_steps": self.total_steps,
            "resumed_from_step": start_step,
            "finished": self.step >= self.total_steps,
            "final_loss": last_loss,
            "images_seen": self.images_seen,
            "skipped_images": self.skipped_images,
            "skipped_steps": self.skipped_steps,
            "wall_time_s": elapsed,
            "img_per_s": (self.step - start_step) * cfg.batch_size / max(elapsed, 1e-9),
            "checkpoint": str(final) if final else None,
            "world_size": self.dist.world_size,
        }

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            self._stop_signal = signum

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                try:
                    old[sig] = signal.signal(sig, handler)
                except ValueError:  # not in the main thread
                    pass
        return old


def _worker_ignore_signals(_worker_id: int) -> None:
    """Preemption signals reach the whole process group; the main process saves a checkpoint and
    then stops the workers itself. A worker dying first would make the DataLoader raise before
    the save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
