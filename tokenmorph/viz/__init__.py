"""Pictures: morph galleries (:mod:`.morph`), training curves (:mod:`.curves`), the consistency
analysis (:mod:`.consistency`) and reconstructions (:mod:`.reconstruct`). matplotlib is imported
on first use."""

from .consistency import plot_consistency
from .curves import plot_runs, read_metrics, smooth_ema
from .morph import draw_groups, group_colors, morph_gallery, save_morph_figure
from .reconstruct import save_reconstruction_figure

__all__ = [
    "plot_consistency",
    "plot_runs",
    "read_metrics",
    "smooth_ema",
    "draw_groups",
    "group_colors",
    "morph_gallery",
    "save_morph_figure",
    "save_reconstruction_figure",
]
