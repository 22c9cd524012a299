"""``tokenmorph analyze consistency``: how spatially consistent are a teacher's target tokens, before and
after morphing? (The pilot-study measurements of method.md 1.7, for any teacher on any data set.)

(a) the mean cosine similarity of 4-adjacent target tokens, token-wise and after morphing at several
    schedules (every token replaced by its group mean), with the fraction of adjacent pairs that share a
    group and the cosine over the pairs that do not;
(b) for labelled data (Fashion-MNIST, an ImageFolder tree): a multinomial logistic regression that maps
    *every* target token to its image's label, fitted on training images and scored token by token on
    held-out images: accuracy, neighbour agreement, agreement on the right class.

Every metric is defined with formulas in docs/analysis.md. The module also holds the helpers that
``viz morph`` shares: :func:`build_feature_teacher` (a teacher by name, raw pixels included) and
:func:`resolve_schedules` (target group counts -> morphing schedules).

torch is imported inside the functions: the command-line parser imports this module to build its help.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

DESCRIPTION = """\
Spatial consistency of a teacher's target tokens, before and after DTM morphing (the paper's pilot study,
for any teacher on any data set). Images are resized (centre crop) to --img-size; the teacher's tokens are
resampled to the (img-size / patch-size)^2 grid a student would use; each image's tokens are morphed with
each schedule (grouping from the tokens themselves, as DTM does), every token replaced by its group mean.

Measured (definitions: docs/analysis.md):
  (a) mean cosine similarity of 4-adjacent tokens (each unordered pair once), the fraction of adjacent
      pairs in one group, and the mean cosine over adjacent pairs in different groups;
  (b) labelled data only (fashion-mnist, an ImageFolder tree): a linear classifier fitted on every
      (morphed) token of the training images, scored per token on held-out images: accuracy, neighbour
      agreement (4-adjacent tokens predict the same class), agree-and-right (both predict the label).

Writes OUT/consistency.json and OUT/consistency.png, and prints a Markdown table."""

RAW_PIXELS = "raw-pixels"
# Default target group counts as fractions of N: 196 -> 196, 98, 49, 16, 8 (the viz morph default).
DEFAULT_GROUP_FRACTIONS = (1, 1 / 2, 1 / 4, 1 / 12, 1 / 24)


# ------------------------------------------------------------------------------------- features
class RawPixelFeatures:
    """Raw patch pixels mapped to [-1, 1] as token features: (B, 3, H, W) in [0, 1], grid ->
    (B, grid[0] * grid[1], p * p * 3). Centred so that cosine similarity compares colours, not brightness
    only (every [0, 1] pixel vector lies in one orthant)."""

    def __init__(self, patch_size: int):
        self.patch_size = patch_size

    def __call__(self, images, grid):
        import torch.nn.functional as F

        from .images import patchify

        p = self.patch_size
        size = (grid[0] * p, grid[1] * p)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return patchify(images.float() * 2 - 1, p)


def build_feature_teacher(name: str, *, patch_size: int, weights: Optional[str] = None, random_init: bool = False,
                          input_size: Optional[int] = None, device="cpu", **kwargs):
    """A token-feature source by name: ``raw-pixels`` or any :func:`tokenmorph.teachers.build_teacher` name
    (``pixels``, ``efficientnet-lite0``, ``clip-vit-b16``, ``timm:NAME``).

    Returns a callable ``(images (B, 3, H, W) in [0, 1], grid (h, w)) -> (B, h * w, D) float32``.
    ``patch_size`` is the pixel teachers' patch side (backbone teachers resample their own grid instead, so
    it is not passed to them: ``timm.create_model`` would rebuild the model with that patch size).
    ``kwargs`` go to ``build_teacher`` (e.g. ``norm="joint"`` for ``pixels``).

    Raises:
        TeacherError: unknown name, missing weights or package, options the source does not take.
    """
    from .teachers import TeacherError, build_teacher

    if name == RAW_PIXELS:
        if weights is not None or random_init or input_size is not None or kwargs:
            raise TeacherError("raw-pixels features take no --teacher-weights, --random-init or --teacher-input-size")
        return RawPixelFeatures(patch_size)
    if name == "pixels":
        kwargs["patch_size"] = patch_size
    return build_teacher(name, weights=weights, random_init=random_init, input_size=input_size, device=device, **kwargs)


def resolve_schedules(num_tokens: int, groups: Optional[Sequence[int]] = None,
                      schedules: Optional[Sequence[Sequence[int]]] = None, iterations: int = 14,
                      mode: str = "reference") -> list[list[int]]:
    """Morphing schedules from explicit ``schedules`` or from target group counts.

    A group count G becomes ``spread_schedule(N, G, iterations)``: ``iterations`` bipartite-matching rounds
    that leave exactly G groups (G = N is the identity). Raises a one-line ``TrainingError`` for a group
    count outside [2, N] (reference mode protects the first token, so it never merges) or [1, N] (paper),
    or a negative schedule entry."""
    from .morph import spread_schedule
    from .train import TrainingError

    protect = mode == "reference"
    if schedules:
        bad = [list(s) for s in schedules if any(r < 0 for r in s)]
        if bad:
            raise TrainingError(f"schedule entries must be >= 0, got {bad}")
        return [list(s) for s in schedules]
    lowest = 2 if protect else 1
    groups = list(groups or [])
    bad = [g for g in groups if not lowest <= g <= num_tokens]
    if bad or not groups:
        raise TrainingError(f"--groups {bad or groups} out of range: give group counts in [{lowest}, {num_tokens}] "
                            f"for {num_tokens} tokens")
    if iterations < 1:
        raise TrainingError(f"--iterations must be >= 1, got {iterations}")
    return [spread_schedule(num_tokens, g, iterations, protect) for g in groups]


def default_groups(num_tokens: int, mode: str = "reference") -> list[int]:
    """N, N/2, N/4, N/12, N/24 rounded (196 -> 196, 98, 49, 16, 8), at least the smallest allowed count."""
    lowest = 2 if mode == "reference" else 1
    return sorted({max(lowest, round(num_tokens * f)) for f in DEFAULT_GROUP_FRACTIONS}, reverse=True)


def schedule_text(schedule: Sequence[int]) -> str:
    """A schedule, run-length encoded: [7] * 14 -> '7x14'; [11, 11, 10] -> '11x2,10'; no merges -> 'none'."""
    from itertools import groupby

    runs = [(r, len(list(g))) for r, g in groupby(int(r) for r in schedule if r)]
    return ",".join(f"{r}x{k}" if k > 1 else str(r) for r, k in runs) or "none"


# ----------------------------------------------------------------------------------- metrics (a)
def adjacent_pairs(x, grid: tuple[int, int]):
    """The 4-neighbourhood pairs of a row-major token grid, each unordered pair once.

    Args:
        x: (B, N, ...) per-token values, N = grid[0] * grid[1] in row-major order.
        grid: (h, w).

    Returns:
        ``(first, second)``, each (B, P, ...) with P = h (w - 1) + (h - 1) w: the horizontal pairs
        (left, right) in row-major order, then the vertical pairs (top, bottom).
    """
    import torch

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
    :func:`adjacent_pairs`. Computed in float32 at least; a zero token has cosine 0 with everything."""
    import torch.nn.functional as F

    u = F.normalize(tokens.float(), dim=-1)
    a, b = adjacent_pairs(u, grid)
    return (a * b).sum(-1)


def pair_sums(tokens, grid: tuple[int, int], labels=None):
    """Per-image sums over the P adjacent pairs, to be averaged over many images by :func:`pair_means`.

    Args:
        tokens: (B, N, D) tokens as measured (after morphing: every token replaced by its group mean).
        grid: (h, w).
        labels: (B, N) group index per token, or None for token-wise (every token its own group).

    Returns:
        (B, 3) float64: [sum of cosines, number of same-group pairs, sum of cosines over the pairs in
        different groups].
    """
    import torch

    cos = adjacent_cosine(tokens, grid).double()
    if labels is None:
        same = torch.zeros_like(cos, dtype=torch.bool)
    else:
        first, second = adjacent_pairs(labels, grid)
        same = first == second
    return torch.stack([cos.sum(1), same.sum(1).double(), (cos * ~same).sum(1)], dim=1)


def pair_means(sums, pairs_per_image: int) -> dict:
    """Means over all images from :func:`pair_sums` rows (M, 3): ``adjacent_cosine``,
    ``same_group_fraction`` and ``cross_group_cosine`` (None when every adjacent pair shares a group)."""
    total = sums.sum(0).tolist()
    pairs = sums.shape[0] * pairs_per_image
    cross = pairs - total[1]
    return {"adjacent_cosine": total[0] / pairs, "same_group_fraction": total[1] / pairs,
            "cross_group_cosine": total[2] / cross if cross > 0 else None}


def token_consistency(tokens, grid: tuple[int, int], morph=None) -> dict:
    """Metrics (a) of a batch: (B, N, D) tokens, optionally morphed with ``morph`` (a
    :class:`tokenmorph.morph.Morph`; every token is replaced by its group mean before measuring)."""
    if morph is not None:
        tokens = morph.expand(morph.reduce(tokens.float()))
    sums = pair_sums(tokens, grid, None if morph is None else morph.labels)
    return pair_means(sums, num_adjacent_pairs(grid))


# ----------------------------------------------------------------------------------- metrics (b)
class LinearProbe:
    """Multinomial logistic regression on standardised features: ``logits(x) = ((x - mean) / std) W^T + b``.

    Attributes: ``mean`` / ``std`` (D,) from the training features, ``weight`` (C, D), ``bias`` (C,)."""

    def __init__(self, mean, std, weight, bias):
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    def logits(self, x):
        """(..., D) -> (..., C)."""
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x):
        """(..., D) -> (...,) int64 class index."""
        return self.logits(x).argmax(-1)


def fit_linear_probe(x, y, num_classes: int, iterations: int = 100, weight_decay: float = 1e-4) -> LinearProbe:
    """Fit a multinomial logistic regression by full-batch L-BFGS.

    Args:
        x: (T, D) features (one row per token), y: (T,) int64 labels in [0, num_classes).
        iterations: L-BFGS iterations (strong-Wolfe line search).
        weight_decay: L2 penalty ``weight_decay / 2 * ||W||^2`` added to the mean cross-entropy.

    The problem is convex and starts from zero weights on the full batch, so the result is deterministic
    and needs no seed (the optimum up to the tolerance; no learning rate or epoch count to tune).
    """
    import torch
    import torch.nn.functional as F

    x = x.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)  # standardised: one penalty fits every teacher's feature scale
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=iterations, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

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
        pred: (B, N) predicted class of every token; labels: (B,) the images' classes; grid: (h, w).

    Returns:
        ``token_accuracy`` (fraction of tokens predicting their image's label), ``neighbour_agreement``
        (fraction of 4-adjacent pairs predicting the same class), ``agree_and_right`` (fraction of pairs
        where both predict the image's label).
    """
    right = pred == labels[:, None]
    a, b = adjacent_pairs(pred, grid)
    ra, rb = adjacent_pairs(right, grid)
    return {"token_accuracy": right.double().mean().item(), "neighbour_agreement": (a == b).double().mean().item(),
            "agree_and_right": (ra & rb).double().mean().item()}


# ------------------------------------------------------------------------------------------ data
def _subset(dataset, n: Optional[int], generator):
    """A seeded random subset of ``n`` items (all when n is None or larger), in index order."""
    import torch
    from torch.utils.data import Subset

    if n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:n].sort().values.tolist())


def load_splits(source: str, img_size: int, limit: Optional[int], test_limit: Optional[int], seed: int,
                crop_pct: Optional[float] = None):
    """The images to analyse: ``(train, test, classes)``; ``None`` limits mean all.

    * Fashion-MNIST: seeded random subsets of ``limit`` train-split and ``test_limit`` test-split images.
    * An ImageFolder tree (``root/CLASS/image``): a seeded split of its n images into
      ``min(test_limit, n // 2)`` held-out images (default ``max(1, n // 4)``) and up to ``limit`` of the
      others for training.
    * A flat folder (no labels): ``(images, None, [])``, a seeded subset of ``limit`` images.

    Images are centre-cropped and resized to ``img_size`` (:func:`tokenmorph.data.eval_transform`;
    ``crop_pct`` default: 1.0 for Fashion-MNIST, whose objects fill the frame, 0.875 for photos).
    """
    import torch
    from torch.utils.data import Subset

    from .data import DataError, FashionMNIST, build_dataset, eval_transform

    gen = torch.Generator().manual_seed(seed)
    full = build_dataset(source, train=True)
    is_fmnist = isinstance(full, FashionMNIST)
    full.transform = transform = eval_transform(img_size, crop_pct or (1.0 if is_fmnist else 0.875))
    if is_fmnist:
        test = build_dataset(source, train=False, transform=transform)
        return _subset(full, limit, gen), _subset(test, test_limit, gen), list(full.classes)
    if not full.classes:
        return _subset(full, limit, gen), None, []
    n = len(full)
    if n < 2:
        raise DataError(f"{source} holds {n} labelled image: too few to hold some out; add images")
    n_test = min(test_limit, n // 2) if test_limit else max(1, n // 4)
    n_train = min(limit or n, n - n_test)
    perm = torch.randperm(n, generator=gen)
    return (Subset(full, perm[n_test:n_test + n_train].sort().values.tolist()),
            Subset(full, perm[:n_test].sort().values.tolist()), list(full.classes))


def extract_tokens(teacher, dataset, grid: tuple[int, int], batch_size: int, workers: int, device):
    """Run ``teacher`` over ``dataset``: ``(tokens (M, N, D) float32, labels (M,) int64, skipped)``, on
    ``device``; undecodable images are skipped and counted."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data import DataError, collate_skip

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skip)
    tokens, labels, skipped = [], [], 0
    for images, y, n_bad in tqdm(loader, desc="teacher tokens", unit="batch", leave=False, disable=None):
        skipped += n_bad
        if len(images):
            tokens.append(teacher(images.to(device), grid))
            labels.append(y.to(device))
    if not tokens:
        raise DataError(f"none of the {len(dataset)} images could be decoded")
    return torch.cat(tokens), torch.cat(labels), skipped


# --------------------------------------------------------------------------------------- driver
def _morph_and_measure(tokens, schedule, mode: str, generator, grid: tuple[int, int], chunk: int):
    """Morph every image's tokens with ``schedule`` and measure (a):
    ``(morphed (M, N, D), pair sums (M, 3) (see :func:`pair_sums`), num_groups)``.

    Works in chunks of ``chunk`` images (the grouping needs a (chunk, N, N) Gram matrix). A schedule of
    zeros is the identity grouping, so the token-wise row goes through the same code."""
    import torch

    from .morph import bipartite_morph

    morphed, sums, groups = [], [], None
    for part in tokens.split(chunk):
        m = bipartite_morph(part, schedule, mode=mode, generator=generator)
        part = m.expand(m.reduce(part))  # the release's targets: every token replaced by its group mean
        morphed.append(part)
        sums.append(pair_sums(part, grid, m.labels))
        groups = m.num_groups
    return torch.cat(morphed), torch.cat(sums), groups


def consistency_analysis(teacher, train, test, classes: Sequence[str], grid: tuple[int, int],
                         schedules: Sequence[Sequence[int]], *, mode: str = "reference", batch_size: int = 64,
                         workers: int = 0, device="cpu", seed: int = 0, probe_iterations: int = 100,
                         probe_weight_decay: float = 1e-4) -> dict:
    """Metrics (a) on all images (train and test) and, when ``test`` is given, (b), for the token-wise
    targets and every schedule.

    Args:
        teacher: callable ``(images, grid) -> (B, N, D)`` (see :func:`build_feature_teacher`).
        train, test: data sets of ``(image (3, S, S) in [0, 1], label)``; ``test=None``: no labels, (a) only.
        classes: class names (their count sizes the classifier).
        schedules: morphing schedules; the identity (token-wise) row is always measured first.

    Returns:
        A JSON-ready dict: ``rows`` (one per distinct realised grouping: ``num_groups``, ``schedule``,
        metrics (a), and ``probe`` with metrics (b) when labelled), plus what was measured on.
    """
    import torch

    from .morph import effective_schedule

    N = grid[0] * grid[1]
    protect = mode == "reference"
    tokens, labels, skipped = extract_tokens(teacher, train, grid, batch_size, workers, device)
    n_train = len(tokens)
    if test is not None:
        test_tokens, test_labels, bad = extract_tokens(teacher, test, grid, batch_size, workers, device)
        tokens, labels, skipped = torch.cat([tokens, test_tokens]), torch.cat([labels, test_labels]), skipped + bad
        del test_tokens
    pairs = num_adjacent_pairs(grid)
    gen = torch.Generator(device=tokens.device).manual_seed(seed)

    rows, seen = [], set()
    for schedule in [[0]] + [list(s) for s in schedules]:
        eff = tuple(r for r in effective_schedule(N, schedule, protect) if r)
        if eff in seen:  # e.g. the identity asked for explicitly
            continue
        seen.add(eff)
        morphed, sums, num_groups = _morph_and_measure(tokens, schedule, mode, gen, grid, batch_size)
        row = {"num_groups": num_groups, "schedule": list(eff), "schedule_text": schedule_text(eff),
               **pair_means(sums, pairs)}
        if test is not None:
            # Refit per condition: the classifier reads the targets the student would be trained on.
            probe = fit_linear_probe(morphed[:n_train].flatten(0, 1),
                                     labels[:n_train].repeat_interleave(N), len(classes),
                                     probe_iterations, probe_weight_decay)
            held_out = morphed[n_train:]
            pred = torch.cat([probe.predict(part) for part in held_out.split(batch_size)])
            row["probe"] = probe_metrics(pred, labels[n_train:], grid)
        rows.append(row)
        del morphed
    return {
        "grid": list(grid), "num_tokens": N, "token_dim": int(tokens.shape[-1]), "mode": mode,
        "pairs_per_image": pairs,
        "images": {"analysed": len(tokens), "train": n_train if test is not None else None,
                   "test": len(tokens) - n_train if test is not None else None, "skipped": skipped},
        "classes": list(classes),
        "probe": None if test is None else {
            "fit": "refit per condition on the (morphed) tokens of the training images",
            "method": "multinomial logistic regression, standardised features, full-batch L-BFGS",
            "iterations": probe_iterations, "weight_decay": probe_weight_decay, "chance": 1 / len(classes)},
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
        cells = [str(r["num_groups"]), r["schedule_text"], f(r["adjacent_cosine"]), f(r["same_group_fraction"]),
                 f(r["cross_group_cosine"])]
        if probe:
            p = r["probe"]
            cells += [f(p["token_accuracy"]), f(p["neighbour_agreement"]), f(p["agree_and_right"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def add_teacher_arguments(parser: argparse.ArgumentParser, default: Optional[str], help_text: str) -> None:
    """The teacher flags of the commands that turn images into tokens (viz morph, analyze consistency)."""
    parser.add_argument("--teacher", default=default, metavar="NAME", help=help_text)
    parser.add_argument("--teacher-weights", metavar="FILE", help="teacher state-dict file")
    parser.add_argument("--random-init", action="store_true", help="random teacher weights (tests)")
    parser.add_argument("--teacher-input-size", type=int, metavar="N", help="side the teacher sees (default: its own)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="fashion-mnist[:DIR], an ImageFolder tree (labels: (a) and (b)) or a flat folder of images ((a) only)")
    parser.add_argument("--out", required=True, help="output folder for consistency.json and consistency.png")
    add_teacher_arguments(parser, "efficientnet-lite0", "token source: efficientnet-lite0 (default; offline ImageNet "
                                                        "weights), clip-vit-b16, pixels, timm:NAME, or raw-pixels")
    parser.add_argument("--img-size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--patch-size", type=int, default=16, help="patch side: grid = img-size / patch-size (default 16)")
    parser.add_argument("--groups", help="target group counts, comma-separated (default N, N/2, N/4, N/12, N/24: "
                                         "196,98,49,16,8 at 224/16)")
    parser.add_argument("--schedule", action="append", metavar="S",
                        help="explicit schedule instead of --groups ('RxK' or a comma list); repeat per row")
    parser.add_argument("--iterations", type=int, default=14, help="matching rounds per --groups schedule (default 14)")
    parser.add_argument("--mode", choices=["reference", "paper"], default="reference", help="morphing mode")
    parser.add_argument("--limit", type=int, default=1000,
                        help="images analysed: training images for labelled data, all images of a flat folder "
                             "(default 1000; 0 = all)")
    parser.add_argument("--test-limit", type=int,
                        help="held-out images for (b): from Fashion-MNIST's test split, or held out of an "
                             "ImageFolder (at most half of it) (default: limit / 2; with --limit 0: the whole "
                             "test split, a quarter of an ImageFolder)")
    parser.add_argument("--crop-pct", type=float, help="centre-crop fraction (default 1.0 for Fashion-MNIST, 0.875 otherwise)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per teacher forward (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    parser.add_argument("--probe-iterations", type=int, default=100, help="L-BFGS iterations of the classifier (default 100)")
    parser.add_argument("--probe-weight-decay", type=float, default=1e-4, help="L2 penalty of the classifier (default 1e-4)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="image subsets, held-out split, paper-mode splits")


def run(args: argparse.Namespace) -> int:
    import torch

    from .cli import parse_int_list, parse_schedule
    from .train import TrainingError
    from .viz import plot_consistency

    if args.img_size <= 0 or args.patch_size <= 0 or args.img_size % args.patch_size:
        raise TrainingError(f"--img-size {args.img_size} must be a positive multiple of --patch-size {args.patch_size}")
    for flag in ("limit", "test_limit", "batch_size", "workers"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag == "batch_size" else 0):
            raise TrainingError(f"--{flag.replace('_', '-')} must be >= {1 if flag == 'batch_size' else 0}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    grid = (args.img_size // args.patch_size,) * 2
    N = grid[0] * grid[1]
    groups = parse_int_list(args.groups, "--groups") if args.groups else default_groups(N, args.mode)
    schedules = resolve_schedules(N, groups, [parse_schedule(s) for s in args.schedule or []],
                                  args.iterations, args.mode)
    teacher = build_feature_teacher(args.teacher, patch_size=args.patch_size, weights=args.teacher_weights,
                                    random_init=args.random_init, input_size=args.teacher_input_size, device=device)
    limit = args.limit or None
    test_limit = args.test_limit if args.test_limit is not None else (limit // 2 if limit else None)
    train, test, classes = load_splits(args.data, args.img_size, limit, test_limit or None, args.seed, args.crop_pct)
    result = consistency_analysis(teacher, train, test, classes, grid, schedules, mode=args.mode,
                                  batch_size=args.batch_size, workers=args.workers, device=device, seed=args.seed,
                                  probe_iterations=args.probe_iterations, probe_weight_decay=args.probe_weight_decay)
    result = {"teacher": args.teacher, "data": args.data, "img_size": args.img_size, "patch_size": args.patch_size,
              "definitions": "docs/analysis.md", **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "consistency.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_consistency(result, out / "consistency.png")
    n = result["images"]
    split = f" ({n['train']} train / {n['test']} held out)" if n["train"] is not None else ""
    print(f"{args.teacher} tokens on {args.data}: {n['analysed']} images{split}, {grid[0]}x{grid[1]} grid, "
          f"{result['token_dim']}-d, mode={args.mode}, {n['skipped']} undecodable skipped")
    print(markdown_table(result))
    print(f"wrote {out / 'consistency.json'} and {out / 'consistency.png'}")
    return 0
