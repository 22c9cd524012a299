"""``tokenmorph plot RUN_DIR... --out PNG``: training curves of several runs overlaid.

Reads each run's ``metrics.jsonl`` (what the training engine writes every ``log_every`` steps)
and draws one panel per metric key against the step, with :func:`tokenmorph.viz.plot_runs` (the
same function that writes every run's own ``loss_curve.png``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DataError

HELP = "training curves of one or more runs"
DESCRIPTION = """\
Overlay the training curves of one or more runs (loss, learning rate, throughput by default) from
their metrics.jsonl files, one panel per metric against the step. A RUN may be a run folder or
its metrics.jsonl file. Any numeric key of metrics.jsonl can be drawn (--keys), e.g. grad_norm,
weight_decay, groups, knn_top1 (the k-NN monitor's, drawn by default when a run logs it).
--smooth applies TensorBoard-style exponential smoothing (the raw curve
stays, faint)."""

DEFAULT_KEYS = "loss,lr,img_per_s"  # and knn_top1 when a run logs it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders (or their metrics.jsonl files)"
    )
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument(
        "--keys",
        default=None,
        help=f"metric keys, one panel each (default {DEFAULT_KEYS}, and knn_top1 when logged)",
    )
    parser.add_argument(
        "--smooth", type=float, default=0.0, help="EMA smoothing weight in [0, 1) (default 0: none)"
    )
    parser.add_argument(
        "--labels", help="legend names, comma-separated, one per run (default: folder names)"
    )


def _run_dir(path: str) -> Path:
    """A run folder from a folder or a metrics.jsonl path; DataError when it holds no
    metrics.jsonl."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == "metrics.jsonl":
        p = p.parent
    if not (p / "metrics.jsonl").is_file():
        what = "does not exist" if not p.exists() else "holds no metrics.jsonl"
        raise DataError(
            f"run {path} {what}; pass a run folder written by tokenmorph pretrain (or its "
            "metrics.jsonl)"
        )
    return p


def run(args: argparse.Namespace) -> int:
    from ..viz import plot_runs, read_metrics
    from ..viz.curves import default_keys

    dirs = [_run_dir(r) for r in args.runs]
    records = [read_metrics(d) for d in dirs]
    if args.keys is None:
        keys = list(default_keys(records))
    else:
        keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    if not keys:
        raise DataError("--keys is empty; give metric keys such as loss,lr,img_per_s")
    if not 0 <= args.smooth < 1:
        raise DataError(f"--smooth must be in [0, 1), got {args.smooth}")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(dirs):
        raise DataError(
            f"--labels gives {len(labels)} names for {len(dirs)} runs; give one per run"
        )
    if labels is None:  # folder names, or whole paths when two runs share a name (a/run, b/run)
        labels = (
            [d.name for d in dirs]
            if len({d.name for d in dirs}) == len(dirs)
            else [str(d) for d in dirs]
        )
    available = {
        k for recs in records for r in recs for k, v in r.items() if isinstance(v, (int, float))
    }
    missing = [k for k in keys if k not in available]
    if missing:
        raise DataError(
            f"no run logs {', '.join(missing)}; logged keys: "
            f"{', '.join(sorted(available)) or 'none'}"
        )
    out = plot_runs(dirs, args.out, keys, smooth=args.smooth, labels=labels)
    counts = ", ".join(f"{name}: {len(r)} records" for name, r in zip(labels, records))
    print(f"wrote {out}  ({len(dirs)} runs x {len(keys)} keys; {counts})")
    return 0
