"""Where a run's records go besides ``metrics.jsonl`` (``loggers=tensorboard,csv,wandb``), each
continuous across a resume:

* ``tensorboard``: scalars ``train/KEY`` and ``monitor/KEY`` in ``tb/``; a resumed writer hides
  the events a crash left past the checkpoint (``purge_step``);
* ``csv``: ``metrics.csv`` next to ``metrics.jsonl``, one row per record, a ``step`` column
  first, one column per key (a new key rewrites the file with the wider header, empty cells
  where a record has no value). It is rebuilt from ``metrics.jsonl`` (already cut back to the
  checkpoint's step) when the run opens, so a resumed run's file reads as one run;
* ``wandb``: Weights & Biases through its own package (``pip install wandb``); the run id is kept
  in the run folder (``wandb_id.txt``), so a resumed run logs to the same W&B run, its steps
  going on from the checkpoint's. ``WANDB_MODE=offline`` writes it under ``wandb/`` of the run
  folder for ``wandb sync``; ``WANDB_PROJECT`` names the project (default tokenmorph).
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError

__all__ = ["LOGGERS", "check_loggers", "open_sinks", "read_records", "CsvSink", "WANDB_ID_FILE"]

LOGGERS = {
    "tensorboard": "TensorBoard scalars in tb/",
    "csv": "metrics.csv next to metrics.jsonl",
    "wandb": "Weights & Biases (pip install wandb; WANDB_MODE=offline for no network)",
}
WANDB_ID_FILE = "wandb_id.txt"


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (a line cut by a crash is skipped)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def check_loggers(value: str) -> None:
    """``ConfigError`` for an unknown logger name, or wandb without its package."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"loggers={value!r}: unknown {', '.join(unknown)}; choose from {', '.join(LOGGERS)}"
        )
    if "wandb" in names and not _wandb_installed():
        raise ConfigError("loggers=wandb needs the wandb package: pip install wandb")


def _scalars(record: dict, group: str) -> dict:
    return {
        f"{group}/{k}": v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        if math.isfinite(v)
    }


class TensorBoardSink:
    """TensorBoard scalars. The point of ``start_step`` itself was logged before the checkpoint
    and is not logged again (the run goes on at start_step + 1), so the purge starts after it."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def write(self, record: dict, group: str) -> None:
        for tag, v in _scalars(record, group).items():
            self.writer.add_scalar(tag, v, record["step"])

    def close(self) -> None:
        self.writer.close()


class CsvSink:
    """``metrics.csv``: the records of ``metrics.jsonl`` as rows (see the module docstring)."""

    def __init__(self, run_dir: Path, records: list[dict]) -> None:
        self.path = run_dir / "metrics.csv"
        self.columns: list[str] = ["step"]
        self._rewrite(records)

    def _add_columns(self, record: dict) -> bool:
        new = [k for k in record if k not in self.columns]
        self.columns += new
        return bool(new)

    def _rewrite(self, records: list[dict]) -> None:
        for r in records:
            self._add_columns(r)
        self.records = list(records)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(_cells(r) for r in records)

    def write(self, record: dict, group: str) -> None:
        self.records.append(record)
        if self._add_columns(record):
            self._rewrite(self.records)
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="", extrasaction="ignore").writerow(
                _cells(record)
            )

    def close(self) -> None:
        pass


def _cells(record: dict) -> dict:
    return {k: "" if v is None else v for k, v in record.items()}


class WandbSink:
    """A W&B run whose id lives in the run folder (the same run after a resume).

    What W&B does with it (wandb 0.31): offline, each opening writes its own
    ``wandb/offline-run-<time>-<id>`` folder under the same id, and ``wandb sync`` merges them
    in time order; online, a resumed run goes on from the server's last step, so the steps
    between the checkpoint and a crash are already there: W&B keeps those (it ignores a step
    below its last one, with a warning), and they hold the same values, the resume being exact.
    Closing finishes the run and stops W&B's service process (``wandb-core``) unless another
    W&B run of this process is still open."""

    def __init__(self, run_dir: Path, config: dict, name: str) -> None:
        import wandb

        id_path = run_dir / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if id_path.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(4)  # W&B's own ids are 8 lowercase characters too
            id_path.write_text(run_id + "\n")
        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "tokenmorph"),
                name=name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config,
                settings=wandb.Settings(
                    console="off", x_disable_stats=True, x_disable_meta=True, disable_git=True
                ),
            )
        except (wandb.errors.Error, ValueError) as e:  # no API key or server, a bad WANDB_MODE
            wandb.teardown()
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            why = " ".join(x for x in lines if not x.startswith("For further")) or type(e).__name__
            raise ConfigError(
                f"loggers=wandb: W&B could not start its run ({why[:300]}); "
                "run `wandb login`, or set WANDB_MODE=offline to write it for `wandb sync`"
            ) from None

    def write(self, record: dict, group: str) -> None:
        # always the step: W&B keeps one row per step, steps increasing (a resume goes on after
        # the checkpoint's)
        self.run.log(_scalars(record, group), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
        if self.wandb.run is None:  # no other run of this process: stop the service too
            self.wandb.teardown()


def open_sinks(
    names: list[str],
    run_dir: Path,
    start_step: int,
    config: dict,
    name: str,
    message: Callable[[str], None],
) -> list:
    """The sinks of ``names`` for a run opening at ``start_step`` (metrics.jsonl already cut back
    to it); a logger whose package is missing is named and left out (wandb is checked with the
    config, before any work)."""
    sinks = []
    for n in names:
        if n == "tensorboard":
            try:
                sinks.append(TensorBoardSink(run_dir, start_step))
            except ImportError:
                message(
                    "tensorboard is not installed: no TensorBoard logs (pip install tensorboard)"
                )
        elif n == "csv":
            sinks.append(CsvSink(run_dir, read_records(run_dir / "metrics.jsonl")))
        elif n == "wandb":
            if not _wandb_installed():
                raise ConfigError("loggers=wandb needs the wandb package: pip install wandb")
            sinks.append(WandbSink(run_dir, config, name))
    return sinks
