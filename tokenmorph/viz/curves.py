"""Training curves: the records of a run's metrics.jsonl, smoothing, and several runs overlaid."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._mpl import pyplot, save_figure

__all__ = ["DEFAULT_KEYS", "MONITOR_KEY", "read_metrics", "smooth_ema", "default_keys", "plot_runs"]

DEFAULT_KEYS = ("loss", "lr", "img_per_s")
MONITOR_KEY = "knn_top1"  # the k-NN monitor's curve, drawn by default when a run logs it


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (unparseable lines are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def smooth_ema(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard-style smoothing: exponential moving average ``s_t = w s_{t-1} + (1 - w) x_t``,
    debiased by ``1 - w^t`` so the curve starts at the first value; ``weight=0`` returns the
    values."""
    x = np.asarray(values, dtype=np.float64)
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc = np.empty_like(x), 0.0
    for t, v in enumerate(x):  # a recurrence over time, not over a batch
        acc = weight * acc + (1 - weight) * v
        out[t] = acc / (1 - weight ** (t + 1))
    return out


def default_keys(runs_records: Sequence[list[dict]]) -> tuple[str, ...]:
    """:data:`DEFAULT_KEYS`, and the k-NN monitor's top-1 when one of the runs logs it."""
    logged = any(r.get(MONITOR_KEY) is not None for records in runs_records for r in records)
    return DEFAULT_KEYS + ((MONITOR_KEY,) if logged else ())


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    keys: Sequence[str] | None = None,
    *,
    smooth: float = 0.0,
    labels: Sequence[str] | None = None,
) -> Path:
    """Training curves of one or more runs overlaid, one panel per metric key, against the step.

    ``smooth``: EMA weight in [0, 1) (see :func:`smooth_ema`); the raw curve stays, faint, behind
    the smoothed one. ``labels``: legend names (default: the run folders' names). ``keys``:
    default :func:`default_keys` (the k-NN monitor's curve included when logged)."""
    plt = pyplot()
    names = list(labels) if labels is not None else [Path(d).name for d in run_dirs]
    runs = [(name, read_metrics(d)) for name, d in zip(names, run_dirs)]
    keys = tuple(keys) if keys is not None else default_keys([r for _, r in runs])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, records in runs:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not pts:
                continue
            steps, values = zip(*pts)
            if smooth:
                (line,) = ax.plot(steps, values, lw=0.8, alpha=0.3)
                ax.plot(
                    steps, smooth_ema(values, smooth), label=name, lw=1.4, color=line.get_color()
                )
            else:
                ax.plot(steps, values, label=name, lw=1.4)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out, dpi=100)
