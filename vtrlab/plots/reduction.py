"""Figures of notebook 04 (reduction methods): drawing only what the tables give."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from vtrlab.plots.curves import layer_matrix
from vtrlab.plots.style import figure

RANDOM = "random"


def metrics_vs_budget(acc: pd.DataFrame):
    """Accuracy, gold-answer log-prob and KL to the full model vs keep ratio, one line per method
    (95% bootstrap CI as a band); random keep as the band over seeds; the full model as a line."""
    fig, axes = figure("double", height=2.3, ncols=3)
    red = acc[(acc["method"] != "full") & (acc["seed"] == -1)]
    full = acc[acc["method"] == "full"]
    for ax, (col, label) in zip(
        axes, (("accuracy", "accuracy"), ("logprob", "gold answer log-prob"), ("kl", "KL(full || reduced), nats"))
    ):
        for method, g in red.groupby("method", sort=True):
            g = g.sort_values("budget")
            x = g["budget"] * 100
            if method == RANDOM:
                ax.fill_between(x, g[f"{col}_lo"], g[f"{col}_hi"], color="0.7", alpha=0.6, lw=0, label="random (seeds)")
                ax.plot(x, g[col], "--", c="0.4", lw=0.9)
                continue
            (line,) = ax.plot(x, g[col], "o-", ms=2.5, lw=1, label=method)
            ax.fill_between(x, g[f"{col}_lo"], g[f"{col}_hi"], color=line.get_color(), alpha=0.15, lw=0)
        if len(full) and col != "kl":
            ax.axhline(float(full[col].iloc[0]), c="k", lw=0.8, ls=":", label="full")
        ax.set(xlabel="image tokens kept (%)", ylabel=label)
    axes[0].legend(fontsize=5, ncol=1)
    return fig


def recall_vs_budget(recall: pd.DataFrame):
    """Share of ground-truth relevant tokens kept vs keep ratio per method; chance = the keep share."""
    fig, ax = figure("single", height=2.3)
    r = recall[recall["seed"] == -1]
    for method, g in r.groupby("method", sort=True):
        g = g.sort_values("budget")
        ax.plot(g["budget"] * 100, g["recall"], "--" if method == RANDOM else "o-", ms=2.5, lw=1, label=method)
    xs = np.linspace(0, 100, 11)
    ax.plot(xs, xs / 100, ":", c="0.5", lw=0.8, label="chance")
    ax.set(xlabel="image tokens kept (%)", ylabel="relevant tokens kept", ylim=(-0.02, 1.02))
    ax.legend(fontsize=5)
    return fig


def agreement_figure(jaccard: pd.DataFrame, spearman_m: pd.DataFrame, budget: float):
    """Jaccard of kept sets and Spearman of scores between methods (clustered order) at one budget."""
    fig, axes = figure("double", height=3.0, ncols=2)
    labels = list(jaccard.index)
    layer_matrix(axes[0], jaccard.to_numpy(), labels=labels, xlabel="", ylabel="", vmin=0, vmax=1, annotate=True)
    axes[0].set_title(f"Jaccard of kept sets ({budget:.0%})")
    layer_matrix(axes[1], spearman_m.to_numpy(), labels=labels, xlabel="", ylabel="", vmin=-1, vmax=1, annotate=True)
    axes[1].set_title("Spearman of scores")
    for ax in axes:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=5)
    return fig


def position_bias_maps(maps: Mapping[str, np.ndarray], budget: float):
    """Mean kept share per grid cell for each method (one colour scale 0..1)."""
    names = sorted(maps)
    n = len(names)
    cols = min(n, 5)
    rows = int(np.ceil(n / cols))
    fig, axes = figure("double", height=1.45 * rows + 0.3, nrows=rows, ncols=cols, squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        im = ax.imshow(maps[names[k]], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(names[k], fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8, label=f"share kept ({budget:.0%} budget)")
    return fig
