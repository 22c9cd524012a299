"""Pictures of morphing: every patch group a colour, group borders outlined.

Pure functions build (H, W, 3) arrays; :func:`save_morph_figure` lays out a grid of images x schedules
with matplotlib (imported lazily, so the core library does not need it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["group_colors", "draw_groups", "save_morph_figure", "morph_gallery", "read_metrics", "smooth_ema",
           "plot_runs", "plot_consistency"]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path, dpi: int) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    _pyplot().close(fig)
    return out


def group_colors(num_groups: int, seed: int = 0) -> np.ndarray:
    """(G, 3) distinct-looking colours in [0, 1] (golden-ratio hues, fixed seed for saturation)."""
    import colorsys

    rng = np.random.default_rng(seed)
    hues = (np.arange(num_groups) * 0.618033988749895) % 1.0
    sats = rng.uniform(0.55, 0.95, num_groups)
    vals = rng.uniform(0.75, 1.0, num_groups)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, vals)])


def draw_groups(image: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], alpha: float = 0.45) -> np.ndarray:
    """Overlay a grouping on an image.

    Args:
        image: (3, H, W) in [0, 1].
        labels: (N,) group index per patch, N = grid[0] * grid[1], row-major.
        grid: (h, w) patches.
        alpha: weight of the group colour.

    Returns:
        (H, W, 3) float array: image blended with group colours; where two neighbouring patches belong
        to different groups, a dark border line is drawn. Singleton groups (size 1) keep the image's
        own colour, so token-wise grouping shows the plain photo with the patch grid.
    """
    h, w = grid
    img = image.permute(1, 2, 0).numpy().astype(np.float64)
    H, W = img.shape[:2]
    ph, pw = H // h, W // w
    lab = labels.reshape(h, w).numpy()
    counts = np.bincount(lab.reshape(-1), minlength=int(lab.max()) + 1)
    colors = group_colors(int(lab.max()) + 1)
    patch_color = colors[lab]  # (h, w, 3)
    singleton = counts[lab] == 1
    pix_color = np.repeat(np.repeat(patch_color, ph, 0), pw, 1)
    pix_single = np.repeat(np.repeat(singleton, ph, 0), pw, 1)[..., None]
    out = np.where(pix_single, img, (1 - alpha) * img + alpha * pix_color)
    # borders: compare each patch with its right and lower neighbour
    line = max(1, min(ph, pw) // 16)
    dark = np.array([0.05, 0.05, 0.05])
    for i in range(h):
        for j in range(w):
            if j + 1 < w and lab[i, j] != lab[i, j + 1]:
                x = (j + 1) * pw
                out[i * ph : (i + 1) * ph, max(0, x - line) : x + line] = dark
            if i + 1 < h and lab[i, j] != lab[i + 1, j]:
                y = (i + 1) * ph
                out[max(0, y - line) : y + line, j * pw : (j + 1) * pw] = dark
    return out.clip(0, 1)


def save_morph_figure(
    images: Sequence[torch.Tensor],
    labels: Sequence[Sequence[torch.Tensor]],
    titles: Sequence[str],
    row_names: Sequence[str],
    grid: tuple[int, int],
    out: str | Path,
    suptitle: str = "",
) -> Path:
    """A grid figure: one row per image, one column per schedule; ``labels[i][j]`` is (N,)."""
    plt = _pyplot()
    rows, cols = len(images), len(titles)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + (0.5 if suptitle else 0)), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(draw_groups(images[i], labels[i][j], grid))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(row_names[i], fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, out, dpi=110)


def morph_gallery(
    images: torch.Tensor,
    teacher,
    schedules: Sequence[Sequence[int]],
    out: str | Path,
    *,
    patch_size: int = 16,
    mode: str = "reference",
    row_names: Sequence[str] | None = None,
    seed: int = 0,
    suptitle: str = "",
) -> Path:
    """Morph the tokens of ``images`` with every schedule and draw the groups (one row per image, one
    column per schedule, titled with the group count).

    Args:
        images: (B, 3, H, W) in [0, 1]; H and W multiples of ``patch_size``.
        teacher: callable ``(images, grid) -> (B, grid[0] * grid[1], D)`` token features, e.g. a
            :class:`tokenmorph.teachers.Teacher` or :func:`tokenmorph.analysis.build_feature_teacher`'s
            result; the grouping is computed from these tokens, as DTM computes it from its targets.
        schedules: one morphing schedule per column (``[0]`` is token-wise).
        mode: ``"reference"`` or ``"paper"`` (random split, seeded by ``seed``).
        row_names: one label per image (default: none).
    """
    from .morph import bipartite_morph, effective_schedule

    B, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}")
    grid = (H // patch_size, W // patch_size)
    N = grid[0] * grid[1]
    tokens = teacher(images, grid)
    gen = torch.Generator().manual_seed(seed)
    labels, titles = [], []
    for s in schedules:
        m = bipartite_morph(tokens, s, mode=mode, generator=gen)
        labels.append(m.labels.cpu())
        rounds = sum(1 for r in effective_schedule(N, s, mode == "reference") if r)
        titles.append(f"{N} groups (token-wise)" if m.num_groups == N else f"{m.num_groups} groups ({rounds} it.)")
    per_image = [[lab[i] for lab in labels] for i in range(B)]
    return save_morph_figure(list(images.cpu()), per_image, titles, list(row_names or [""] * B), grid, out,
                             suptitle=suptitle)


def plot_consistency(result: dict, out: str | Path) -> Path:
    """The result of :func:`tokenmorph.analysis.consistency_analysis` against the number of groups:
    left, adjacent-token cosine (all pairs, cross-group pairs) and the same-group fraction; right (with
    labels), per-token accuracy, neighbour agreement and agree-and-right of the linear classifier."""
    plt = _pyplot()
    rows = sorted(result["rows"], key=lambda r: r["num_groups"])
    groups = [r["num_groups"] for r in rows]
    probe = result.get("probe") is not None
    fig, axes = plt.subplots(1, 2 if probe else 1, figsize=(5.2 * (2 if probe else 1), 3.6), squeeze=False)
    panels = [(axes[0][0], "spatial consistency of targets", [
        ("adjacent cosine", [r["adjacent_cosine"] for r in rows]),
        ("cross-group cosine", [r["cross_group_cosine"] for r in rows]),
        ("same-group pairs", [r["same_group_fraction"] for r in rows])])]
    if probe:
        panels.append((axes[0][1], "per-token linear classification (held out)", [
            (label, [r["probe"][key] for r in rows]) for label, key in (
                ("token accuracy", "token_accuracy"), ("neighbour agreement", "neighbour_agreement"),
                ("agree and right", "agree_and_right"))]))
    if probe:
        axes[0][1].axhline(result["probe"]["chance"], color="grey", ls="--", lw=1, label="chance")
    for ax, title, series in panels:
        for label, values in series:
            pts = [(g, v) for g, v in zip(groups, values) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=1.4, label=label)
        ax.set_xscale("log")
        ax.set_xticks(groups, [str(g) for g in groups], minor=False)
        ax.set_xticks([], minor=True)
        ax.invert_xaxis()  # left to right: token-wise, then more and more merging
        ax.set_xlabel(f"groups (of {result['num_tokens']} tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.get('teacher', 'teacher')} tokens on {result.get('data', 'data')}, "
                 f"{result['images']['analysed']} images", fontsize=10)
    return _save(fig, out, dpi=110)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (unparseable lines are skipped)."""
    import json

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def smooth_ema(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard-style smoothing: exponential moving average ``s_t = w s_{t-1} + (1 - w) x_t``,
    debiased by ``1 - w^t`` so the curve starts at the first value; ``weight=0`` returns the values."""
    x = np.asarray(values, dtype=np.float64)
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc = np.empty_like(x), 0.0
    for t, v in enumerate(x):  # a recurrence over time, not over a batch
        acc = weight * acc + (1 - weight) * v
        out[t] = acc / (1 - weight ** (t + 1))
    return out


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, keys: Sequence[str] = ("loss", "lr", "img_per_s"),
              *, smooth: float = 0.0, labels: Sequence[str] | None = None) -> Path:
    """Training curves of one or more runs overlaid, one panel per metric key, against the step.

    ``smooth``: EMA weight in [0, 1) (see :func:`smooth_ema`); the raw curve stays, faint, behind the
    smoothed one. ``labels``: legend names (default: the run folders' names)."""
    plt = _pyplot()
    names = list(labels) if labels is not None else [Path(d).name for d in run_dirs]
    runs = [(name, read_metrics(d)) for name, d in zip(names, run_dirs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, records in runs:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not pts:
                continue
            steps, values = zip(*pts)
            if smooth:
                line, = ax.plot(steps, values, lw=0.8, alpha=0.3)
                ax.plot(steps, smooth_ema(values, smooth), label=name, lw=1.4, color=line.get_color())
            else:
                ax.plot(steps, values, label=name, lw=1.4)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    return _save(fig, out, dpi=100)
