"""Figures of notebook 02 (information flow): knockout-window curves, signals vs ground truth per layer,
and the one-figure summary. Draws what it is given (tidy frames from ``vtrlab.analysis.flow``)."""

from __future__ import annotations

import pandas as pd

from vtrlab.plots.curves import layer_curve
from vtrlab.plots.style import figure


def knockout_windows(sweep: pd.DataFrame, edges: list[str], hue: str | None = "family"):
    """One panel per edge: relative change of p(answer) (per sample) against the window's first layer."""
    fig, axes = figure("double", nrows=1, ncols=len(edges), squeeze=False, sharey=True)
    for ax, edge in zip(axes[0], edges):
        layer_curve(ax, sweep[sweep["edge"] == edge], x="window_start", y="relative_change", hue=hue)
        ax.axhline(0.0, color="0.6", lw=0.6, ls="--")
        ax.set_title(edge, fontsize=6)
        ax.set_xlabel("window start (layer)")
        if ax is not axes[0, -1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    axes[0, 0].set_ylabel("relative change of p(answer)")
    if axes[0, -1].get_legend() is not None:
        axes[0, -1].legend(fontsize=4, frameon=False)
    return fig


def signals_vs_truth(per_sample: pd.DataFrame, metrics=("auroc", "auroc_objects")):
    """AUROC per layer of each signal against the relevant patches (per sample, bootstrap band), with the
    objectness baseline as a dashed line."""
    fig, axes = figure("double", nrows=1, ncols=len(metrics), squeeze=False)
    base = float(per_sample.groupby("sample")["objectness_auroc"].first().mean())
    for ax, m in zip(axes[0], metrics):
        layer_curve(ax, per_sample, x="layer", y=m, hue="signal")
        ax.axhline(0.5, color="0.6", lw=0.6, ls="--")
        if m == "auroc":
            ax.axhline(base, color="0.3", lw=0.6, ls=":", label="objectness")
        ax.set_ylabel({"auroc": "AUROC vs relevant patches", "auroc_objects": "AUROC among object patches"}.get(m, m))
        ax.legend(fontsize=4, frameon=False)
    return fig


def summary(sweep: pd.DataFrame, per_sample: pd.DataFrame, edges: list[str]):
    """Left: which signal points at the relevant tokens, per layer; right: which edges carry the answer."""
    fig, axes = figure("double", nrows=1, ncols=2, squeeze=False)
    layer_curve(axes[0, 0], per_sample, x="layer", y="auroc", hue="signal")
    axes[0, 0].axhline(0.5, color="0.6", lw=0.6, ls="--")
    axes[0, 0].set_ylabel("AUROC vs relevant patches")
    axes[0, 0].legend(fontsize=4, frameon=False)
    layer_curve(axes[0, 1], sweep[sweep["edge"].isin(edges)], x="window_start", y="relative_change", hue="edge")
    axes[0, 1].axhline(0.0, color="0.6", lw=0.6, ls="--")
    axes[0, 1].set_xlabel("knockout window start (layer)")
    axes[0, 1].set_ylabel("relative change of p(answer)")
    axes[0, 1].legend(fontsize=4, frameon=False)
    return fig
