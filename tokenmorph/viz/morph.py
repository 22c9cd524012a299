"""Pictures of morphing: every patch group a colour, group borders outlined.

Pure functions build (H, W, 3) arrays; :func:`save_morph_figure` lays out a grid of images x
schedules with matplotlib (imported lazily, so the core library does not need it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ._mpl import pyplot, save_figure

__all__ = ["group_colors", "draw_groups", "save_morph_figure", "morph_gallery"]


def group_colors(num_groups: int, seed: int = 0) -> np.ndarray:
    """(G, 3) distinct-looking colours in [0, 1] (golden-ratio hues, fixed seed for saturation)."""
    import colorsys

    rng = np.random.default_rng(seed)
    hues = (np.arange(num_groups) * 0.618033988749895) % 1.0
    sats = rng.uniform(0.55, 0.95, num_groups)
    vals = rng.uniform(0.75, 1.0, num_groups)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, vals)])


def draw_groups(
    image: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], alpha: float = 0.45
) -> np.ndarray:
    """Overlay a grouping on an image.

    Args:
        image: (3, H, W) in [0, 1].
        labels: (N,) group index per patch, N = grid[0] * grid[1], row-major.
        grid: (h, w) patches.
        alpha: weight of the group colour.

    Returns:
        (H, W, 3) float array: image blended with group colours; where two neighbouring patches
        belong to different groups, a dark border line is drawn. Singleton groups (size 1) keep
        the image's own colour, so token-wise grouping shows the plain photo with the patch grid.
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
    plt = pyplot()
    rows, cols = len(images), len(titles)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols, 2.6 * rows + (0.5 if suptitle else 0)), squeeze=False
    )
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
    return save_figure(fig, out, dpi=110)


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
    """Morph the tokens of ``images`` with every schedule and draw the groups (one row per image,
    one column per schedule, titled with the group count).

    Args:
        images: (B, 3, H, W) in [0, 1]; H and W multiples of ``patch_size``.
        teacher: callable ``(images, grid) -> (B, grid[0] * grid[1], D)`` token features, e.g. a
            :class:`tokenmorph.teachers.Teacher` or
            :func:`tokenmorph.models.teachers.build_feature_source`'s result; the grouping is
            computed from these tokens, as DTM computes it from its targets.
        schedules: one morphing schedule per column (``[0]`` is token-wise).
        mode: ``"reference"`` or ``"paper"`` (random split, seeded by ``seed``).
        row_names: one label per image (default: none).
    """
    from ..ops.morph import bipartite_morph, effective_schedule

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
        titles.append(
            f"{N} groups (token-wise)"
            if m.num_groups == N
            else f"{m.num_groups} groups ({rounds} it.)"
        )
    per_image = [[lab[i] for lab in labels] for i in range(B)]
    return save_morph_figure(
        list(images.cpu()),
        per_image,
        titles,
        list(row_names or [""] * B),
        grid,
        out,
        suptitle=suptitle,
    )
