"""Pre-train several configs under the same budget, evaluate each the same way, side by side.

``tokenmorph compare --configs demo demo-tokenwise`` is the DTM vs token-wise comparison of the
README; ``tokenmorph compare --configs demo`` is the main job's pre-training + evaluation. For
every config: its pre-training (resumed or skipped when its run folder already finished), then on
the evaluation data: weighted k-NN (k = 20) and a linear probe on frozen CLS features (extracted
once), and the token-wise distillation loss of the student on held-out images (one yardstick for
objectives whose own training losses are not comparable: DTM's loss is measured on group means).
"""

from __future__ import annotations

import json
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

__all__ = ["compare", "heldout_token_loss", "objective_label", "markdown_table"]


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
) -> list[dict]:
    """Pre-train (or resume, or skip when finished) each config in ``output_dir/CONFIG`` with
    ``overrides``, then evaluate each on ``data`` (when it names no data: the config's own, e.g.
    Fashion-MNIST): k-NN, linear probe, and the token-wise loss on held-out images (the val
    split). Writes ``compare.md``, ``compare.json`` and ``compare_curves.png`` into
    ``output_dir``; returns the rows."""
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    out = Path(output_dir)
    rows = []
    cfgs = [
        load_config(name, overrides) for name in configs
    ]  # every config checked before any work
    for cfg in cfgs:
        cfg.output_dir = str(out / cfg.name)
        run_dir = Path(cfg.output_dir)
        done = run_dir / "summary.json"
        summary = json.loads(done.read_text()) if done.exists() else {}
        if not summary.get("finished"):
            summary = pretrain(cfg)
        else:
            print(
                f"[tokenmorph] {cfg.name}: already trained ({summary['steps']} steps), evaluating",
                flush=True,
            )
        start = time.perf_counter()
        eval_data = (
            data
            if (data.dataset or data.train)
            else EvalData(**{**vars(data), "dataset": cfg.data})
        )
        train, val, info = extract_eval_features(
            str(run_dir), eval_data, device=device, progress=True, num_workers=workers
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
        rows.append(
            {
                "config": cfg.name,
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
                "eval_minutes": (time.perf_counter() - start) / 60,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown_table(rows) + "\n")
    (out / "compare.json").write_text(dump_json(rows, indent=2))
    plot_runs([out / cfg.name for cfg in cfgs], out / "compare_curves.png")
    return rows


def objective_label(cfg) -> str:
    """'DTM (release)', 'token-wise', or framework / objective / loss for the other objectives."""
    if cfg.framework == "beit" and cfg.objective == "mask" and resolve_loss(cfg) == "dtm":
        return "token-wise" if cfg.scheduler == "none" else f"DTM ({cfg.scheduler})"
    return f"{cfg.framework} {cfg.objective}, {resolve_loss(cfg)} on {cfg.teacher}"


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table (accuracies in %)."""
    head = (
        "| config | objective | steps | train loss (own objective) | held-out token-wise loss "
        "| k-NN top-1 | linear top-1 | train time |\n|---|---|---|---|---|---|---|---|"
    )

    def loss(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"| {r['config']} | {r['objective']} | {r['steps']} | {loss(r['train_loss'])} | "
        f"{loss(r['heldout_token_loss'])} | "
        f"{100 * r['knn_top1']:.2f}% | {100 * r['linear_top1']:.2f}% | {r['train_minutes']:.1f} "
        "min |"
        for r in rows
    ]
    return "\n".join([head, *lines])
