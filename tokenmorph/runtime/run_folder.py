"""A run folder from start to finish, the same for every kind of run: resume from its newest
checkpoint, record the config, announce, train, write ``summary.json`` (and the loss curve)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

__all__ = ["run_dir_for", "run_in_folder"]


def run_dir_for(cfg) -> Path:
    """``output_dir``, or ``runs/<config name>``."""
    return Path(cfg.output_dir) if cfg.output_dir else Path("runs") / cfg.name


def run_in_folder(
    engine, cfg, describe: str, finish: Callable[[dict], dict] | None = None, plot: bool = True
) -> dict | None:
    """Resume ``engine`` from its run folder, write ``config.yaml``, print ``[tokenmorph]
    starting|resuming ...: <describe>``, train, then (main process) add ``finish(summary)``'s
    entries, write ``summary.json`` and, with ``plot``, ``loss_curve.png``. Returns the summary
    (None on the other processes when ``finish`` is given: its work, e.g. a final evaluation,
    runs on the main process only)."""
    run_dir = engine.run_dir
    resumed = engine.resume()
    is_main = engine.dist.is_main
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        where = f"resuming from {resumed} (step {engine.step})" if resumed else "starting"
        print(f"[tokenmorph] {where}: {describe}", flush=True)
    summary = engine.train()
    if finish is not None:
        if not is_main:
            return None
        summary.update(finish(summary))
    summary.update(config=cfg.name, run_dir=str(run_dir))
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if plot:
            try:
                from ..viz import plot_runs

                summary["plot"] = str(plot_runs([run_dir], run_dir / "loss_curve.png"))
            except ImportError:  # matplotlib is an optional extra
                pass
    return summary
