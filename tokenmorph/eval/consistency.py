"""Spatial consistency of a teacher's target tokens, before and after morphing (the pilot-study
measurements of docs/method.md, for any teacher on any data set); the program is ``tokenmorph
analyze consistency`` (:mod:`tokenmorph.commands.analyze_consistency`).

(a) the mean cosine similarity of 4-adjacent target tokens, token-wise and after morphing at
    several schedules (every token replaced by its group mean), with the fraction of adjacent
    pairs that share a group and the cosine over the pairs that do not;
(b) for labelled data (Fashion-MNIST, an ImageFolder tree): a multinomial logistic regression
    that maps *every* target token to its image's label, fitted on training images and scored
    token by token on held-out images: accuracy, neighbour agreement, agreement on the right
    class.

Every metric is defined with formulas in docs/analysis.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..data import (
    DataError,
    FashionMNIST,
    build_dataset,
    collate_skip,
    eval_transform,
    seeded_subset,
)
from ..ops.morph import bipartite_morph, effective_schedule, schedule_text

__all__ = [
    "adjacent_pairs",
    "num_adjacent_pairs",
    "adjacent_cosine",
    "pair_sums",
    "pair_means",
    "token_consistency",
    "LinearProbe",
    "fit_linear_probe",
    "probe_metrics",
    "load_splits",
    "extract_tokens",
    "consistency_analysis",
    "markdown_table",
]


# ----------------------------------------------------------------------------------- metrics (a)
def adjacent_pairs(x, grid: tuple[int, int]):
    """The 4-neighbourhood pairs of a row-major token grid, each unordered pair once.

    Args:
        x: (B, N, ...) per-token values, N = grid[0] * grid[1] in row-major order.
        grid: (h, w).

    Returns:
        ``(first, second)``, each (B, P, ...) with P = h (w - 1) + (h - 1) w: the horizontal
        pairs (left, right) in row-major order, then the vertical pairs (top, bottom).
    """
    h, w = grid
    B, N = x.shape[:2]
    if N != h * w:
        raise ValueError(f"{N} tokens do not fill a {h}x{w} grid")
    g = x.reshape(B, h, w, *x.shape[2:])
    first = torch.cat([g[:, :, :-1].flatten(1, 2), g[:, :-1, :].flatten(1, 2)], dim=1)
    second = torch.cat([g[:, :, 1:].flatten(1, 2), g[:, 1:, :].flatten(1, 2)], dim=1)
    return first, second


def num_adjacent_pairs(grid: tuple[int, int]) -> int:
    """P = h (w - 1) + (h - 1) w, the 4-adjacent pairs of an (h, w) grid."""
    h, w = grid
    return h * (w - 1) + (h - 1) * w


def adjacent_cosine(tokens, grid: tuple[int, int]):
    """Cosine similarity of every 4-adjacent token pair: (B, N, D) -> (B, P), pairs as in
    :func:`adjacent_pairs`. Computed in float32 at least; a zero token has cosine 0 with
    everything."""
    u = F.normalize(tokens.float(), dim=-1)
    a, b = adjacent_pairs(u, grid)
    return (a * b).sum(-1)


def pair_sums(tokens, grid: tuple[int, int], labels=None):
    """Per-image sums over the P adjacent pairs, to be averaged over many images by
    :func:`pair_means`.

    Args:
        tokens: (B, N, D) tokens as measured (after morphing: every token replaced by its group
        mean).
        grid: (h, w).
        labels: (B, N) group index per token, or None for token-wise (every token its own group).

    Returns:
        (B, 3) float64: [sum of cosines, number of same-group pairs, sum of cosines over the
        pairs in different groups].
    """
    cos = adjacent_cosine(tokens, grid).double()
    if labels is None:
        same = torch.zeros_like(cos, dtype=torch.bool)
    else:
        first, second = adjacent_pairs(labels, grid)
        same = first == second
    return torch.stack([cos.sum(1), same.sum(1).double(), (cos * ~same).sum(1)], dim=1)


def pair_means(sums, pairs_per_image: int) -> dict:
    """Means over all images from :func:`pair_sums` rows (M, 3): ``adjacent_cosine``,
    ``same_group_fraction`` and ``cross_group_cosine`` (None when every adjacent pair shares a
    group)."""
    total = sums.sum(0).tolist()
    pairs = sums.shape[0] * pairs_per_image
    cross = pairs - total[1]
    return {
        "adjacent_cosine": total[0] / pairs,
        "same_group_fraction": total[1] / pairs,
        "cross_group_cosine": total[2] / cross if cross > 0 else None,
    }


def token_consistency(tokens, grid: tuple[int, int], morph=None) -> dict:
    """Metrics (a) of a batch: (B, N, D) tokens, optionally morphed with ``morph`` (a
    :class:`tokenmorph.morph.Morph`; every token is replaced by its group mean before measuring)."""
    if morph is not None:
        tokens = morph.expand(morph.reduce(tokens.float()))
    sums = pair_sums(tokens, grid, None if morph is None else morph.labels)
    return pair_means(sums, num_adjacent_pairs(grid))


# ----------------------------------------------------------------------------------- metrics (b)
class LinearProbe:
    """Multinomial logistic regression on standardised features: ``logits(x) = ((x - mean) / std)
    W^T + b``.

    Attributes: ``mean`` / ``std`` (D,) from the training features, ``weight`` (C, D), ``bias``
    (C,)."""

    def __init__(self, mean, std, weight, bias):
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    def logits(self, x):
        """(..., D) -> (..., C)."""
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x):
        """(..., D) -> (...,) int64 class index."""
        return self.logits(x).argmax(-1)


def fit_linear_probe(
    x, y, num_classes: int, iterations: int = 100, weight_decay: float = 1e-4
) -> LinearProbe:
    """Fit a multinomial logistic regression by full-batch L-BFGS.

    Args:
        x: (T, D) features (one row per token), y: (T,) int64 labels in [0, num_classes).
        iterations: L-BFGS iterations (strong-Wolfe line search).
        weight_decay: L2 penalty ``weight_decay / 2 * ||W||^2`` added to the mean cross-entropy.

    The problem is convex and starts from zero weights on the full batch, so the result is
    deterministic and needs no seed (the optimum up to the tolerance; no learning rate or epoch
    count to tune).
    """
    x = x.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)  # standardised: one penalty fits every teacher's feature scale
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=iterations,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def probe_metrics(pred, labels, grid: tuple[int, int]) -> dict:
    """Metrics (b) of per-token predictions.

    Args:
        pred: (B, N) predicted class of every token; labels: (B,) the images' classes; grid: (h,
            w).

    Returns:
        ``token_accuracy`` (fraction of tokens predicting their image's label),
        ``neighbour_agreement`` (fraction of 4-adjacent pairs predicting the same class),
        ``agree_and_right`` (fraction of pairs where both predict the image's label).
    """
    right = pred == labels[:, None]
    a, b = adjacent_pairs(pred, grid)
    ra, rb = adjacent_pairs(right, grid)
    return {
        "token_accuracy": right.double().mean().item(),
        "neighbour_agreement": (a == b).double().mean().item(),
        "agree_and_right": (ra & rb).double().mean().item(),
    }


# ------------------------------------------------------------------------------------------ data
def load_splits(
    source: str,
    img_size: int,
    limit: int | None,
    test_limit: int | None,
    seed: int,
    crop_pct: float | None = None,
):
    """The images to analyse: ``(train, test, classes)``; ``None`` limits mean all.

    * Fashion-MNIST: seeded random subsets of ``limit`` train-split and ``test_limit`` test-split
      images.
    * An ImageFolder tree (``root/CLASS/image``): a seeded split of its n images into
      ``min(test_limit, n // 2)`` held-out images (default ``max(1, n // 4)``) and up to
      ``limit`` of the others for training.
    * A flat folder (no labels): ``(images, None, [])``, a seeded subset of ``limit`` images.

    Images are centre-cropped and resized to ``img_size``
    (:func:`tokenmorph.data.eval_transform`; ``crop_pct`` default: 1.0 for Fashion-MNIST, whose
    objects fill the frame, 0.875 for photos).
    """
    gen = torch.Generator().manual_seed(seed)
    full = build_dataset(source, train=True)
    is_fmnist = isinstance(full, FashionMNIST)
    full.transform = transform = eval_transform(img_size, crop_pct or (1.0 if is_fmnist else 0.875))
    if is_fmnist:
        test = build_dataset(source, train=False, transform=transform)
        return (
            seeded_subset(full, limit, gen),
            seeded_subset(test, test_limit, gen),
            list(full.classes),
        )
    if not full.classes:
        return seeded_subset(full, limit, gen), None, []
    n = len(full)
    if n < 2:
        raise DataError(f"{source} holds {n} labelled image: too few to hold some out; add images")
    n_test = min(test_limit, n // 2) if test_limit else max(1, n // 4)
    n_train = min(limit or n, n - n_test)
    perm = torch.randperm(n, generator=gen)
    return (
        Subset(full, perm[n_test : n_test + n_train].sort().values.tolist()),
        Subset(full, perm[:n_test].sort().values.tolist()),
        list(full.classes),
    )


def extract_tokens(teacher, dataset, grid: tuple[int, int], batch_size: int, workers: int, device):
    """Run ``teacher`` over ``dataset``: ``(tokens (M, N, D) float32, labels (M,) int64,
       skipped)``,
    on ``device``; undecodable images are skipped and counted."""
    from ..runtime.progress import Progress

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skip
    )
    tokens, labels, skipped = [], [], 0
    report = Progress(len(loader), "teacher tokens", "batch")
    for images, y, n_bad in loader:
        report.update(1)
        skipped += n_bad
        if len(images):
            tokens.append(teacher(images.to(device), grid))
            labels.append(y.to(device))
    report.close()
    if not tokens:
        raise DataError(f"none of the {len(dataset)} images could be decoded")
    return torch.cat(tokens), torch.cat(labels), skipped


# --------------------------------------------------------------------------------------- driver
def _morph_and_measure(tokens, schedule, mode: str, generator, grid: tuple[int, int], chunk: int):
    """Morph every image's tokens with ``schedule`` and measure (a):
    ``(morphed (M, N, D), pair sums (M, 3) (see :func:`pair_sums`), num_groups)``.

    Works in chunks of ``chunk`` images (the grouping needs a (chunk, N, N) Gram matrix). A
    schedule of zeros is the identity grouping, so the token-wise row goes through the same code."""
    morphed, sums, groups = [], [], None
    for part in tokens.split(chunk):
        m = bipartite_morph(part, schedule, mode=mode, generator=generator)
        part = m.expand(
            m.reduce(part)
        )  # the release's targets: every token replaced by its group mean
        morphed.append(part)
        sums.append(pair_sums(part, grid, m.labels))
        groups = m.num_groups
    return torch.cat(morphed), torch.cat(sums), groups


def consistency_analysis(
    teacher,
    train,
    test,
    classes: Sequence[str],
    grid: tuple[int, int],
    schedules: Sequence[Sequence[int]],
    *,
    mode: str = "reference",
    batch_size: int = 64,
    workers: int = 0,
    device="cpu",
    seed: int = 0,
    probe_iterations: int = 100,
    probe_weight_decay: float = 1e-4,
) -> dict:
    """Metrics (a) on all images (train and test) and, when ``test`` is given, (b), for the
    token-wise targets and every schedule.

    Args:
        teacher: callable ``(images, grid) -> (B, N, D)`` (see
        :func:`tokenmorph.models.teachers.build_feature_source`). train, test: data sets of
        ``(image (3, S, S) in [0, 1], label)``; ``test=None``: no labels, (a) only.
        classes: class names (their count sizes the classifier).
        schedules: morphing schedules; the identity (token-wise) row is always measured first.

    Returns:
        A JSON-ready dict: ``rows`` (one per distinct realised grouping: ``num_groups``,
        ``schedule``, metrics (a), and ``probe`` with metrics (b) when labelled), plus what was
        measured on.
    """
    N = grid[0] * grid[1]
    protect = mode == "reference"
    tokens, labels, skipped = extract_tokens(teacher, train, grid, batch_size, workers, device)
    n_train = len(tokens)
    if test is not None:
        test_tokens, test_labels, bad = extract_tokens(
            teacher, test, grid, batch_size, workers, device
        )
        tokens, labels, skipped = (
            torch.cat([tokens, test_tokens]),
            torch.cat([labels, test_labels]),
            skipped + bad,
        )
        del test_tokens
    pairs = num_adjacent_pairs(grid)
    gen = torch.Generator(device=tokens.device).manual_seed(seed)

    rows, seen = [], set()
    for schedule in [[0]] + [list(s) for s in schedules]:
        eff = tuple(r for r in effective_schedule(N, schedule, protect) if r)
        if eff in seen:  # e.g. the identity asked for explicitly
            continue
        seen.add(eff)
        morphed, sums, num_groups = _morph_and_measure(
            tokens, schedule, mode, gen, grid, batch_size
        )
        row = {
            "num_groups": num_groups,
            "schedule": list(eff),
            "schedule_text": schedule_text(eff),
            **pair_means(sums, pairs),
        }
        if test is not None:
            # Refit per condition: the classifier reads the targets the student would be trained
            # on.
            probe = fit_linear_probe(
                morphed[:n_train].flatten(0, 1),
                labels[:n_train].repeat_interleave(N),
                len(classes),
                probe_iterations,
                probe_weight_decay,
            )
            held_out = morphed[n_train:]
            pred = torch.cat([probe.predict(part) for part in held_out.split(batch_size)])
            row["probe"] = probe_metrics(pred, labels[n_train:], grid)
        rows.append(row)
        del morphed
    return {
        "grid": list(grid),
        "num_tokens": N,
        "token_dim": int(tokens.shape[-1]),
        "mode": mode,
        "pairs_per_image": pairs,
        "images": {
            "analysed": len(tokens),
            "train": n_train if test is not None else None,
            "test": len(tokens) - n_train if test is not None else None,
            "skipped": skipped,
        },
        "classes": list(classes),
        "probe": None
        if test is None
        else {
            "fit": "refit per condition on the (morphed) tokens of the training images",
            "method": "multinomial logistic regression, standardised features, full-batch L-BFGS",
            "iterations": probe_iterations,
            "weight_decay": probe_weight_decay,
            "chance": 1 / len(classes),
        },
        "rows": rows,
    }


def markdown_table(result: dict) -> str:
    """The rows of :func:`consistency_analysis` as a Markdown table."""
    probe = result["probe"] is not None
    head = ["groups", "schedule", "adjacent cos", "same-group pairs", "cross-group cos"]
    if probe:
        head += ["token acc", "neighbour agree", "agree & right"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for r in result["rows"]:
        cells = [
            str(r["num_groups"]),
            r["schedule_text"],
            f(r["adjacent_cosine"]),
            f(r["same_group_fraction"]),
            f(r["cross_group_cosine"]),
        ]
        if probe:
            p = r["probe"]
            cells += [f(p["token_accuracy"]), f(p["neighbour_agreement"]), f(p["agree_and_right"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
