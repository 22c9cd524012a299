"""The picture of ``tokenmorph analyze consistency``: its metrics against the number of groups."""

from __future__ import annotations

from pathlib import Path

from ._mpl import pyplot, save_figure

__all__ = ["plot_consistency"]


def plot_consistency(result: dict, out: str | Path) -> Path:
    """The result of :func:`tokenmorph.eval.consistency.consistency_analysis` against the number
       of
    groups: left, adjacent-token cosine (all pairs, cross-group pairs) and the same-group
    fraction; right (with labels), per-token accuracy, neighbour agreement and agree-and-right of
    the linear classifier."""
    plt = pyplot()
    rows = sorted(result["rows"], key=lambda r: r["num_groups"])
    groups = [r["num_groups"] for r in rows]
    probe = result.get("probe") is not None
    fig, axes = plt.subplots(
        1, 2 if probe else 1, figsize=(5.2 * (2 if probe else 1), 3.6), squeeze=False
    )
    panels = [
        (
            axes[0][0],
            "spatial consistency of targets",
            [
                ("adjacent cosine", [r["adjacent_cosine"] for r in rows]),
                ("cross-group cosine", [r["cross_group_cosine"] for r in rows]),
                ("same-group pairs", [r["same_group_fraction"] for r in rows]),
            ],
        )
    ]
    if probe:
        panels.append(
            (
                axes[0][1],
                "per-token linear classification (held out)",
                [
                    (label, [r["probe"][key] for r in rows])
                    for label, key in (
                        ("token accuracy", "token_accuracy"),
                        ("neighbour agreement", "neighbour_agreement"),
                        ("agree and right", "agree_and_right"),
                    )
                ],
            )
        )
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
    fig.suptitle(
        f"{result.get('teacher', 'teacher')} tokens on {result.get('data', 'data')}, "
        f"{result['images']['analysed']} images",
        fontsize=10,
    )
    return save_figure(fig, out, dpi=110)
