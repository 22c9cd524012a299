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
RNG state is saved. A streamed source (``data=wds:``) has no index to permute: its position (the
samples each rank consumed, :class:`~.sampling.KeyedStream`) is saved too.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import CheckpointError, ConfigError, DataError, TokenmorphError, TrainingError
from ..models.attention import resolve_attention, set_attention
from ..models.rel_pos import use_deterministic_rel_pos
from .checkpoints import (
    CHECKPOINT_FORMAT,
    agreed_checkpoint,
    atomic_save,
    fault,
    prune_checkpoints,
)
from .distributed import DistInfo, all_reduce_sums, barrier, is_peer_failure
from .host import tune_host_allocator
from .optim import OptimizerStep
from .precision import autocast, autocast_dtype, bf16_warning
from .run_logger import RunLogger
from .sampling import (
    KeyedDataset,
    KeyedStream,
    StepBatchSampler,
    batch_to_device,
    check_batch_layout,
    collate_keyed,
    steps_per_epoch,
)
from .seeding import mix_seed, seed_all

__all__ = ["EMPTY_STEPS_LIMIT", "Engine", "StepResult", "total_steps_for"]

# A run stops when this many consecutive steps (or all the steps of a shorter invocation) had no
# decodable image on any rank: the data is unreadable, and training on would only spend time.
EMPTY_STEPS_LIMIT = 10


def total_steps_for(cfg, steps_per_epoch: int) -> int:
    """A run's length in optimiser steps: ``max_steps``, else ``epochs`` x steps per epoch."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


def _one_line(e: BaseException, limit: int = 300) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


@dataclass
class StepResult:
    """What one optimiser step did: its loss (mean over micro-batches and ranks; NaN when it did
    not train: non-finite, or no image), images trained on and skipped (all ranks), gradient
    norm, weight decay, whether it was non-finite (``bad``) or had no decodable image on any rank
    (``empty``), and on how many ranks a stop signal had arrived (``stop``)."""

    loss: float
    images: int
    skipped_images: int
    grad_norm: float
    weight_decay: float
    bad: bool
    empty: bool = False
    stop: int = 0
    logs: dict = field(default_factory=dict)


class Engine:
    """Runs ``step_fn`` over the data for ``total_steps`` optimiser steps.

    Args:
        cfg: the run's config (fields used: batch_size, accum_steps, lr & schedule keys,
            weight_decay, beta1/2, clip_grad, precision, seed, save_every, keep_last, log_every,
            nan_policy, tensorboard, num_workers, prefetch_factor, epochs, max_steps, warmup_*,
            stop_after).
        model: the trainable module (wrapped in DDP when distributed); its parameters are
            optimised.
        step_fn: ``(model, batch, step) -> (loss, logs)``; batch is the dict of
            :func:`~.sampling.collate_keyed` with tensors on the device.
        dataset: a :class:`~.sampling.KeyedDataset`, or a :class:`~.sampling.KeyedStream` (a
            streamed source: its position joins every checkpoint).
        run_dir: output folder (checkpoints/, metrics.jsonl, tb/).
        kind: checkpoint kind, checked on resume ("pretrain", "finetune").
        compat: values a resumed checkpoint must share (e.g. the target dimension); keys its
            compat lacks are not compared (the config itself is compared key by key before, by
            :class:`~.run_folder.RunFolder`).
        param_groups: optimiser groups (default: timm's weight-decay groups of ``model``).
        extra_state: entries added to every checkpoint (e.g. the student record).
        unused: names of ``model``'s parameters that this run never gives a gradient (e.g. the
            mask token of an objective that does not mask): they are marked as not trained,
            so DDP leaves them out of its gradient all-reduce (every other parameter must get a
            gradient at every step: DDP needs no per-step search for unused ones).
        monitor: ``monitor(model) -> dict`` of numbers (e.g. :class:`~.monitor.KnnMonitor`),
            run on the main process at the start of a fresh run, every ``monitor_every`` steps
            and at the last step, while the other processes wait in a collective; it must leave
            the model and the random generators as they were, so the training is the same with
            it or without it.
    """

    def __init__(
        self,
        cfg,
        model: nn.Module,
        step_fn: Callable,
        dataset: KeyedDataset | KeyedStream,
        run_dir: Path,
        dist_info: DistInfo,
        kind: str,
        compat: dict,
        param_groups: list | None = None,
        extra_state: dict | None = None,
        unused: tuple[str, ...] = (),
        monitor: Callable[[nn.Module], dict] | None = None,
        monitor_every: int | None = None,
    ) -> None:
        self.cfg, self.dist, self.kind, self.compat = cfg, dist_info, kind, compat
        self.run_dir = Path(run_dir)
        self.model, self.step_fn, self.dataset = model, step_fn, dataset
        self.extra_state = dict(extra_state or {})
        self.monitor, self.monitor_every = monitor, monitor_every
        self.monitor_seconds, self.last_monitor = 0.0, None
        # a streamed source: each rank's position is the samples it consumed (saved)
        self.stream = dataset if isinstance(dataset, KeyedStream) else None
        self.stream_consumed = 0
        if self.stream is not None:
            check_batch_layout(cfg.batch_size, cfg.accum_steps, dist_info.world_size)
            self.stream.stream.check_processes(dist_info.world_size)
            self.sampler = None
            self.steps_per_epoch = steps_per_epoch(len(dataset), cfg.batch_size)
        else:
            self.sampler = StepBatchSampler(
                len(dataset),
                cfg.batch_size,
                cfg.accum_steps,
                dist_info.rank,
                dist_info.world_size,
                cfg.seed,
            )
            self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = total_steps_for(cfg, self.steps_per_epoch)
        if cfg.precision == "fp16" and dist_info.device.type != "cuda":
            raise ConfigError(
                "precision=fp16 needs CUDA (it uses a GradScaler); use precision=bf16 on the CPU"
            )
        self.optim = OptimizerStep(cfg, model, self.total_steps, self.steps_per_epoch, param_groups)
        self.lr = self.optim.lr
        self.autocast_dtype = autocast_dtype(cfg.precision)
        _freeze_unused(model, tuple(unused))
        tune_host_allocator()
        # a rule of the device and precision, so a resume runs the same kernel
        set_attention(
            model, resolve_attention(cfg.attention, dist_info.device.type, self.autocast_dtype)
        )
        use_deterministic_rel_pos(model)  # a fine-tuned timm BEiT too: the faster table gradient
        self.ddp_model = _ddp(model, dist_info) if dist_info.distributed else model
        if cfg.compile:  # checkpoints keep self.model's (uncompiled) names
            self.ddp_model = torch.compile(self.ddp_model)
        self.log = RunLogger(
            self.run_dir,
            dist_info.is_main,
            self.total_steps,
            self.steps_per_epoch,
            cfg.log_every,
            cfg.tensorboard,
            desc=f"{kind} {self.run_dir.name}",
            loggers=getattr(cfg, "loggers", "tensorboard"),
            run_config=cfg.to_dict(),
        )
        warning = bf16_warning(cfg.precision, dist_info.device)
        if warning:
            self.log.message(warning)
        self.step = 0
        self.images_seen = self.skipped_images = self.skipped_steps = 0
        self.empty_streak = 0
        self.resumed_from: Path | None = None
        self._stop_signal = None
        self._saved: tuple[int, Path] | None = None  # (step, path) of the last checkpoint written
        self._readable: dict[Path, bool] = {}  # checkpoint files checked (written, resumed, read)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "compat": self.compat,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "images_seen": self.images_seen,
            "skipped_images": self.skipped_images,
            "skipped_steps": self.skipped_steps,
            "model": self.model.state_dict(),
            **self.optim.state_dict(),
            **self.extra_state,
        }
        if self.stream is not None:  # where every rank's stream goes on
            state["data_position"] = self.stream.state_dict(
                self.stream_consumed, self.dist.world_size
            )
        return state

    def save(self) -> Path | None:
        """Write this step's checkpoint (main process) and keep the newest ``keep_last`` readable
        ones (unreadable files are reported, left alone and not counted)."""
        if not self.dist.is_main:
            return None
        if self._saved is not None and self._saved[0] == self.step:
            return self._saved[1]
        ckpt_dir = self.run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"step_{self.step:08d}.pt"
        atomic_save(self.state_dict(), path, self.step)
        self._saved = (self.step, path)
        self._readable[path] = True
        prune_checkpoints(self.run_dir, self.cfg.keep_last, self._readable, self.log.message)
        return path

    def check_compatible(self, ckpt: dict, path: Path) -> None:
        if ckpt.get("kind") != self.kind:
            raise CheckpointError(
                f"{path} is a {ckpt.get('kind')!r} checkpoint, this run is {self.kind!r}"
            )
        theirs = ckpt.get("compat", {})
        diffs = [
            f"{k}: checkpoint {theirs[k]!r} vs run {v!r}"
            for k, v in self.compat.items()
            if k in theirs and theirs[k] != v
        ]
        if diffs:
            raise CheckpointError(
                f"{path} does not fit this run ({'; '.join(diffs)}); use another --output-dir or "
                f"the checkpoint's settings"
            )

    def resume(self, found: tuple | None = None, apply_config: bool = False) -> Path | None:
        """Load a checkpoint: ``found`` = (path, checkpoint dict), or the newest readable one of
        the run folder (falling back past unreadable ones) as the main process sees it, loaded by
        every process (:func:`~.checkpoints.agreed_checkpoint`); returns its path, None when
        there is none. ``apply_config``: the run applies changed settings, so the optimiser keeps
        the new config's hyperparameters and schedule (see
        :meth:`OptimizerStep.load_state_dict`)."""
        path, ckpt = found or agreed_checkpoint(self.dist, self.run_dir, self.log.message)
        if path is None:
            return None
        self.check_compatible(ckpt, path)
        self._load_model(ckpt, path)
        try:
            self.optim.load_state_dict(ckpt, apply_config)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: its optimiser state does not fit this run ({_one_line(e)})"
            ) from None
        if self.stream is not None:
            self.stream_consumed = self.stream.load_state_dict(
                ckpt.get("data_position"), self.dist.world_size, path
            )
        self.step = ckpt["step"]
        self.images_seen = ckpt.get("images_seen", 0)
        self.skipped_images = ckpt.get("skipped_images", 0)
        self.skipped_steps = ckpt.get("skipped_steps", 0)
        self.resumed_from = path
        self._readable[path] = True
        if ckpt.get("world_size") != self.dist.world_size:
            per_rank = self.cfg.batch_size // self.cfg.accum_steps // self.dist.world_size
            self.log.message(
                f"resuming a {ckpt.get('world_size')}-process run with {self.dist.world_size} "
                f"processes: same global batches, per-rank batch {per_rank}"
            )
        return path

    def _load_model(self, ckpt: dict, path: Path) -> None:
        try:
            missing, unexpected = self.model.load_state_dict(ckpt["model"], strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise CheckpointError(
                f"{path}: model weights do not fit this run ({_one_line(e)}); use another "
                "--output-dir"
            ) from None
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: model weights do not match (missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]})"
            )

    # ------------------------------------------------------------------ one step
    def make_loader(self) -> DataLoader:
        cfg = self.cfg
        if self.stream is not None:  # the stream yields whole micro-batches
            micro = cfg.batch_size // cfg.accum_steps // self.dist.world_size
            batches = (self.total_steps - self.step) * cfg.accum_steps
            span = self.stream.span(
                self.dist.rank,
                self.dist.world_size,
                micro,
                cfg.accum_steps,
                self.stream_consumed,
                batches,
            )
            order = dict(batch_size=None)
        else:
            span = self.dataset
            order = dict(batch_sampler=self.sampler.span(self.step, self.total_steps))
        return DataLoader(
            span,
            **order,
            num_workers=cfg.num_workers,
            collate_fn=collate_keyed,
            pin_memory=self.dist.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
            worker_init_fn=_worker_ignore_signals,
        )

    def _forward_backward(self, micro_batches) -> tuple[float, int, int]:
        """Forward and backward over the step's ``accum_steps`` micro-batches; returns (mean
        loss, images, skipped images) of this rank."""
        cfg = self.cfg
        loss_sum, images, skipped = torch.zeros((), device=self.dist.device), 0, 0
        for a in range(cfg.accum_steps):
            batch = next(micro_batches)
            if "error" in batch:  # a sample failed to load with on_bad_image=raise
                raise DataError(batch["error"])
            batch = batch_to_device(batch, self.dist.device)
            skipped += batch["skipped"]
            sync = a == cfg.accum_steps - 1 or not self.dist.distributed
            with nullcontext() if sync else self.ddp_model.no_sync():
                if batch["images"].shape[0] == 0:  # every image of this shard was undecodable
                    # a zero loss every trained parameter takes part in, through DDP when
                    # distributed: this rank joins the gradient all-reduce like the others
                    loss = (
                        self.ddp_model(zero_loss=True)
                        if self.dist.distributed
                        else _zero_loss(self.model)
                    )
                    logs = {}
                else:
                    with autocast(self.dist.device.type, self.autocast_dtype):
                        loss, logs = self.step_fn(self.ddp_model, batch, self.step)
                self.optim.backward(loss, cfg.accum_steps)
            loss_sum += loss.detach().float() / cfg.accum_steps  # no host sync per micro-batch
            images += batch["images"].shape[0]
            self.log.add_logs(logs, 1.0 / cfg.accum_steps)
        return float(loss_sum), images, skipped

    def train_step(self, micro_batches, last_good: Path | None) -> StepResult:
        """One optimiser step over the next ``accum_steps`` micro-batches of ``micro_batches``.
        The step's numbers (non-finite ranks, loss, images, skipped images, stop signals) are
        summed over the ranks in ONE all-reduce (with the number of ranks that had an image), so
        every rank takes the same decision: update, skip (non-finite loss under nan_policy=skip,
        or no decodable image anywhere: the weights are left as they are), stop
        (nan_policy=stop), or stop after this step (a signal reached some rank)."""
        wd = self.optim.begin(self.step)
        seed_all(mix_seed(self.cfg.seed, self.step, self.dist.rank, 0x7E))
        loss_sum, images, skipped = self._forward_backward(micro_batches)
        if fault("nan", self.step + 1):  # steps are counted from 1, as in metrics.jsonl
            loss_sum = float("nan")
        finite = math.isfinite(loss_sum)
        bad_ranks, loss_total, fed_ranks, images, skipped, stop = all_reduce_sums(
            self.dist,
            [
                0.0 if finite else 1.0,
                loss_sum if finite else 0.0,
                1.0 if images else 0.0,
                images,
                skipped,
                self._stopping,
            ],
        )
        bad, empty = bad_ranks > 0, images == 0 and bad_ranks == 0
        grad_norm = float("nan")
        if bad and self.cfg.nan_policy == "stop":
            raise self._non_finite_error(loss_sum, last_good)
        if bad or empty:
            self.optim.skip()
        else:
            # DDP averaged over every rank; ranks without an image gave zeros: the gradient is
            # the mean over the ranks that had images (one process with the same data: the same)
            grad_norm = self.optim.apply(self.dist.world_size / fed_ranks)
        self.step += 1
        self.stream_consumed += self.cfg.batch_size // self.dist.world_size  # streams only
        mean_loss = float("nan") if bad or empty else loss_total / fed_ranks
        return StepResult(
            mean_loss, int(images), int(skipped), grad_norm, wd, bad, empty, stop=int(stop)
        )

    @property
    def _stopping(self) -> float:
        return 0.0 if self._stop_signal is None else 1.0

    def _non_finite_error(self, loss: float, last_good: Path | None) -> TrainingError:
        where = (
            f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
        )
        value = loss if not math.isfinite(loss) else "on another process"
        return TrainingError(
            f"non-finite loss ({value}) at step {self.step + 1}; stopped without updating the "
            f"weights; {where}. Rerun to resume from it, or set nan_policy=skip"
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train from the current step to ``total_steps`` (or ``stop_after`` more); returns the
        summary."""
        cfg = self.cfg
        start_step = self.step
        end_step = (
            self.total_steps
            if cfg.stop_after is None
            else min(self.total_steps, start_step + cfg.stop_after)
        )
        old_handlers = self._install_signal_handlers()
        last_good = self.resumed_from
        micro_batches = iter(self.make_loader()) if end_step > start_step else iter(())
        self.model.train()
        last_loss = None
        self.log.open(start_step)
        try:
            if start_step == 0 and end_step > 0:  # the curve's first point: the initial encoder
                self._run_monitor()
            while self.step < end_step:
                r = self._guarded_step(micro_batches, last_good)
                self._account(r, window=min(EMPTY_STEPS_LIMIT, self.total_steps - start_step))
                last_loss = r.loss if math.isfinite(r.loss) else last_loss
                if self.monitor_every and (
                    self.step % self.monitor_every == 0 or self.step == self.total_steps
                ):  # before the checkpoint: a resume from it does not repeat this point
                    self._run_monitor()
                if self.step % cfg.save_every == 0 and self.step < end_step:
                    last_good = self.save() or last_good
                if r.stop:
                    self._stop_by_signal(r.stop)
            final = self.save() if self.step > start_step else last_good
        finally:
            self.log.close()
            _end_workers(micro_batches)
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        return self._summary(start_step, last_loss, final)

    def _run_monitor(self) -> None:
        """The monitor on the main process (logged), the others waiting in a collective that also
        tells them when it failed."""
        if self.monitor is None:
            return
        error = None
        if self.dist.is_main:
            try:
                values = self.monitor(self.model)
            except Exception as e:  # re-raised below, once the other ranks know
                error = e
            else:
                self.monitor_seconds += values.get("knn_seconds", 0.0)
                self.last_monitor = values
                self.log.monitor(self.step, values)
        # instead of a barrier: a monitor that failed on the main process stops every rank here
        # (they would otherwise wait in the next step's collectives)
        (failed,) = all_reduce_sums(self.dist, [0.0 if error is None else 1.0])
        if error is not None:
            raise error
        if failed:
            raise TrainingError(
                f"the k-NN monitor failed on the main process at step {self.step}; its error is "
                "in that process's output"
            )

    def _guarded_step(self, micro_batches, last_good: Path | None) -> StepResult:
        """:meth:`train_step`, with a collective that failed because another process died turned
        into one line."""
        try:
            return self.train_step(micro_batches, last_good)
        except TokenmorphError:
            raise
        except RuntimeError as e:
            if not (self.dist.distributed and is_peer_failure(e)):
                raise
            raise TrainingError(
                f"another process of this {self.dist.world_size}-process run failed or was killed "
                f"during step {self.step + 1} ({_one_line(e, 160)}); last checkpoint: "
                f"{last_good or 'none yet'}; rerun the same command to resume (the launcher's "
                "log names the process)"
            ) from None

    def _account(self, r: StepResult, window: int) -> None:
        """Add a step's counts, warn about steps that did not train, log it; stop when ``window``
        consecutive steps had no decodable image."""
        self.images_seen += r.images
        self.skipped_images += r.skipped_images
        self.empty_streak = self.empty_streak + 1 if r.empty else 0
        if r.bad or r.empty:
            self.skipped_steps += 1
            why = "non-finite loss" if r.bad else f"no decodable image ({r.skipped_images} skipped)"
            self.log.message(
                f"warning: {why} at step {self.step}: step skipped ({self.skipped_steps} so far)"
            )
        self.log.step(
            self.step,
            None if r.bad or r.empty else r.loss,
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
        if self.empty_streak >= window:
            last = f"the last checkpoint, {self.resumed_from}," if self.resumed_from else "nothing"
            raise TrainingError(
                f"no image could be decoded in the last {self.empty_streak} steps "
                f"({self.skipped_images} files skipped in all): the training data cannot be "
                f"read; stopped at step {self.step} without a checkpoint ({last} is kept). Fix "
                "the data (on_bad_image=raise stops at the first bad file and names it)"
            )

    def _stop_by_signal(self, ranks: int) -> None:
        """Every rank stops at the same step: the checkpoint is written, then all raise."""
        path = self.save()
        barrier(self.dist)
        who = (
            f"signal {signal.Signals(self._stop_signal).name}" if self._stop_signal else "a signal"
        )
        if self.dist.distributed:
            who += f" (it reached {ranks} of the {self.dist.world_size} processes)"
        raise TrainingError(
            f"stopped by {who} at step {self.step}; checkpoint saved: {path}; rerun the same "
            "command to resume"
        )

    def _summary(self, start_step: int, last_loss: float | None, final: Path | None) -> dict:
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
            "img_per_s": (self.step - start_step) * self.cfg.batch_size / max(elapsed, 1e-9),
            "checkpoint": str(final) if final else None,
            "world_size": self.dist.world_size,
            **(
                {"monitor": self.last_monitor, "monitor_seconds": self.monitor_seconds}
                if self.last_monitor is not None
                else {}
            ),
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


class _Trained(nn.Module):
    """The module DDP wraps: the model's own forward, or with ``zero_loss=True`` a zero that
    every trained parameter takes part in (a rank whose shard had no decodable image joins the
    gradient all-reduce with zero gradients; a loss from the unwrapped model would skip it and
    the ranks' collectives would no longer pair)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, zero_loss: bool = False, **kwargs):
        if zero_loss:
            return _zero_loss(self.model)
        return self.model(*args, **kwargs)


def _zero_loss(model: nn.Module) -> torch.Tensor:
    """0 x the sum of every trained parameter of ``model``: a scalar whose backward gives each
    of them an exact zero gradient."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def _freeze_unused(model: nn.Module, unused: tuple[str, ...]) -> None:
    """Mark the parameters this run never gives a gradient as not trained (after the optimiser
    is built: its groups, and so its checkpoints, stay the same). AdamW leaves a parameter
    without a gradient as it is either way; DDP only registers trained parameters, and would
    otherwise wait for gradients that never come ("Expected to have finished reduction in the
    prior iteration")."""
    params = dict(model.named_parameters())
    missing = [n for n in unused if n not in params]
    if missing:
        raise ValueError(f"unused parameters {missing} are not parameters of the model")
    for n in unused:
        params[n].requires_grad_(False)


def _ddp(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """``model`` in DDP, through :class:`_Trained`."""
    cuda = dist_info.device.type == "cuda"
    return nn.parallel.DistributedDataParallel(
        _Trained(model), device_ids=[dist_info.device.index] if cuda else None
    )


def _end_workers(batches) -> None:
    """End the worker processes of a loader iterator now, whatever state it is in: a polite
    shutdown first, then SIGKILL for any still alive (they ignore SIGTERM, see
    :func:`_worker_ignore_signals`, so the loader's own terminate() cannot end them, and the
    interpreter would wait for them forever at exit)."""
    workers = list(getattr(batches, "_workers", []))
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def _worker_ignore_signals(_worker_id: int) -> None:
    """Preemption signals reach the whole process group; the main process saves a checkpoint and
    then stops the workers itself. A worker dying first would make the DataLoader raise before
    the save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
