"""Checkpoint files: the run folder's ``checkpoints/step_XXXXXXXX.pt``, written atomically, read
with checks.

A checkpoint is a dict with ``format`` = :data:`CHECKPOINT_FORMAT`, ``kind`` ("pretrain",
"finetune"), ``compat`` (settings a resume must share), ``config``, ``step``, the model /
optimiser / scheduler / scaler states and whatever the recipe adds (a pre-training checkpoint:
its student record, see :class:`tokenmorph.models.StudentRecord`). It holds only tensors and
plain containers (dict, list, tuple, str, int, float, bool, None), so it is read with
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file. Files of
earlier versions also hold NumPy RNG states, read through an allow-list of NumPy's array
reconstructors (:data:`LEGACY_GLOBALS`) and nothing else.

Only names ``step_`` + 8 or more digits + ``.pt`` are checkpoints (:data:`CHECKPOINT_NAME`);
temporary files of interrupted writes and other names are ignored.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, TrainingError
from .distributed import all_reduce, broadcast_object

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "LEGACY_GLOBALS",
    "find_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "newest_readable_checkpoint",
    "agreed_checkpoint",
    "checkpoint_problem",
    "prune_checkpoints",
    "atomic_save",
    "fault",
]

CHECKPOINT_FORMAT = "tokenmorph-checkpoint-v1"
CHECKPOINT_NAME = re.compile(r"step_(\d{8,})\.pt")


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core  # NumPy 2 moved np.core to np._core
    return core.multiarray._reconstruct


# What the "rng" entry of checkpoints written by earlier versions needs (np.random.get_state()
# holds a uint32 array); listed under both spellings of NumPy's module, 1.x and 2.x.
LEGACY_GLOBALS = [
    (_numpy_reconstruct(), "numpy.core.multiarray._reconstruct"),
    (_numpy_reconstruct(), "numpy._core.multiarray._reconstruct"),
    (np.ndarray, "numpy.ndarray"),
    (np.dtype, "numpy.dtype"),
    (type(np.dtype(np.uint32)), "numpy.dtypes.UInt32DType"),  # NumPy 2 pickles dtypes by class
]
_LEGACY_NAMES = {name for _, name in LEGACY_GLOBALS}


def find_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files by name (``step_XXXXXXXX.pt``), oldest first; any other name,
    temporary files of interrupted writes included, is ignored. Readability is not checked."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in ckpt_dir.iterdir()
        if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: Path) -> Path | None:
    """``path`` itself if it is a file, else the newest checkpoint of the run folder ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    found = find_checkpoints(path)
    return found[-1] if found else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _needs_code(path: Path, e: Exception) -> CheckpointError:
    """The error for a file whose unpickling asks for more than tensors and plain containers."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # pragma: no cover - a file torch can open but not list
        names = []
    names = [n for n in names if n not in _LEGACY_NAMES]
    if not names:  # not code: damaged data the restricted unpickler cannot read
        return CheckpointError(f"{path} is not a readable checkpoint ({_first_line(e)})")
    return CheckpointError(
        f"{path} is not loaded: it needs code to unpickle (it calls {', '.join(names[:4])}); "
        "tokenmorph checkpoints hold "
        "only tensors and plain containers, so this file was not written by tokenmorph or was "
        "altered (load it yourself with torch.load(weights_only=False) only if you trust it)"
    )


def load_checkpoint(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    """Load and check a tokenmorph checkpoint with ``weights_only=True`` (no code from the file
    runs); a one-line ``CheckpointError`` for anything else. ``mmap``: map the tensors instead of
    reading them (a cheap look at a large file)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise CheckpointError(f"{path} is not a regular file; pass a checkpoint file")
        if path.exists() and not zipfile.is_zipfile(path):  # torch.save has written zip files
            raise CheckpointError(f"{path} is not a readable checkpoint (not a torch zip archive)")
        with torch.serialization.safe_globals(LEGACY_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except CheckpointError:
        raise
    except Exception as e:  # truncated / not a torch file / needs code
        if "Weights only load failed" in str(e):
            raise _needs_code(path, e) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a tokenmorph checkpoint (no '{CHECKPOINT_FORMAT}' format tag)"
        )
    return ckpt


def checkpoint_problem(path: Path) -> str | None:
    """None when ``path`` reads as a tokenmorph checkpoint (tensors mapped, not read), else why
    not."""
    try:
        load_checkpoint(path, mmap=True)
    except CheckpointError as e:
        return str(e)
    return None


def newest_readable_checkpoint(run_dir: Path, warn) -> tuple[Path, dict] | tuple[None, None]:
    """(path, checkpoint) of the newest checkpoint of ``run_dir`` that loads, reporting each
    unreadable newer one through ``warn(text)``; (None, None) when there is none."""
    for path in reversed(find_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: skipping {e}")
    return None, None


def agreed_checkpoint(dist, run_dir: Path, warn) -> tuple[Path, dict] | tuple[None, None]:
    """:func:`newest_readable_checkpoint` as the main process sees it, loaded by every process
    (``dist``: a :class:`~.distributed.DistInfo`): ranks listing a shared folder on their own
    could see different files (delayed visibility) and resume at different steps. One
    ``CheckpointError`` on every rank when any rank cannot read the chosen file."""
    path = ckpt = error = None
    if dist.is_main:
        path, ckpt = newest_readable_checkpoint(run_dir, warn)
    path = broadcast_object(dist, None if path is None else str(path))
    if path is None:
        return None, None
    path = Path(path)
    if ckpt is None:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            error = CheckpointError(
                f"process {dist.rank} cannot read {path}, the checkpoint the main process "
                f"resumes ({e}); check that every node sees the run folder, then rerun"
            )
    if all_reduce(dist, 0.0 if error is None else 1.0, "max") > 0:
        raise error or CheckpointError(
            f"another process cannot read {path}, the checkpoint this run resumes; check that "
            "every node sees the run folder (its launcher log names the process), then rerun"
        )
    return path, ckpt


def prune_checkpoints(run_dir: Path, keep_last: int, known: dict, warn) -> None:
    """Delete all but the newest ``keep_last`` readable checkpoints of ``run_dir``. ``known``
    maps paths to whether they read (the caller's cache, updated here): files not in it are
    checked once; an unreadable one is reported once through ``warn``, left in place and never
    counted as kept."""
    good = []
    for path in find_checkpoints(run_dir):
        if path not in known:
            problem = checkpoint_problem(path)
            known[path] = problem is None
            if problem is not None:
                warn(f"warning: {problem}; left in place, not counted in keep_last")
        if known[path]:
            good.append(path)
    for old in good[:-keep_last]:
        old.unlink(missing_ok=True)
        del known[old]


def fault(kind: str, step: int) -> bool:
    """Fault injection for the reliability tests (docs/reliability.md):
    ``TOKENMORPH_FAULT=KIND@STEP``, with KIND ``nan`` (the loss of that optimiser step becomes
    NaN), ``kill-in-save`` (SIGKILL halfway through writing that step's checkpoint) or
    ``enospc`` (the write of that step's checkpoint fails halfway with "no space left on
    device"). Unset in normal use."""
    return os.environ.get("TOKENMORPH_FAULT") == f"{kind}@{step}"


class _CountingSink(io.RawIOBase):
    """A write-only file that only counts bytes (the size a checkpoint needs on disk)."""

    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.size += len(b)
        return len(b)


def _serialized_size(obj: dict) -> int:
    sink = _CountingSink()
    torch.save(obj, sink)
    return sink.size


def _disk_full(e: BaseException, folder: Path, needed: int) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC / EDQUOT, or (torch's zip writer
    reports a short write as a RuntimeError) less free space than the file needs."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < needed
    except OSError:
        return False


def _write(obj: dict, f, step: int) -> None:
    if fault("kill-in-save", step) or fault("enospc", step):
        buf = io.BytesIO()
        torch.save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        if fault("enospc", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(obj, f)
    f.flush()
    os.fsync(f.fileno())


def atomic_save(obj: dict, path: Path, step: int = -1) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a
    partial file under the final name, and the previous checkpoint is untouched. A failed write
    removes the temporary file; a full disk is a ``TrainingError`` naming the path and the bytes
    needed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write(obj, f, step)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        needed = _serialized_size(obj)
        if not _disk_full(e, path.parent, needed):
            raise
        try:
            free = f", {shutil.disk_usage(path.parent).free} free"
        except OSError:
            free = ""
        raise TrainingError(
            f"no space left on device ({path}, {needed} bytes needed{free}); the partial file "
            "was removed and the previous checkpoint kept: free some space (or lower keep_last) "
            "and rerun the same command to resume"
        ) from None
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
