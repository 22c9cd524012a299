"""A run folder from start to finish, the same for every kind of run (any recipe on the
:class:`~.engine.Engine`).

A recipe opens its folder before it builds anything, and trains in it::

    with RunFolder.open(cfg, dist_info, "pretrain") as folder:  # checks, lock, settings
        dataset = build_dataset(cfg.data, ..., exclude=(folder.path,))
        done = folder.check_data(dataset)  # the data's fingerprint; a finished run ends here
        if done is not None:
            return done
        ...  # models, engine
        return folder.run(engine, describe)

:meth:`RunFolder.open` (before any model or data set is built): the output folder must be a
writable folder, not inside the data folder (unless ``allow_output_in_data``); it is locked
against a second run (``fcntl.flock`` on ``.lock``: the OS releases it when the process ends,
however it ends, so a stale lock never blocks; under torchrun rank 0 holds it and every rank
learns the outcome); its newest readable checkpoint is found and the settings it was trained with
are compared with the new ones, key by key (:mod:`.resume`). :meth:`check_data`: the data set's
fingerprint against the checkpoint's, and whether the run is already finished (then nothing is
changed). :meth:`run`: resume the engine, write ``config.yaml`` on the first start (it keeps what
the run was started with), append a record to ``run_history.jsonl`` (every start and resume:
time, step, command line, changed keys, processes, host, versions), announce, train, write
``summary.json`` and the loss curve.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..data import data_fingerprint, data_folder, describe_fingerprint
from ..errors import ConfigError, TrainingError
from .checkpoints import agreed_checkpoint
from .distributed import DistInfo, all_reduce
from .engine import total_steps_for
from .resume import DATA_KEY, FREE, MEANING, Change, check_changes, config_changes
from .run_logger import dump_json

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no lock
    fcntl = None

__all__ = [
    "HISTORY_FILE",
    "LOCK_FILE",
    "RunFolder",
    "run_dir_for",
    "check_output_dir",
    "set_command_line",
]

HISTORY_FILE, LOCK_FILE = "run_history.jsonl", ".lock"
_COMMAND_LINE: list[str] = []  # the invocation, as the command line gave it (set_command_line)


def set_command_line(words: list[str]) -> None:
    """Record the command line of this invocation for the run history (the CLI calls it; a run
    started from Python records ``sys.argv``)."""
    _COMMAND_LINE[:] = list(words)


def run_dir_for(cfg) -> Path:
    """``output_dir``, or ``runs/<config name>``."""
    return Path(cfg.output_dir) if cfg.output_dir else Path("runs") / cfg.name


def check_output_dir(path: Path) -> None:
    """Create the run folder ``path`` if needed; ``ConfigError`` when it is a file, is under a
    file, or cannot be written."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path} is a file, not a folder; pass a folder path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"--output-dir {path} is under {parent}, which is a file; pass a folder path"
                )
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(
            f"--output-dir {path} cannot be written ({e.strerror or e}); pass a folder you can "
            "write to"
        ) from None


def _check_outside_data(path: Path, cfg) -> None:
    """``ConfigError`` when the run folder lies inside a data folder of the config (its pictures
    would become training images), unless ``allow_output_in_data``."""
    if getattr(cfg, "allow_output_in_data", False):
        return
    run = path.resolve()
    for key in ("data", "val_data"):
        source = getattr(cfg, key, None)
        folder = data_folder(source) if source else None
        if folder is not None and (run == folder.resolve() or folder.resolve() in run.parents):
            raise ConfigError(
                f"--output-dir {path} is inside the {key} folder {folder}; use an output folder "
                "outside it, or set allow_output_in_data=true (the run folder is then left out "
                "of the data)"
            )


class _Lock:
    """An exclusive ``flock`` on the run folder's lock file, held until :meth:`release` or the
    end of the process."""

    def __init__(self, folder: Path) -> None:
        self.path, self.fd = folder / LOCK_FILE, None

    def acquire(self) -> str | None:
        """None when taken, else who holds it (the holder's pid, host and start time)."""
        if fcntl is None:  # pragma: no cover
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


class RunFolder:
    """One run folder while a run uses it (see the module docstring). Attributes: ``path``,
    ``checkpoint_path`` / ``checkpoint`` (the newest readable one, None on a first start),
    ``step`` (its step, 0 on a first start), ``changes`` (the settings that differ from it)."""

    def __init__(self, cfg, dist_info: DistInfo, kind: str) -> None:
        self.cfg, self.dist, self.kind = cfg, dist_info, kind
        self.path = run_dir_for(cfg)
        self.checkpoint_path, self.checkpoint, self.step = None, None, 0
        self.changes: list[Change] = []
        self.fingerprint: dict | None = None
        self._lock = _Lock(self.path)

    # ---------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, cfg, dist_info: DistInfo, kind: str) -> RunFolder:
        """Check, lock and read the run folder of ``cfg``; raise before any work when it cannot
        be used as asked."""
        folder = cls(cfg, dist_info, kind)
        try:
            folder._claim()
            folder._read_checkpoint()
        except BaseException:
            folder.close()
            raise
        return folder

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock (also released by the OS when the process ends)."""
        self._lock.release()

    def _claim(self) -> None:
        """Rank 0 checks the folder and takes the lock; every rank learns whether it may go on
        (the others must not wait forever in a collective for a rank that gave up)."""
        error = None
        if self.dist.is_main:
            try:
                _check_outside_data(self.path, self.cfg)
                check_output_dir(self.path)
                holder = self._lock.acquire()
                if holder is not None:
                    error = TrainingError(
                        f"the run folder {self.path} is in use by another tokenmorph run "
                        f"({holder});"
                        " wait for it to end, or use another --output-dir"
                    )
            except ConfigError as e:
                error = e
        if all_reduce(self.dist, 0.0 if error is None else 1.0, "max") > 0:
            raise error or TrainingError(f"the main process refused the run folder {self.path}")

    def _read_checkpoint(self) -> None:
        """Rank 0 chooses the checkpoint to resume (the newest it can read) and tells the others,
        which load that file (:func:`~.checkpoints.agreed_checkpoint`)."""
        path, ckpt = agreed_checkpoint(self.dist, self.path, self._message)
        if path is None:
            return
        self.checkpoint_path, self.checkpoint, self.step = path, ckpt, ckpt["step"]
        self.changes = config_changes(ckpt.get("config", {}), self.cfg)
        check_changes(self.changes, str(self.path), self.step, self.cfg.apply_changes)

    def _message(self, text: str) -> None:
        if self.dist.is_main:
            print(f"[tokenmorph] {text}", flush=True)

    # ---------------------------------------------------------------------------- the data
    def check_data(self, dataset) -> dict | None:
        """Record the data set's fingerprint; on resume, a changed one is refused like a changed
        setting (:func:`~.resume.check_changes`). Returns the stored summary when the run is
        already finished (it is reported and nothing is written), else None."""
        self.fingerprint = data_fingerprint(dataset)
        if self.checkpoint is None:
            return None
        old = self.checkpoint.get("data_fingerprint")
        if old is not None and old != self.fingerprint and getattr(dataset, "streaming", False):
            raise ConfigError(
                f"the data of the stream data={self.cfg.data} changed since {self.checkpoint_path} "
                f"({describe_fingerprint(old)} -> {describe_fingerprint(self.fingerprint)}): a "
                "stream's position means other samples in other data, so it cannot resume (not "
                "even with --apply-changes); restore the data or use another --output-dir"
            )
        if old is not None and old != self.fingerprint:
            change = Change(
                DATA_KEY, describe_fingerprint(old), describe_fingerprint(self.fingerprint), MEANING
            )
            check_changes([change], str(self.path), self.step, self.cfg.apply_changes)
            self.changes.append(change)
        return self._finished_summary(len(dataset))

    def _finished_summary(self, num_samples: int) -> dict | None:
        total = total_steps_for(self.cfg, max(num_samples // self.cfg.batch_size, 1))
        summary_path = self.path / "summary.json"
        if self.step < total or not summary_path.exists():
            return None
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged summary: the (empty) run writes it again
        if not summary.get("finished"):
            return None
        self._message(
            f"the run in {self.path} is finished (step {self.step} of {total}, "
            f"{self.checkpoint_path}): nothing to do, nothing changed. To train longer, raise "
            "max_steps (or epochs) with --apply-changes; for a new run, use another --output-dir"
        )
        return {**summary, "already_finished": True}

    # ---------------------------------------------------------------------------- the run
    def run(
        self, engine, describe: str, finish: Callable[[dict], dict] | None = None, plot: bool = True
    ) -> dict | None:
        """Resume ``engine`` from the checkpoint found, record the start, print ``[tokenmorph]
        starting|resuming ...: <describe>``, train, then (main process) add ``finish(summary)``'s
        entries, write ``summary.json`` and, with ``plot``, ``loss_curve.png``. Returns the
        summary (None on the other processes when ``finish`` is given: its work, e.g. a final
        evaluation, runs on the main process only)."""
        engine.extra_state["data_fingerprint"] = self.fingerprint
        resumed = None
        if self.checkpoint is not None:
            applying = any(c.kind == MEANING for c in self.changes)
            resumed = engine.resume((self.checkpoint_path, self.checkpoint), applying)
            self.checkpoint = None  # the engine holds the state now: free the memory
        if self.dist.is_main:
            self._record_start(resumed, engine.step, describe)
        summary = engine.train()
        if finish is not None:
            if not self.dist.is_main:
                return None
            summary.update(finish(summary))
        summary.update(config=self.cfg.name, run_dir=str(self.path))
        if self.dist.is_main:
            (self.path / "summary.json").write_text(dump_json(summary, indent=2))
            if plot:
                self._plot(summary)
        return summary

    def _record_start(self, resumed: Path | None, step: int, describe: str) -> None:
        if resumed is None:  # config.yaml keeps what the run was started with
            (self.path / "config.yaml").write_text(
                yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            )
        self._announce_changes(step)
        with open(self.path / HISTORY_FILE, "a") as f:
            f.write(dump_json(self._history_record(resumed, step)) + "\n")
        where = f"resuming from {resumed} (step {step})" if resumed else "starting"
        print(f"[tokenmorph] {where}: {describe}", flush=True)

    def _announce_changes(self, step: int) -> None:
        free = [str(c) for c in self.changes if c.kind == FREE]
        applied = [str(c) for c in self.changes if c.kind != FREE]
        if free:
            self._message(
                f"settings changed since the checkpoint (training unchanged): {'; '.join(free)}"
            )
        if applied:
            self._message(
                f"applying changed settings from step {step} (schedules rebuilt from the new "
                f"values; recorded in {HISTORY_FILE}): {'; '.join(applied)}"
            )

    def _history_record(self, resumed: Path | None, step: int) -> dict:
        import timm
        import torch

        from .. import __version__

        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "event": "resume" if resumed else "start",
            "step": step,
            "checkpoint": str(resumed) if resumed else None,
            "command": shlex.join(_COMMAND_LINE or sys.argv),
            "changes": [c.record() for c in self.changes],
            "processes": self.dist.world_size,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "versions": {
                "tokenmorph": __version__,
                "torch": torch.__version__,
                "timm": timm.__version__,
            },
            "data": self.fingerprint,
        }

    def _plot(self, summary: dict) -> None:
        try:
            from ..viz import plot_runs
        except ImportError:  # matplotlib is an optional extra
            return
        summary["plot"] = str(plot_runs([self.path], self.path / "loss_curve.png"))
