"""The training engine shared by every objective (DTM pre-training, pixel objectives, fine-tuning).

An objective is a callable ``step_fn(batch, step) -> (loss, logs)``; the engine owns everything else:
the data order, AdamW with timm's parameter groups and cosine schedule, autocast, accumulation, clipping,
the non-finite guard, DDP through torchrun, checkpoints, exact resume, logs.

Exact resume rests on three rules:
* the data order is a pure function of (seed, epoch): a global permutation per epoch, cut into global
  batches, each cut into accumulation micro-batches and then rank shards; the position is the step;
* every sample's augmentation (and mask) is seeded by (seed, epoch, index), whichever worker loads it;
* the training RNG (drop path, schedules) is re-seeded from (seed, step, rank) at every step.
So a checkpoint needs only the step, the model, the optimiser and the scaler; changing the number of
processes keeps the same global batches, hence the same training where no per-rank randomness enters.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "TrainingError",
    "DistInfo",
    "init_distributed",
    "shutdown_distributed",
    "check_batch_layout",
    "mix_seed",
    "KeyedDataset",
    "StepBatchSampler",
    "Engine",
    "CHECKPOINT_FORMAT",
    "find_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "fault",
]

CHECKPOINT_FORMAT = "tokenmorph-checkpoint-v1"


class TrainingError(RuntimeError):
    """A run cannot go on; the message says why, at which step, and what was saved."""


# ------------------------------------------------------------------------------------------ ranks
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("device=cuda but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank, device)


def shutdown_distributed() -> None:
    """Leave the process group (a gloo process that exits without it can abort at interpreter exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch_layout(batch_size: int, accum_steps: int, world_size: int) -> None:
    """The global batch must split evenly into accumulation micro-batches and rank shards."""
    if batch_size % (accum_steps * world_size):
        raise TrainingError(f"batch_size={batch_size} is not divisible by accum_steps x processes = "
                            f"{accum_steps} x {world_size}; choose a multiple of {accum_steps * world_size}")


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (NumPy's SeedSequence: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- data
class KeyedDataset(Dataset):
    """Wraps a dataset so that item ``(index, epoch)`` is reproducible wherever it is loaded.

    Before loading, torch's, Python's and NumPy's RNGs are seeded from (seed, epoch, index); an optional
    ``extra_fn(rng)`` (e.g. a mask generator) draws from a NumPy generator with the same seed.
    Returns ``(image, label, extra)`` or None for a skipped (undecodable) sample.
    """

    def __init__(self, dataset: Dataset, seed: int, extra_fn: Optional[Callable] = None) -> None:
        self.dataset, self.seed, self.extra_fn = dataset, seed, extra_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        s = mix_seed(self.seed, epoch, index)
        seed_all(s)
        item = self.dataset[index]
        if item is None:
            return None
        image, label = item
        extra = self.extra_fn(np.random.default_rng(s)) if self.extra_fn is not None else None
        return image, label, extra


def collate_keyed(batch: list) -> dict:
    """Stack the kept items of a batch; count the skipped ones."""
    from .data import collate_skip

    images, labels, skipped = collate_skip([None if b is None else (b[0], b[1]) for b in batch])
    kept = [b for b in batch if b is not None]
    extra = None
    if kept and isinstance(kept[0][2], dict):  # several per-sample tensors (a mask, degradation parameters)
        extra = {k: torch.stack([torch.as_tensor(b[2][k]) for b in kept]) for k in kept[0][2]}
    elif kept and kept[0][2] is not None:
        extra = torch.stack([torch.as_tensor(b[2]) for b in kept])
    return {"images": images, "labels": labels, "extra": extra, "skipped": skipped}


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A :func:`collate_keyed` batch on ``device`` (nested dicts of extras included)."""
    nb = device.type == "cuda"

    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v.to(device, non_blocking=nb) if torch.is_tensor(v) else v

    return move(batch)


class StepBatchSampler(Sampler):
    """Yields this rank's micro-batches of ``(index, epoch)`` keys, from ``start_step`` to ``total_steps``.

    Epoch e uses permutation ``randperm(n, seed=mix(seed, e))`` cut into ``n // global_batch`` global
    batches (the remainder is dropped); step s is batch ``s % steps_per_epoch`` of epoch
    ``s // steps_per_epoch``. Each global batch is cut into ``accum_steps`` micro-batches, each micro-batch
    into ``world_size`` equal shards.
    """

    def __init__(self, num_samples: int, global_batch: int, accum_steps: int, rank: int, world_size: int,
                 seed: int, start_step: int, total_steps: int) -> None:
        check_batch_layout(global_batch, accum_steps, world_size)
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise TrainingError(f"the data set has {num_samples} images, fewer than one global batch of {global_batch}; "
                                f"lower batch_size or add data")
        self.n, self.global_batch, self.accum = num_samples, global_batch, accum_steps
        self.rank, self.world, self.seed = rank, world_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.micro = global_batch // accum_steps
        self.shard = self.micro // world_size
        self._perm_epoch, self._perm = None, None

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0) * self.accum

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5A3))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def keys_for_step(self, step: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of step ``step``."""
        epoch, b = divmod(step, self.steps_per_epoch)
        batch = self._permutation(epoch)[b * self.global_batch : (b + 1) * self.global_batch].tolist()
        out = []
        for a in range(self.accum):
            micro = batch[a * self.micro : (a + 1) * self.micro]
            out.append([(i, epoch) for i in micro[self.rank * self.shard : (self.rank + 1) * self.shard]])
        return out

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield from self.keys_for_step(step)


# ------------------------------------------------------------------------------------ checkpoints
def find_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of interrupted writes are ignored)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    return sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1])) if ckpt_dir.is_dir() else []


def latest_checkpoint(path: Path) -> Optional[Path]:
    """``path`` itself if it is a file, else the newest checkpoint of the run folder ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    found = find_checkpoints(path)
    return found[-1] if found else None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load and check a tokenmorph checkpoint; a clear error for anything else."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint not found: {path}") from None
    except Exception as e:  # truncated / not a torch file
        raise TrainingError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a tokenmorph checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    return ckpt


def fault(kind: str, step: int) -> bool:
    """Fault injection for the reliability tests (docs/reliability.md): ``TOKENMORPH_FAULT=KIND@STEP``,
    with KIND ``nan`` (the loss of that optimiser step becomes NaN) or ``kill-in-save`` (SIGKILL halfway
    through writing that step's checkpoint). Unset in normal use."""
    return os.environ.get("TOKENMORPH_FAULT") == f"{kind}@{step}"


def _atomic_save(obj: dict, path: Path, step: int = -1) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a partial
    file under the final name, and the previous checkpoint is untouched."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        if fault("kill-in-save", step):
            import io

            buf = io.BytesIO()
            torch.save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass


# ----------------------------------------------------------------------------------------- engine
class Engine:
    """Runs ``step_fn`` over the data for ``total_steps`` optimiser steps.

    Args:
        cfg: the run's config (fields used: batch_size, accum_steps, lr & schedule keys, weight_decay,
            beta1/2, clip_grad, precision, seed, save_every, keep_last, log_every, nan_policy,
            tensorboard, num_workers, epochs, max_steps, warmup_*).
        model: the trainable module (wrapped in DDP when distributed); its parameters are optimised.
        step_fn: ``(model, batch, step) -> (loss, logs)``; batch is the dict of :func:`collate_keyed`
            with tensors on the device.
        dataset: a :class:`KeyedDataset`.
        run_dir: output folder (checkpoints/, metrics.jsonl, tb/).
        kind: checkpoint kind, checked on resume ("pretrain", "finetune").
        compat: config values that must match on resume (e.g. model size, objective).
        param_groups: optimiser groups (default: timm's weight-decay groups of ``model``).
    """

    def __init__(self, cfg, model: nn.Module, step_fn: Callable, dataset: KeyedDataset, run_dir: Path, dist_info: DistInfo,
                 kind: str, compat: dict, param_groups: Optional[list] = None, extra_state: Optional[dict] = None) -> None:
        from timm.optim import param_groups_weight_decay
        from timm.scheduler import CosineLRScheduler

        self.cfg, self.dist, self.kind, self.compat = cfg, dist_info, kind, compat
        self.run_dir = Path(run_dir)
        self.model = model
        self.step_fn = step_fn
        self.dataset = dataset
        self.extra_state = extra_state or {}
        check_batch_layout(cfg.batch_size, cfg.accum_steps, dist_info.world_size)
        self.steps_per_epoch = len(dataset) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise TrainingError(f"the data set has {len(dataset)} images, fewer than one global batch of "
                                f"{cfg.batch_size}; lower batch_size or add data")
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = min(warmup, max(self.total_steps - 1, 0))
        self.lr = self.scaled_lr(cfg)

        if param_groups is None:
            nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
            param_groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=nwd)
        for g in param_groups:
            g["base_weight_decay"] = g.get("weight_decay", cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(param_groups, lr=self.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(self.total_steps - self.warmup_steps, 1), lr_min=cfg.min_lr,
            warmup_t=self.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
        self.ddp_model = model
        if dist_info.distributed:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.precision]
        if cfg.precision == "fp16" and dist_info.device.type != "cuda":
            raise TrainingError("precision=fp16 needs CUDA (it uses a GradScaler); use precision=bf16 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.step = 0
        self.images_seen = 0
        self.skipped_images = 0
        self.skipped_steps = 0
        self._stop_signal = None

    @staticmethod
    def scaled_lr(cfg) -> float:
        """The lr scaling rules of method.md 1.6: none, linear (batch / base), sqrt."""
        ratio = cfg.batch_size / cfg.lr_base_batch
        return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]

    # ------------------------------------------------------------------ checkpoint state
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
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            **self.extra_state,
        }

    def save(self) -> Optional[Path]:
        if not self.dist.is_main:
            return None
        ckpt_dir = self.run_dir / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"step_{self.step:08d}.pt"
        _atomic_save(self.state_dict(), path, self.step)
        for old in find_checkpoints(self.run_dir)[: -self.cfg.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def check_compatible(self, ckpt: dict, path: Path) -> None:
        if ckpt.get("kind") != self.kind:
            raise TrainingError(f"{path} is a {ckpt.get('kind')!r} checkpoint, this run is {self.kind!r}")
        theirs = ckpt.get("compat", {})
        diffs = [f"{k}: checkpoint {theirs.get(k)!r} vs run {v!r}" for k, v in self.compat.items() if theirs.get(k) != v]
        if diffs:
            raise TrainingError(f"{path} does not fit this run ({'; '.join(diffs)}); use another --output-dir or the "
                                f"checkpoint's settings")

    def resume(self) -> Optional[Path]:
        """Load the newest readable checkpoint of the run folder, if any (falls back past unreadable ones)."""
        for path in reversed(find_checkpoints(self.run_dir)):
            try:
                ckpt = load_checkpoint(path)
            except TrainingError as e:
                self._log(f"warning: skipping {e}")
                continue
            self.check_compatible(ckpt, path)
            missing, unexpected = self.model.load_state_dict(ckpt["model"], strict=False)
            if missing or unexpected:
                raise TrainingError(f"{path}: model weights do not match (missing {list(missing)[:5]}, "
                                    f"unexpected {list(unexpected)[:5]})")
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.step = ckpt["step"]
            self.images_seen = ckpt.get("images_seen", 0)
            self.skipped_images = ckpt.get("skipped_images", 0)
            self.skipped_steps = ckpt.get("skipped_steps", 0)
            if ckpt.get("world_size") != self.dist.world_size:
                self._log(f"resuming a {ckpt.get('world_size')}-process run with {self.dist.world_size} processes: "
                          f"same global batches, per-rank batch {self.cfg.batch_size // self.cfg.accum_steps // self.dist.world_size}")
            return path
        return None

    # ------------------------------------------------------------------ helpers
    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[tokenmorph] {msg}", flush=True)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def _set_weight_decay(self) -> float:
        cfg = self.cfg
        wd = cfg.weight_decay
        if cfg.weight_decay_end is not None:
            t = min(self.step / max(self.total_steps - 1, 1), 1.0)
            wd = cfg.weight_decay_end + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (1 + math.cos(math.pi * t))
        for g in self.optimizer.param_groups:
            if g["base_weight_decay"] > 0:
                g["weight_decay"] = wd
        return wd

    def _to_device(self, batch: dict) -> dict:
        return batch_to_device(batch, self.dist.device)

    def _all_reduce(self, value: float, op=None) -> float:
        if not self.dist.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return float(t.item())

    def _install_signal_handlers(self):
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

    # ------------------------------------------------------------------ loop
    def make_loader(self) -> DataLoader:
        cfg = self.cfg
        sampler = StepBatchSampler(len(self.dataset), cfg.batch_size, cfg.accum_steps, self.dist.rank,
                                   self.dist.world_size, cfg.seed, self.step, self.total_steps)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_keyed,
                          pin_memory=self.dist.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if cfg.num_workers > 0 else None, worker_init_fn=_worker_ignore_signals)

    def train(self) -> dict:
        """Train from the current step to ``total_steps``; returns the summary dict."""
        from tqdm.auto import tqdm

        cfg, is_main = self.cfg, self.dist.is_main
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        if is_main:
            _truncate_metrics(metrics_path, self.step)
        writer = None
        if is_main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step)
            except ImportError:
                self._log("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        old_handlers = self._install_signal_handlers()
        last_good = latest_checkpoint(self.run_dir)
        loader = self.make_loader()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not is_main, dynamic_ncols=True,
                   unit="step", desc=f"{self.kind} {self.run_dir.name}")
        t_window, n_window, t_start = time.perf_counter(), 0, time.perf_counter()
        loss_sum, loss_count, logs_acc = 0.0, 0, {}
        last_loss = float("nan")
        micro_iter = iter(loader)
        self.model.train()
        start_step = self.step
        end_step = self.total_steps if cfg.stop_after is None else min(self.total_steps, start_step + cfg.stop_after)
        try:
            while self.step < end_step:
                self.scheduler.step_update(self.step)
                wd = self._set_weight_decay()
                seed_all(mix_seed(cfg.seed, self.step, self.dist.rank, 0x7E))
                self.optimizer.zero_grad(set_to_none=True)
                step_loss, step_images, step_skipped = 0.0, 0, 0
                for a in range(cfg.accum_steps):
                    batch = self._to_device(next(micro_iter))
                    step_skipped += batch["skipped"]
                    sync = a == cfg.accum_steps - 1 or not self.dist.distributed
                    ctx = nullcontext() if sync else self.ddp_model.no_sync()
                    with ctx:
                        if batch["images"].shape[0] == 0:  # every image of this shard was undecodable
                            loss = sum(p.sum() for p in self.model.parameters()) * 0.0
                            logs = {}
                        else:
                            with self._autocast():
                                loss, logs = self.step_fn(self.ddp_model, batch, self.step)
                        self.scaler.scale(loss / cfg.accum_steps).backward()
                    step_loss += float(loss.detach()) / cfg.accum_steps
                    step_images += batch["images"].shape[0]
                    for k, v in logs.items():
                        logs_acc[k] = logs_acc.get(k, 0.0) + float(v) / cfg.accum_steps
                if fault("nan", self.step + 1):  # steps are counted from 1, as in metrics.jsonl
                    step_loss = float("nan")
                bad = self._all_reduce(0.0 if math.isfinite(step_loss) else 1.0, dist.ReduceOp.MAX if self.dist.distributed else None)
                grad_norm = float("nan")
                if bad:
                    if cfg.nan_policy == "stop":
                        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
                        raise TrainingError(f"non-finite loss ({step_loss}) at step {self.step + 1}; stopped without "
                                            f"updating the weights; {where}. Rerun to resume from it, or set "
                                            f"nan_policy=skip")
                    self.skipped_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self._log(f"warning: non-finite loss at step {self.step + 1}: step skipped ({self.skipped_steps} so far)")
                else:
                    self.scaler.unscale_(self.optimizer)
                    if cfg.clip_grad is not None:
                        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad))
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                self.step += 1
                step_images = int(self._all_reduce(step_images))
                step_skipped = int(self._all_reduce(step_skipped))
                self.images_seen += step_images
                self.skipped_images += step_skipped
                n_window += step_images
                if not bad:
                    last_loss = self._all_reduce(step_loss) / self.dist.world_size
                    loss_sum += last_loss
                    loss_count += 1
                lr = self.optimizer.param_groups[0]["lr"]
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    rate = n_window / max(now - t_window, 1e-9)
                    record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                              "loss": loss_sum / max(loss_count, 1), "lr": lr, "weight_decay": wd,
                              "grad_norm": grad_norm, "img_per_s": rate, "images_seen": self.images_seen,
                              "skipped_images": self.skipped_images, "skipped_steps": self.skipped_steps,
                              "time_s": now - t_start,
                              **{k: v / max(loss_count, 1) for k, v in logs_acc.items()}}
                    if is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(_finite(record)) + "\n")
                        if writer is not None:
                            for k, v in record.items():
                                if k not in ("step",) and isinstance(v, (int, float)) and math.isfinite(v):
                                    writer.add_scalar(f"train/{k}", v, self.step)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}",
                                    skipped=self.skipped_images, refresh=False)
                    t_window, n_window, loss_sum, loss_count, logs_acc = now, 0, 0.0, 0, {}
                bar.update(1)
                if self.step % cfg.save_every == 0 and self.step < end_step:
                    last_good = self.save() or last_good
                if self._stop_signal is not None:
                    path = self.save()
                    raise TrainingError(f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint "
                                        f"saved: {path}; rerun the same command to resume")
            final = self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        elapsed = time.perf_counter() - t_start
        summary = {"kind": self.kind, "steps": self.step, "total_steps": self.total_steps, "resumed_from_step": start_step,
                   "finished": self.step >= self.total_steps, "final_loss": last_loss,
                   "images_seen": self.images_seen, "skipped_images": self.skipped_images,
                   "skipped_steps": self.skipped_steps, "wall_time_s": elapsed,
                   "img_per_s": (self.step - start_step) * self.cfg.batch_size / max(elapsed, 1e-9),
                   "checkpoint": str(final) if final else None, "world_size": self.dist.world_size}
        return summary


def _worker_ignore_signals(_worker_id: int) -> None:
    """Preemption signals reach the whole process group; the main process saves a checkpoint and then
    stops the workers itself. A worker dying first would make the DataLoader raise before the save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _finite(record: dict) -> dict:
    """JSON has no NaN: write None for non-finite numbers."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint's step so the log reads as one run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    path.write_text("".join(line + "\n" for line in keep))
