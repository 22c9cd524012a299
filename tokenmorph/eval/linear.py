"""Linear probe on frozen features, several learning rates trained together, the best picked on val:
``linear_probe`` and the ``tokenmorph eval linear`` program (``DESCRIPTION``, ``add_arguments``, ``run``).

Features are extracted once; then one linear classifier per learning rate is trained on them. The
classifiers are stacked into one (D, L, C) weight and updated together, so L learning rates cost one
matrix product of L x C outputs per step, with exactly the updates L separate runs would make.
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional, Sequence

from .features import (add_common_arguments, emit_report, extract_eval_features, positive, positive_list,
                       topk_correct)

if TYPE_CHECKING:  # annotations only
    import torch

__all__ = ["DESCRIPTION", "DEFAULT_LRS", "SMALL_STEP_MACS", "linear_probe", "add_arguments", "run"]

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

DESCRIPTION = """\
Linear probe on the frozen features of a backbone: features are extracted once (CLS or mean-pooled), then
one linear classifier per learning rate is trained on them in a single pass (SGD, momentum 0.9, cosine
schedule, optional BatchNorm without affine in front as in MAE). The best learning rate is picked on the
val split (so its accuracy is slightly optimistic, as in DINOv2's sweep). Prints a table, then one JSON
object as the last line: top1 / top5 of the best learning rate (the headline), per-lr results, num_train,
num_val, feature_dim, pool, seconds.

examples:
  tokenmorph eval linear --checkpoint outputs/demo --dataset fashion-mnist --batchnorm
  tokenmorph eval linear --checkpoint ckpt.pt --train DIR/train --val DIR/val --lrs 0.01,0.1 --epochs 50"""


# Training steps below this many multiply-adds (B x D x L x C) run on one CPU thread: for such tiny products
# the threads' synchronisation dominates. Fashion-MNIST's probe (256 x 192 x 7 x 10) took 1 ms per step on one
# thread and 55 ms on two, on this project's shared 2-core CPU.
SMALL_STEP_MACS = 2 ** 25


@contextmanager
def _intra_op_threads(n: Optional[int]):
    """torch's (process-wide) intra-op thread count set to ``n`` for the block, then restored; None: unchanged."""
    import torch

    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def linear_probe(train_feats: "torch.Tensor", train_labels: "torch.Tensor", val_feats: "torch.Tensor",
                 val_labels: "torch.Tensor", num_classes: int, lrs: Sequence[float] = DEFAULT_LRS,
                 epochs: int = 100, batch_size: int = 256, batchnorm: bool = False, seed: int = 0,
                 momentum: float = 0.9) -> dict:
    """Train one linear classifier per learning rate on frozen features, together; evaluate each on val.

    Args:
        train_feats: (N, D) features; train_labels: (N,) int64 in [0, num_classes). Training runs in the
            features' floating dtype (float32 features: float32; float64 makes rounding negligible).
        val_feats: (M, D); val_labels: (M,).
        lrs: L peak learning rates, each decayed to 0 by a per-step cosine over ``epochs``.
        batch_size: B; every epoch is a seeded shuffle cut into floor(N / B) full batches (one batch of N when
            N < B), so BatchNorm never sees a tiny last batch.
        batchnorm: ``BatchNorm1d(D, affine=False)`` in front of the classifiers, as MAE's probe (it has no
            parameters, so one serves all L classifiers: batch statistics in training, running ones on val).
        seed: draws the initial weight (N(0, 0.01^2), bias 0; the same for every lr) and the batch order.
        momentum: SGD momentum (no weight decay, as DINO's and MAE's probes).

    Returns:
        ``{"per_lr": [{"lr", "top1", "top5"}, ...] in ``lrs`` order, "best": the entry with the highest val
        top-1 (the first on ties), "weight": (L, D, C), "bias": (L, C)}``: accuracies as fractions (top-5 is
        top-C when C < 5) and the trained classifiers, on raw features (``batchnorm``'s eval-mode
        normalisation is folded into them). Runs on ``train_feats``' device. Since the L classifiers never
        interact, each one equals a run with its lr alone (up to float rounding).
    """
    import torch
    import torch.nn.functional as F

    n, dim = train_feats.shape
    if n < 2 or len(val_labels) == 0:
        raise ValueError(f"it needs at least 2 training and 1 val features, got {n} and {len(val_labels)}")
    if batchnorm and batch_size < 2:
        raise ValueError("BatchNorm needs training batches of at least 2 features")
    device = train_feats.device
    dtype = train_feats.dtype if train_feats.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(seed)
    num_lrs = len(lrs)
    peak_lr = torch.tensor(lrs, dtype=dtype, device=device).view(num_lrs, 1)
    # Classifier l is weight[:, l] (D, C) and bias[l]: all L share one (B, D) x (D, L * C) product.
    weight = (torch.randn(dim, 1, num_classes, generator=gen) * 0.01).to(device, dtype).repeat(1, num_lrs, 1)
    bias = torch.zeros(num_lrs, num_classes, device=device, dtype=dtype)
    params = [weight.requires_grad_(), bias.requires_grad_()]
    velocity = [torch.zeros_like(p) for p in params]
    norm = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device, dtype) if batchnorm else torch.nn.Identity()

    def logits(x: "torch.Tensor") -> "torch.Tensor":  # (B, D) -> (B, L, C)
        return torch.addmm(bias.flatten(), x, weight.flatten(1)).view(len(x), num_lrs, num_classes)

    train_labels = train_labels.to(device)
    batches_per_epoch = max(1, n // batch_size)
    total_steps = epochs * batches_per_epoch
    small = device.type == "cpu" and batch_size * dim * num_lrs * num_classes < SMALL_STEP_MACS
    with _intra_op_threads(1 if small else None):
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for b in range(batches_per_epoch):
                step = epoch * batches_per_epoch + b
                idx = order[b * batch_size:(b + 1) * batch_size]
                out = logits(norm(train_feats[idx].to(dtype)))
                # A sum over classifiers of their mean losses: each one's gradient is its own loss's gradient.
                loss = F.cross_entropy(out.flatten(0, 1), train_labels[idx].repeat_interleave(num_lrs),
                                       reduction="sum") / len(idx)
                grads = torch.autograd.grad(loss, params)
                lr = peak_lr * (0.5 * (1 + math.cos(math.pi * step / total_steps)))  # (L, 1): broadcasts over C
                with torch.no_grad():
                    for p, v, g in zip(params, velocity, grads):
                        v.mul_(momentum).add_(g)  # torch.optim.SGD's momentum (dampening 0)
                        p.sub_(lr * v)
        norm.eval()
        hits = torch.zeros(2, num_lrs, dtype=torch.long, device=device)
        with torch.no_grad():
            for start in range(0, len(val_labels), batch_size):
                x = norm(val_feats[start:start + batch_size].to(device, dtype))
                out = logits(x).transpose(0, 1)  # (L, B, C)
                top1, top5 = topk_correct(out, val_labels[start:start + batch_size].to(device))
                hits += torch.stack([top1.sum(dim=1), top5.sum(dim=1)])
            if batchnorm:  # fold the eval-mode normalisation into the classifiers: they apply to raw features
                scale = (norm.running_var + norm.eps).rsqrt()  # (D,)
                bias = bias - ((norm.running_mean * scale) @ weight.flatten(1)).view(num_lrs, num_classes)
                weight = weight * scale.view(dim, 1, 1)
    acc = (hits.double() / len(val_labels)).tolist()
    per_lr = [{"lr": float(lr), "top1": acc[0][i], "top5": acc[1][i]} for i, lr in enumerate(lrs)]
    return {"per_lr": per_lr, "best": max(per_lr, key=lambda r: r["top1"]),
            "weight": weight.detach().transpose(0, 1).contiguous(), "bias": bias.detach()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("linear probe")
    g.add_argument("--lrs", type=positive_list(float), default=list(DEFAULT_LRS), metavar="LR,LR,...",
                   help=f"learning rates trained together (default {','.join(map(str, DEFAULT_LRS))})")
    g.add_argument("--epochs", type=positive(int), default=100, help="epochs over the cached features (default 100)")
    g.add_argument("--probe-batch-size", type=positive(int), default=256, help="training batch (default 256)")
    g.add_argument("--batchnorm", action="store_true", help="BatchNorm without affine before the classifier (MAE)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train import TrainingError

    start = time.perf_counter()
    train, val, info = extract_eval_features(args)
    device = torch.device(info["device"])
    probe_start = time.perf_counter()
    try:
        results = linear_probe(train.features.to(device), train.labels, val.features, val.labels,
                               info["num_classes"], args.lrs, args.epochs, args.probe_batch_size, args.batchnorm,
                               args.seed)
    except ValueError as e:  # too little data for the flags given (e.g. --limit-train 1)
        raise TrainingError(f"linear probe: {e}") from None
    best = results["best"]
    result = {"protocol": "linear", "top1": best["top1"], "top5": best["top5"], "lr": best["lr"],
              "per_lr": results["per_lr"], "epochs": args.epochs, "batch_size": args.probe_batch_size,
              "batchnorm": args.batchnorm, "seed": args.seed, **info,
              "probe_seconds": round(time.perf_counter() - probe_start, 3),
              "seconds": round(time.perf_counter() - start, 3)}
    rows = [(f"{r['lr']:g}" + (" *" if r is best else ""), r["top1"], r["top5"]) for r in results["per_lr"]]
    emit_report(f"linear probe ({args.epochs} epochs, {'BN + ' if args.batchnorm else ''}linear) on "
                f"{info['num_train']} train / {info['num_val']} val {info['pool']} features (D={info['feature_dim']}) "
                f"of {info['backbone']}; * = best on val", ("lr", "top1", "top5"), rows, result, args.out)
    return 0
