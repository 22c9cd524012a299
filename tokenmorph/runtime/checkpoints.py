"""Checkpoint files: the run folder's ``checkpoints/step_XXXXXXXX.pt``, written atomically, read
with checks.

A checkpoint is a dict with ``format`` = :data:`CHECKPOINT_FORMAT`, ``kind`` ("pretrain",
"finetune"), ``compat`` (settings a resume must share), ``config``, ``step``, the model /
optimiser / scheduler / scaler states and whatever the recipe adds (a pre-training checkpoint:
its student record, see :class:`tokenmorph.models.StudentRecord`).
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "find_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "atomic_save",
    "fault",
]

CHECKPOINT_FORMAT = "tokenmorph-checkpoint-v1"


def find_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of interrupted writes are
    ignored)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    return (
        sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        if ckpt_dir.is_dir()
        else []
    )


def latest_checkpoint(path: Path) -> Path | None:
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
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # truncated / not a torch file
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a tokenmorph checkpoint (no '{CHECKPOINT_FORMAT}' format tag)"
        )
    return ckpt


def fault(kind: str, step: int) -> bool:
    """Fault injection for the reliability tests (docs/reliability.md):
    ``TOKENMORPH_FAULT=KIND@STEP``, with KIND ``nan`` (the loss of that optimiser step becomes
    NaN) or ``kill-in-save`` (SIGKILL halfway through writing that step's checkpoint). Unset in
    normal use."""
    return os.environ.get("TOKENMORPH_FAULT") == f"{kind}@{step}"


def atomic_save(obj: dict, path: Path, step: int = -1) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a
    partial file under the final name, and the previous checkpoint is untouched."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        if fault("kill-in-save", step):
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
