"""Linear probe on frozen features, several learning rates trained together, the best picked on
   val;
the program is ``tokenmorph eval linear`` (:mod:`tokenmorph.commands.eval_linear`).

Features are extracted once; then one linear classifier per learning rate is trained on them. The
classifiers are stacked into one (D, L, C) weight and updated together, so L learning rates cost
one matrix product of L x C outputs per step, with exactly the updates L separate runs would
make.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .features import topk_correct

if TYPE_CHECKING:  # annotations only
    import torch

__all__ = ["DEFAULT_LRS", "SMALL_STEP_MACS", "linear_probe"]

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


# Training steps below this many multiply-adds (B x D x L x C) run on one CPU thread: for such
# tiny products (Fashion-MNIST's probe is 256 x 192 x 7 x 10) synchronising threads costs far
# more than the arithmetic.
SMALL_STEP_MACS = 2**25


@contextmanager
def _intra_op_threads(n: int | None):
    """torch's (process-wide) intra-op thread count set to ``n`` for the block, then restored;
       None:
    unchanged."""
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


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    batchnorm: bool = False,
    seed: int = 0,
    momentum: float = 0.9,
    progress: bool = False,
) -> dict:
    """Train one linear classifier per learning rate on frozen features, together; evaluate each
       on
    val.

    Args:
        train_feats: (N, D) features; train_labels: (N,) int64 in [0, num_classes). Training runs
            in the features' floating dtype (float32 features: float32; float64 makes rounding
            negligible).
        val_feats: (M, D); val_labels: (M,).
        lrs: L peak learning rates, each decayed to 0 by a per-step cosine over ``epochs``.
        batch_size: B; every epoch is a seeded shuffle cut into floor(N / B) full batches (one
            batch of N when N < B), so BatchNorm never sees a tiny last batch.
        batchnorm: ``BatchNorm1d(D, affine=False)`` in front of the classifiers, as MAE's probe
            (it has no parameters, so one serves all L classifiers: batch statistics in training,
            running ones on val).
        seed: draws the initial weight (N(0, 0.01^2), bias 0; the same for every lr) and the
        batch order.
        momentum: SGD momentum (no weight decay, as DINO's and MAE's probes).
        progress: report the epochs (:class:`tokenmorph.runtime.progress.Progress`).

    Returns:
        ``{"per_lr": [{"lr", "top1", "top5"}, ...] in ``lrs`` order, "best": the entry with the
        highest val top-1 (the first on ties), "weight": (L, D, C), "bias": (L, C)}``: accuracies
        as fractions (top-5 is top-C when C < 5) and the trained classifiers, on raw features
        (``batchnorm``'s eval-mode normalisation is folded into them). Runs on ``train_feats``'
        device. Since the L classifiers never interact, each one equals a run with its lr alone
        (up to float rounding).
    """
    import torch
    import torch.nn.functional as F

    from ..runtime.progress import Progress

    n, dim = train_feats.shape
    if n < 2 or len(val_labels) == 0:
        raise ValueError(
            f"it needs at least 2 training and 1 val features, got {n} and {len(val_labels)}"
        )
    if batchnorm and batch_size < 2:
        raise ValueError("BatchNorm needs training batches of at least 2 features")
    device = train_feats.device
    dtype = train_feats.dtype if train_feats.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(seed)
    num_lrs = len(lrs)
    peak_lr = torch.tensor(lrs, dtype=dtype, device=device).view(num_lrs, 1)
    # Classifier l is weight[:, l] (D, C) and bias[l]: all L share one (B, D) x (D, L * C)
    # product.
    weight = (
        (torch.randn(dim, 1, num_classes, generator=gen) * 0.01)
        .to(device, dtype)
        .repeat(1, num_lrs, 1)
    )
    bias = torch.zeros(num_lrs, num_classes, device=device, dtype=dtype)
    params = [weight.requires_grad_(), bias.requires_grad_()]
    velocity = [torch.zeros_like(p) for p in params]
    norm = (
        torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device, dtype)
        if batchnorm
        else torch.nn.Identity()
    )

    def logits(x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, L, C)
        return torch.addmm(bias.flatten(), x, weight.flatten(1)).view(len(x), num_lrs, num_classes)

    train_labels = train_labels.to(device)
    batches_per_epoch = max(1, n // batch_size)
    total_steps = epochs * batches_per_epoch
    small = device.type == "cpu" and batch_size * dim * num_lrs * num_classes < SMALL_STEP_MACS
    report = Progress(epochs, f"linear probe ({num_lrs} lrs)", "epoch", enabled=progress)
    with _intra_op_threads(1 if small else None), report:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for b in range(batches_per_epoch):
                step = epoch * batches_per_epoch + b
                idx = order[b * batch_size : (b + 1) * batch_size]
                out = logits(norm(train_feats[idx].to(dtype)))
                # A sum over classifiers of their mean losses: each one's gradient is its own
                # loss's gradient.
                loss = F.cross_entropy(
                    out.flatten(0, 1), train_labels[idx].repeat_interleave(num_lrs), reduction="sum"
                ) / len(idx)
                grads = torch.autograd.grad(loss, params)
                lr = peak_lr * (
                    0.5 * (1 + math.cos(math.pi * step / total_steps))
                )  # (L, 1): broadcasts over C
                with torch.no_grad():
                    for p, v, g in zip(params, velocity, grads):
                        v.mul_(momentum).add_(g)  # torch.optim.SGD's momentum (dampening 0)
                        p.sub_(lr * v)
            report.update(1)
        norm.eval()
        hits = torch.zeros(2, num_lrs, dtype=torch.long, device=device)
        with torch.no_grad():
            for start in range(0, len(val_labels), batch_size):
                x = norm(val_feats[start : start + batch_size].to(device, dtype))
                out = logits(x).transpose(0, 1)  # (L, B, C)
                top1, top5 = topk_correct(out, val_labels[start : start + batch_size].to(device))
                hits += torch.stack([top1.sum(dim=1), top5.sum(dim=1)])
            if (
                batchnorm
            ):  # fold the eval-mode normalisation into the classifiers: they apply to raw features
                scale = (norm.running_var + norm.eps).rsqrt()  # (D,)
                bias = bias - ((norm.running_mean * scale) @ weight.flatten(1)).view(
                    num_lrs, num_classes
                )
                weight = weight * scale.view(dim, 1, 1)
    acc = (hits.double() / len(val_labels)).tolist()
    per_lr = [{"lr": float(lr), "top1": acc[0][i], "top5": acc[1][i]} for i, lr in enumerate(lrs)]
    return {
        "per_lr": per_lr,
        "best": max(per_lr, key=lambda r: r["top1"]),
        "weight": weight.detach().transpose(0, 1).contiguous(),
        "bias": bias.detach(),
    }
