"""Pictures of morphing: every patch group a colour, group borders outlined.

Pure functions build (H, W, 3) arrays; :func:`save_morph_figure` lays out a grid of images x schedules
with matplotlib (imported lazily, so the core library does not need it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["group_colors", "draw_groups", "save_morph_figure", "read_metrics", "plot_runs"]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, keys: Sequence[str] = ("loss", "lr", "img_per_s")) -> Path:
    """Training curves of one or more runs overlaid, one panel per metric key, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d).name, read_metrics(d)) for d in run_dirs]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, records in runs:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.4)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
