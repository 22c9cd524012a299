"""What a run reports while it trains: ``metrics.jsonl`` (one JSON object every ``log_every``
steps, and one per k-NN monitor point), the ``loggers`` (TensorBoard scalars, ``metrics.csv``,
Weights & Biases: :mod:`.log_sinks`), and progress: a bar with loss, lr, img/s and ETA on a
terminal, a plain line every ``log_every`` steps elsewhere (a batch job's log file). Only the
main process writes. No NaN or infinity is ever written as JSON: they become null
(:func:`json_safe`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .log_sinks import open_sinks
from .progress import format_seconds, is_terminal

__all__ = ["RunLogger", "json_safe", "dump_json", "truncate_metrics"]


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, inf), however deeply nested, replaced by None:
    JSON has no NaN, and Python's json module would write an invalid ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dump_json(obj, **kwargs) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``, refusing any NaN left
    (``allow_nan=False``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def truncate_metrics(path: Path, step: int) -> None:
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


class RunLogger:
    """Collects each step's numbers and writes a record every ``log_every`` steps (and at the
       last
    step).

    A record holds the window's mean loss (over its finite steps), the step's lr, weight decay
    and gradient norm, img/s over the window, the run's counters, the objective's own logs
    (window means) and the time since this invocation started.
    """

    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        total_steps: int,
        steps_per_epoch: int,
        log_every: int,
        tensorboard: bool,
        desc: str,
        loggers: str = "tensorboard",
        run_config: dict | None = None,
    ) -> None:
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.total_steps, self.steps_per_epoch, self.log_every = (
            total_steps,
            steps_per_epoch,
            log_every,
        )
        self.tensorboard, self.desc = tensorboard, desc
        self.loggers = [n.strip() for n in loggers.split(",") if n.strip()]
        if not tensorboard:  # the older switch still turns TensorBoard off
            self.loggers = [n for n in self.loggers if n != "tensorboard"]
        self.run_config = run_config or {}
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.sinks: list = []
        self.bar = None
        self.last_monitor: dict | None = None

    def message(self, text: str) -> None:
        """One ``[tokenmorph]`` line on stdout (main process only)."""
        if self.is_main:
            print(f"[tokenmorph] {text}", flush=True)

    def open(self, start_step: int) -> RunLogger:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            truncate_metrics(self.metrics_path, start_step)
        if self.is_main:
            name = self.run_config.get("name", self.run_dir.name)
            self.sinks = open_sinks(
                self.loggers, self.run_dir, start_step, self.run_config, name, self.message
            )
        if self.is_main and is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total_steps,
                initial=start_step,
                dynamic_ncols=True,
                unit="step",
                desc=self.desc,
            )
        self.start_step = start_step
        self.t_start = self.t_window = time.perf_counter()
        self._reset_window()
        return self

    def _reset_window(self) -> None:
        self.n_images, self.loss_sum, self.loss_count, self.logs = 0, 0.0, 0, {}

    def add_logs(self, logs: dict, weight: float) -> None:
        """Add an objective's logs of one micro-batch (``weight`` = 1 / accumulation steps).
        Tensor values stay on their device until a record is written (no host sync a step)."""
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.logs[k] = self.logs.get(k, 0.0) + v * weight

    def step(
        self,
        step: int,
        loss: float | None,
        images: int,
        lr: float,
        weight_decay: float,
        grad_norm: float,
        counters: dict,
    ) -> None:
        """Account one finished optimiser step (``loss=None``: a skipped step); write a record
        when the step is a multiple of ``log_every`` or the last (its loss is null when every
        step of the window was skipped)."""
        self.n_images += images
        if loss is not None:
            self.loss_sum += loss
            self.loss_count += 1
        if step % self.log_every == 0 or step == self.total_steps:
            now = time.perf_counter()
            rate = self.n_images / max(now - self.t_window, 1e-9)
            n = max(self.loss_count, 1)
            record = {
                "step": step,
                "epoch": round(step / self.steps_per_epoch, 4),
                "loss": self.loss_sum / n if self.loss_count else float("nan"),  # null: none
                "lr": lr,
                "weight_decay": weight_decay,
                "grad_norm": grad_norm,
                "img_per_s": rate,
                **counters,
                "time_s": now - self.t_start,
                **{k: float(v) / n for k, v in self.logs.items()},
            }
            self._write(record)
            self._show(record, now)
            self.t_window = now
            self._reset_window()
        if self.bar is not None:
            self.bar.update(1)

    def monitor(self, step: int, values: dict) -> None:
        """A k-NN monitor point: a metrics.jsonl record of its own (``step``, ``epoch`` and the
        monitor's numbers), the loggers under ``monitor/``, and one line with its cost."""
        self.last_monitor = values
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), **values}
        self._write(record, "monitor")
        self.message(
            f"k-NN monitor at step {step}: top-1 {100 * values['knn_top1']:.2f}% top-5 "
            f"{100 * values['knn_top5']:.2f}% ({values['knn_seconds']:.1f} s)"
        )

    def _show(self, record: dict, now: float) -> None:
        """The record on the bar, or as a plain line when there is no terminal."""
        loss = "n/a" if self.loss_count == 0 else f"{record['loss']:.4f}"
        knn = {}
        if self.last_monitor is not None:
            knn = {"knn": f"{100 * self.last_monitor['knn_top1']:.1f}%"}
        if self.bar is not None:
            self.bar.set_postfix(
                loss=loss,
                lr=f"{record['lr']:.2e}",
                img_s=f"{record['img_per_s']:.0f}",
                skipped=record.get("skipped_images", 0),
                **knn,
                refresh=False,
            )
            return
        step, total = record["step"], self.total_steps
        done = step - self.start_step
        eta = (total - step) * (now - self.t_start) / max(done, 1)
        self.message(
            f"step {step}/{total} ({100 * step // max(total, 1)}%) loss {loss} lr "
            f"{record['lr']:.2e} {record['img_per_s']:.1f} img/s skipped "
            f"{record.get('skipped_images', 0)} "
            + (f"knn top-1 {knn['knn']} " if knn else "")
            + f"elapsed {format_seconds(now - self.t_start)} ETA {format_seconds(eta)}"
        )

    def _write(self, record: dict, group: str = "train") -> None:
        """One record to metrics.jsonl, then to every logger (scalars named ``group/key``)."""
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(dump_json(record) + "\n")
        for sink in self.sinks:
            sink.write(json_safe(record), group)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
