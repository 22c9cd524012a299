"""The picture of ``tokenmorph viz reconstruct``: one row per image, input | prediction |
   prediction
+ visible | target."""

from __future__ import annotations

from pathlib import Path

from ._mpl import pyplot, save_figure

__all__ = ["save_reconstruction_figure"]


def save_reconstruction_figure(result: dict, out, title: str = "", dpi: int = 120) -> Path:
    """One row per image: input | prediction | prediction + visible | target."""
    cols = [
        ("input", "input"),
        ("prediction", "prediction"),
        ("pasted", "prediction + visible"),
        ("target", "target"),
    ]
    cols = [(k, label) for k, label in cols if result[k] is not None]
    n = result["input"].shape[0]
    plt = pyplot()
    fig, axes = plt.subplots(
        n, len(cols), figsize=(2.4 * len(cols), 2.4 * n + (0.4 if title else 0)), squeeze=False
    )
    for i in range(n):
        for j, (k, label) in enumerate(cols):
            ax = axes[i][j]
            ax.imshow(result[k][i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, out, dpi)
