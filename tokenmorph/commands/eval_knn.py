"""``tokenmorph eval knn``: the frozen-feature knn protocol (:mod:`tokenmorph.eval.knn`) as a
program."""

from __future__ import annotations

import argparse
import time

from ..eval import PROTOCOLS
from .common import add_eval_arguments, eval_features_from_args, positive, positive_list

HELP = PROTOCOLS["knn"]
DESCRIPTION = """\
Weighted k-NN classification on the frozen features of a backbone (DINO's protocol):
L2-normalised features, cosine similarity, the k nearest training features vote with weight
exp(sim / T). Prints a table, then one JSON object as the last line: top1 / top5 at k=20 (the
headline), per-k results, num_train, num_val, feature_dim, pool, seconds.

examples:
  tokenmorph eval knn --checkpoint outputs/demo --dataset fashion-mnist
  tokenmorph eval knn --checkpoint ckpt.pt --train DIR/train --val DIR/val --out knn.json
  tokenmorph eval knn --checkpoint timm:vit_small_patch16_224 --train T --val V --limit-train
  5000"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..eval.knn import DEFAULT_KS, HEADLINE_K

    add_eval_arguments(parser)
    g = parser.add_argument_group("k-NN")
    g.add_argument(
        "--k",
        type=positive_list(int),
        default=list(DEFAULT_KS),
        metavar="K,K,...",
        help=f"neighbour counts (default {','.join(map(str, DEFAULT_KS))}; capped at the train set "
        "size); "
        f"the headline is k={HEADLINE_K}, or the first k when {HEADLINE_K} is not listed",
    )
    g.add_argument(
        "--temperature",
        type=positive(float),
        default=0.07,
        help="vote weight exp(sim / T) (default 0.07)",
    )
    g.add_argument(
        "--chunk-size",
        type=positive(int),
        default=1024,
        help="test queries per similarity chunk: memory ~ chunk x num_train x 4 bytes "
        "(default 1024)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.features import emit_report
    from ..eval.knn import HEADLINE_K, knn_classify

    start = time.perf_counter()
    train, val, info = eval_features_from_args(args)
    device = torch.device(info["device"])
    knn_start = time.perf_counter()
    results = knn_classify(
        train.features.to(device),
        train.labels,
        val.features,
        val.labels,
        args.k,
        args.temperature,
        info["num_classes"],
        args.chunk_size,
        progress=not args.no_progress,
    )
    headline = min(HEADLINE_K if HEADLINE_K in args.k else args.k[0], info["num_train"])
    result = {
        "protocol": "knn",
        "top1": results[headline]["top1"],
        "top5": results[headline]["top5"],
        "k": headline,
        "temperature": args.temperature,
        "per_k": {str(k): r for k, r in results.items()},
        **info,
        "knn_seconds": round(time.perf_counter() - knn_start, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    rows = [(k, r["top1"], r["top5"]) for k, r in results.items()]
    emit_report(
        f"weighted k-NN (T={args.temperature}) on {info['num_train']} train / {info['num_val']} "
        "val "
        f"{info['pool']} features (D={info['feature_dim']}) of {info['backbone']}",
        ("k", "top1", "top5"),
        rows,
        result,
        args.out,
    )
    return 0
