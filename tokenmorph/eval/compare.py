"""Pre-train several configs under the same budget, evaluate each the same way, side by side.

``tokenmorph compare --configs demo demo-tokenwise`` is the DTM vs token-wise comparison of the
README; ``tokenmorph compare --configs demo`` is the main job's pre-training + evaluation. For
every config: its pre-training (resumed or skipped when its run folder already finished), then on
the evaluation data: weighted k-NN (k = 20) and a linear probe on frozen CLS features (extracted
once), and the token-wise distillation loss of the student on held-out images (one yardstick for
objectives whose own training losses are not comparable: DTM's loss is measured on group means).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import build_dataset, collate_skip, default_crop_pct, eval_transform
from ..hub.backbone import load_pretrain_checkpoint
from ..models import student_from_checkpoint
from ..ops.losses import dtm_loss
from ..recipes.config import load_config
from ..recipes.objectives import build_block_masking, resolve_loss
from ..recipes.pretrain import build_student_and_teacher, pretrain
from ..runtime.distributed import resolve_device
from ..runtime.run_logger import dump_json
from ..viz import plot_runs
from .features import EvalData, extract_eval_features
from .knn import knn_classify
from .linear import linear_probe

__all__ = [
    "compare",
    "evaluate_run",
    "seed_run_dir",
    "seed_summary",
    "seeds_markdown",
    "t_critical",
    "heldout_token_loss",
    "objective_label",
    "markdown_table",
]


def heldout_token_loss(cfg, run_dir: Path, dataset, num_images: int, device) -> float:
    """Mean token-wise smooth-L1 (beta = cfg.beta) between the student's predictions on
       block-masked
    held-out images and the teacher's targets: the same number for every objective."""
    ckpt, path, record = load_pretrain_checkpoint(run_dir, "the held-out token loss")
    student = student_from_checkpoint(ckpt, record, str(path)).to(device).eval()
    _, teacher = build_student_and_teacher(cfg, device)
    masking = build_block_masking(cfg, student.grid)
    rng = np.random.default_rng(cfg.seed)
    n = min(num_images, len(dataset))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(n)), batch_size=256, collate_fn=collate_skip
    )
    total, count = 0.0, 0
    with torch.inference_mode():
        for images, _, _ in loader:
            images = images.to(device)
            mask = torch.from_numpy(
                np.stack([masking.sample(rng).reshape(-1) for _ in range(len(images))])
            ).to(device)
            pred = student(images, mask)
            total += float(
                dtm_loss(pred.float(), teacher(images, student.grid), [[]], beta=cfg.beta)
            ) * len(images)
            count += len(images)
    return total / max(count, 1)


def seed_run_dir(out: Path, config: str, seed: int, base_seed: int) -> Path:
    """The run folder of one seed: ``OUT/CONFIG`` for the config's own seed (the one-seed layout,
    so an existing comparison is the first seed of a multi-seed one), ``OUT/CONFIG/seed-S`` for
    the others."""
    return out / config if seed == base_seed else out / config / f"seed-{seed}"


def _train_or_resume(run, cfg) -> dict:
    """``run(cfg)`` unless ``cfg.output_dir`` holds a finished run (its summary.json)."""
    done = Path(cfg.output_dir) / "summary.json"
    summary = json.loads(done.read_text()) if done.exists() else {}
    if summary.get("finished"):
        print(
            f"[tokenmorph] {Path(cfg.output_dir)}: already trained ({summary['steps']} steps)",
            flush=True,
        )
        return summary
    return run(cfg)


def compare(
    configs: Sequence[str],
    overrides: dict,
    output_dir,
    data: EvalData,
    *,
    probe_epochs: int = 100,
    loss_images: int = 2000,
    device: str = "auto",
    num_workers: int | None = None,
    seeds: int = 1,
    seg_probe: dict | None = None,
    segment_config: str | None = None,
    segment_overrides: dict | None = None,
) -> list[dict]:
    """Pre-train (or resume, or skip when finished) each config with ``overrides`` and
    ``seeds`` seeds (the config's seed, +1, ...; folders by :func:`seed_run_dir`), then evaluate
    each run on ``data`` (when it names no data: the config's own, e.g. Fashion-MNIST): k-NN,
    linear probe (seeded by the run's seed), the token-wise loss on held-out images; with
    ``seg_probe`` (keyword arguments of :func:`~tokenmorph.eval.segmentation.seg_linear_probe`)
    the segmentation probe's mIoU; with ``segment_config`` (a segment config, plus
    ``segment_overrides``) an UperNet fine-tune's mIoU (run folder ``RUN/segment-CONFIG``).

    Writes ``compare.md`` (one row per run; with several seeds the mean and spread per config and
    the paired differences to the first config: :func:`seed_summary`), ``compare.json`` (the
    rows, rewritten after every run), ``compare_seeds.json`` (with several seeds: the summary)
    and ``compare_curves.png`` (each config's first seed) into ``output_dir``; returns the rows."""
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    out = Path(output_dir)
    rows = []
    cfgs = [
        load_config(name, overrides) for name in configs
    ]  # every config checked before any work
    seg_cfg = None
    if segment_config is not None:  # checked before any work, too
        seg_cfg = load_config(segment_config, segment_overrides or {}, kind="segment")
    for name, base in zip(configs, cfgs):
        for k in range(seeds):
            cfg = load_config(name, overrides)
            cfg.seed = base.seed + k
            run_dir = seed_run_dir(out, cfg.name, cfg.seed, base.seed)
            cfg.output_dir = str(run_dir)
            summary = _train_or_resume(pretrain, cfg)
            rows.append(
                evaluate_run(
                    cfg,
                    run_dir,
                    summary,
                    data,
                    probe_epochs=probe_epochs,
                    loss_images=loss_images,
                    device=device,
                    num_workers=workers,
                    seg_probe=seg_probe,
                    seg_cfg=seg_cfg,
                )
            )
            # the rows so far: a long comparison shows what it has measured while it runs
            out.mkdir(parents=True, exist_ok=True)
            (out / "compare.json").write_text(dump_json(rows, indent=2))
    text = markdown_table(rows)
    if seeds > 1:
        stats = seed_summary(rows)
        (out / "compare_seeds.json").write_text(dump_json(stats, indent=2))
        text += "\n\n" + seeds_markdown(stats)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(dump_json(rows, indent=2))
    plot_runs([out / cfg.name for cfg in cfgs], out / "compare_curves.png")
    return rows


def evaluate_run(
    cfg,
    run_dir: Path,
    summary: dict,
    data: EvalData,
    *,
    probe_epochs: int,
    loss_images: int,
    device: str,
    num_workers: int,
    seg_probe: dict | None = None,
    seg_cfg=None,
) -> dict:
    """One row of the comparison: the run's k-NN, linear probe, held-out token loss, and the
    segmentation metrics asked for (see :func:`compare`)."""
    start = time.perf_counter()
    eval_data = (
        data if (data.dataset or data.train) else EvalData(**{**vars(data), "dataset": cfg.data})
    )
    train, val, info = extract_eval_features(
        str(run_dir), eval_data, device=device, progress=True, num_workers=num_workers
    )
    knn = knn_classify(
        train.features, train.labels, val.features, val.labels, num_classes=info["num_classes"]
    )
    k = min(20, info["num_train"])
    linear = linear_probe(
        train.features,
        train.labels,
        val.features,
        val.labels,
        info["num_classes"],
        epochs=probe_epochs,
        seed=cfg.seed,
        progress=True,
    )
    held = build_dataset(
        data.val or data.dataset or cfg.data,
        train=False,
        transform=eval_transform(cfg.img_size, crop_pct=default_crop_pct(cfg.img_size)),
    )
    # the yardstick of the DTM family: a teacher's tokens predicted on the input frame from
    # block masks
    comparable = cfg.framework == "beit" and cfg.objective == "mask" and cfg.teacher != "pixels"
    token_loss = (
        heldout_token_loss(cfg, run_dir, held, loss_images, resolve_device(device))
        if comparable
        else None
    )
    row = {
        "config": cfg.name,
        "seed": cfg.seed,
        "run_dir": str(run_dir),
        "objective": objective_label(cfg),
        "steps": summary["steps"],
        "train_loss": summary["final_loss"],
        "train_minutes": summary["wall_time_s"] / 60,
        "heldout_token_loss": token_loss,
        "knn_top1": knn[k]["top1"],
        "knn_top5": knn[k]["top5"],
        "linear_top1": linear["best"]["top1"],
        "linear_top5": linear["best"]["top5"],
        "linear_lr": linear["best"]["lr"],
        "num_train": info["num_train"],
        "num_val": info["num_val"],
    }
    if seg_probe is not None:
        from .segmentation import seg_linear_probe

        probe = seg_linear_probe(
            str(run_dir),
            **{"device": device, "num_workers": num_workers, "progress": False, **seg_probe},
            seed=cfg.seed,
        )
        row.update(seg_linear_miou=probe["mIoU"], seg_linear_macc=probe["mAcc"])
    if seg_cfg is not None:
        from ..recipes.segment import segment

        seg = dataclasses.replace(
            seg_cfg,
            checkpoint=str(run_dir),
            seed=cfg.seed,
            device=device,
            output_dir=str(run_dir / f"segment-{seg_cfg.name}"),
        )
        result = _train_or_resume(segment, seg)
        row.update(segment_miou=result["mIoU"], segment_macc=result["mAcc"])
    row["eval_minutes"] = (time.perf_counter() - start) / 60
    return row


# the metrics summarised over seeds: row key -> table header (accuracies and mIoU in %)
SEED_METRICS = {
    "knn_top1": "k-NN top-1",
    "linear_top1": "linear top-1",
    "seg_linear_miou": "seg-linear mIoU",
    "segment_miou": "UperNet mIoU",
    "heldout_token_loss": "held-out token loss",
    "train_loss": "train loss",
}
# two-sided 95% quantiles of Student's t by degrees of freedom (the normal's 1.96 past 30)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


def t_critical(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (for a table's gap:
    the next smaller listed df, which is conservative)."""
    if df > 30:
        return 1.960
    return T_975[max(d for d in T_975 if d <= df)]


def seed_summary(rows: list[dict]) -> dict:
    """Per config and metric of :data:`SEED_METRICS` (those every run of it has): the values
    over seeds, their mean and sample standard deviation; and for every config after the first,
    the paired difference to the first config over the seeds both have: the mean difference,
    its standard deviation, the 95% t-interval of the mean, and whether it excludes 0."""
    by_config: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[r["seed"]] = r
    names = list(by_config)
    first = names[0]
    out = {"reference": first, "configs": []}
    for name in names:
        runs = by_config[name]
        entry = {"config": name, "seeds": sorted(runs), "metrics": {}, "paired": {}}
        for key in SEED_METRICS:
            values = [runs[s].get(key) for s in sorted(runs)]
            if not values or any(v is None for v in values):
                continue
            entry["metrics"][key] = _mean_sd(values)
            if name != first:
                common = [
                    s for s in sorted(runs) if by_config[first].get(s, {}).get(key) is not None
                ]
                diffs = [runs[s][key] - by_config[first][s][key] for s in common]
                if diffs:
                    d = _mean_sd(diffs)
                    if len(diffs) > 1:
                        half = t_critical(len(diffs) - 1) * d["sd"] / math.sqrt(len(diffs))
                        d.update(ci95=[d["mean"] - half, d["mean"] + half])
                        d["significant"] = abs(d["mean"]) > half
                    entry["paired"][key] = d
        out["configs"].append(entry)
    return out


def _mean_sd(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"values": list(values), "mean": mean, "sd": sd, "n": n}


def seeds_markdown(stats: dict) -> str:
    """The seed summary as two Markdown tables: mean ± sd per config, then the paired
    difference to the reference config (mean, 95% interval; * = the interval excludes 0).
    Accuracies and mIoU in points (%)."""
    keys = [k for k in SEED_METRICS if any(k in c["metrics"] for c in stats["configs"])]

    def scale(key):
        return 1.0 if "loss" in key else 100.0

    head = "| config | seeds | " + " | ".join(SEED_METRICS[k] for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for c in stats["configs"]:
        cells = []
        for k in keys:
            m = c["metrics"].get(k)
            f = scale(k)
            cells.append("n/a" if m is None else f"{f * m['mean']:.2f} ± {f * m['sd']:.2f}")
        lines.append(f"| {c['config']} | {len(c['seeds'])} | " + " | ".join(cells) + " |")
    ref = stats["reference"]
    lines += [
        "",
        f"| paired difference to {ref} | " + " | ".join(SEED_METRICS[k] for k in keys) + " |",
    ]
    lines.append("|" + "---|" * (len(keys) + 1))
    for c in stats["configs"][1:]:
        cells = []
        for k in keys:
            d = c["paired"].get(k)
            f = scale(k)
            if d is None:
                cells.append("n/a")
            elif "ci95" in d:
                lo, hi = d["ci95"]
                star = " *" if d["significant"] else ""
                cells.append(f"{f * d['mean']:+.2f} [{f * lo:+.2f}, {f * hi:+.2f}]{star}")
            else:
                cells.append(f"{f * d['mean']:+.2f}")
        lines.append(f"| {c['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def objective_label(cfg) -> str:
    """'DTM (release)', 'token-wise', or framework / objective / loss for the other objectives."""
    if cfg.framework == "beit" and cfg.objective == "mask" and resolve_loss(cfg) == "dtm":
        return "token-wise" if cfg.scheduler == "none" else f"DTM ({cfg.scheduler})"
    return f"{cfg.framework} {cfg.objective}, {resolve_loss(cfg)} on {cfg.teacher}"


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table, one row per run (accuracies and mIoU in %); a seed
    column when the runs have several seeds, segmentation columns when they were measured."""
    seeded = len({r.get("seed") for r in rows}) > 1
    extra = [
        (k, h)
        for k, h in (("seg_linear_miou", "seg-linear mIoU"), ("segment_miou", "UperNet mIoU"))
        if any(k in r for r in rows)
    ]
    cols = [
        "config",
        "objective",
        *(["seed"] if seeded else []),
        "steps",
        "train loss (own objective)",
        "held-out token-wise loss",
        "k-NN top-1",
        "linear top-1",
        *(h for _, h in extra),
        "train time",
    ]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)

    def loss(v):
        return "n/a" if v is None else f"{v:.4f}"

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = []
    for r in rows:
        cells = [
            r["config"],
            r["objective"],
            *([str(r["seed"])] if seeded else []),
            str(r["steps"]),
        ]
        cells += [
            loss(r["train_loss"]),
            loss(r["heldout_token_loss"]),
            pct(r["knn_top1"]),
            pct(r["linear_top1"]),
        ]
        cells += [pct(r.get(k)) for k, _ in extra]
        cells.append(f"{r['train_minutes']:.1f} min")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, *lines])
