"""Pre-train several configs under the same budget, evaluate each the same way, print them side by side.

``tokenmorph compare --configs demo demo-tokenwise`` is the DTM vs token-wise comparison of the README;
``tokenmorph compare --configs demo`` is the main job's pre-training + evaluation. For every config: its
pre-training (resumed or skipped when its run folder already finished), then on the evaluation data:
weighted k-NN (k = 20) and a linear probe on frozen CLS features (extracted once), and the token-wise
distillation loss of the student on held-out images (one yardstick for objectives whose own training
losses are not comparable: DTM's loss is measured on group means).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DESCRIPTION = """Pre-train each config under the same budget, then evaluate each (k-NN, linear probe on frozen
features, token-wise distillation loss on held-out images) and print a side-by-side table. Run folders
are OUT/CONFIG: an interrupted comparison resumes, a finished run is not trained again.

examples:
  tokenmorph compare --configs demo demo-tokenwise --output-dir outputs/compare
  tokenmorph compare --configs demo --output-dir outputs            # the README's main job
  tokenmorph compare --configs smoke --data DIR --eval-train T --eval-val V max_steps=10"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=["demo", "demo-tokenwise"], metavar="CONFIG",
                   help="pre-training configs to compare (default: demo demo-tokenwise)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every config")
    p.add_argument("--output-dir", default="outputs/compare", help="parent of the run folders (default outputs/compare)")
    p.add_argument("--data", help="pre-training data for every config")
    p.add_argument("--eval-dataset", default=None, help="fashion-mnist (default when the training data is fashion-mnist)")
    p.add_argument("--eval-train", metavar="DIR", help="evaluation ImageFolder train tree (instead of --eval-dataset)")
    p.add_argument("--eval-val", metavar="DIR", help="evaluation ImageFolder val tree")
    p.add_argument("--limit-train", type=int, help="evaluate with N training images (seeded subset)")
    p.add_argument("--limit-val", type=int, help="evaluate with N validation images (seeded subset)")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs over cached features (default 100)")
    p.add_argument("--loss-images", type=int, default=2000, help="held-out images for the token-wise loss (default 2000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def _eval_namespace(args, checkpoint: str, data: str) -> argparse.Namespace:
    """The common evaluation flags, as ``tokenmorph eval`` parses them."""
    from .eval.features import add_common_arguments

    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    argv = ["--checkpoint", checkpoint, "--device", args.device, "--no-progress"]
    if args.eval_train or args.eval_val:
        argv += ["--train", str(args.eval_train), "--val", str(args.eval_val)]
    else:
        argv += ["--dataset", args.eval_dataset or data]
    for flag, value in (("--limit-train", args.limit_train), ("--limit-val", args.limit_val)):
        if value:
            argv += [flag, str(value)]
    return parser.parse_args(argv)


def heldout_token_loss(cfg, run_dir: Path, dataset, num_images: int, device) -> float:
    """Mean token-wise smooth-L1 (beta = cfg.beta) between the student's predictions on block-masked
    held-out images and the teacher's targets: the same number for every objective."""
    import numpy as np
    import torch

    from .backbone import student_from_checkpoint
    from .data import collate_skip
    from .losses import dtm_loss
    from .masking import BlockMasking
    from .pretrain import build_student_and_teacher
    from .train import latest_checkpoint, load_checkpoint

    student = student_from_checkpoint(load_checkpoint(latest_checkpoint(run_dir))).to(device).eval()
    _, teacher = build_student_and_teacher(cfg, device)
    masking = BlockMasking(student.grid, cfg.num_masked, min(cfg.min_mask_block, max(cfg.num_masked, 1)))
    rng = np.random.default_rng(cfg.seed)
    n = min(num_images, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=256,
                                         collate_fn=collate_skip)
    total, count = 0.0, 0
    with torch.inference_mode():
        for images, _, _ in loader:
            images = images.to(device)
            mask = torch.from_numpy(np.stack([masking.sample(rng).reshape(-1) for _ in range(len(images))])).to(device)
            pred = student(images, mask)
            total += float(dtm_loss(pred.float(), teacher(images, student.grid), [[]], beta=cfg.beta)) * len(images)
            count += len(images)
    return total / max(count, 1)


def run(args: argparse.Namespace) -> int:
    from .config import load_config, parse_overrides
    from .data import build_dataset, default_crop_pct, eval_transform
    from .eval.knn import knn_classify
    from .eval.features import extract_eval_features
    from .eval.linear import linear_probe
    from .pretrain import pretrain
    from .train import resolve_device
    from .viz import plot_runs

    overrides = parse_overrides(args.overrides)
    if args.data:
        overrides["data"] = args.data
    out = Path(args.output_dir)
    rows = []
    configs = [load_config(name, overrides) for name in args.configs]  # every config checked before any work
    for cfg in configs:
        cfg.output_dir = str(out / cfg.name)
        run_dir = Path(cfg.output_dir)
        done = run_dir / "summary.json"
        summary = json.loads(done.read_text()) if done.exists() else {}
        if not summary.get("finished"):
            summary = pretrain(cfg)
        else:
            print(f"[tokenmorph] {cfg.name}: already trained ({summary['steps']} steps), evaluating", flush=True)
        start = time.perf_counter()
        train, val, info = extract_eval_features(_eval_namespace(args, str(run_dir), cfg.data))
        knn = knn_classify(train.features, train.labels, val.features, val.labels, num_classes=info["num_classes"])
        k = min(20, info["num_train"])
        linear = linear_probe(train.features, train.labels, val.features, val.labels, info["num_classes"],
                              epochs=args.probe_epochs)
        device = resolve_device(args.device)
        heldout = build_dataset(args.eval_val or args.eval_dataset or cfg.data, train=False,
                                transform=eval_transform(cfg.img_size, crop_pct=default_crop_pct(cfg.img_size)))
        # the yardstick of the DTM family: a teacher's tokens predicted on the input frame from block masks
        comparable = cfg.framework == "beit" and cfg.objective == "mask" and cfg.teacher != "pixels"
        token_loss = heldout_token_loss(cfg, run_dir, heldout, args.loss_images, device) if comparable else None
        rows.append({"config": cfg.name, "objective": objective_label(cfg),
                     "steps": summary["steps"], "train_loss": summary["final_loss"],
                     "train_minutes": summary["wall_time_s"] / 60, "heldout_token_loss": token_loss,
                     "knn_top1": knn[k]["top1"], "knn_top5": knn[k]["top5"], "linear_top1": linear["best"]["top1"],
                     "linear_top5": linear["best"]["top5"], "linear_lr": linear["best"]["lr"],
                     "num_train": info["num_train"], "num_val": info["num_val"],
                     "eval_minutes": (time.perf_counter() - start) / 60})
    table = markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    plot_runs([out / cfg.name for cfg in configs], out / "compare_curves.png")
    print(table)
    print(json.dumps({"runs": rows, "table": str(out / "compare.md"), "curves": str(out / "compare_curves.png")}))
    return 0


def objective_label(cfg) -> str:
    """'DTM (release)', 'token-wise', or framework / objective / loss for the other objectives."""
    from .objectives import resolve_loss

    if cfg.framework == "beit" and cfg.objective == "mask" and resolve_loss(cfg) == "dtm":
        return "token-wise" if cfg.scheduler == "none" else f"DTM ({cfg.scheduler})"
    return f"{cfg.framework} {cfg.objective}, {resolve_loss(cfg)} on {cfg.teacher}"


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table (accuracies in %)."""
    head = ("| config | objective | steps | train loss (own objective) | held-out token-wise loss | k-NN top-1 | "
            "linear top-1 | train time |\n|---|---|---|---|---|---|---|---|")
    def loss(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"| {r['config']} | {r['objective']} | {r['steps']} | {r['train_loss']:.4f} | {loss(r['heldout_token_loss'])} | "
             f"{100 * r['knn_top1']:.2f}% | {100 * r['linear_top1']:.2f}% | {r['train_minutes']:.1f} min |" for r in rows]
    return "\n".join([head, *lines])
