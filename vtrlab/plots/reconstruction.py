"""Figures of notebook 03 (the reconstruction selector): each function draws one figure and returns it.

Tables come from ``vtrlab.analysis.reconstruction``; save with ``vtrlab.runner.save_figure``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vtrlab.plots.curves import layer_curve
from vtrlab.plots.heatmap import heatmap_over_image
from vtrlab.plots.style import figure

GROUPS = ("reading", "scene")


def training_curves(history, config):
    """Selector training: loss terms (with held-out reconstruction if logged), kept fraction vs
    the target ``config.p``, and the selector's configuration as text."""
    fig, axes = figure("double", height=2.2, ncols=3)
    smooth = lambda s: s.rolling(max(len(s) // 50, 1), min_periods=1).mean()
    axes[0].plot(history["step"], smooth(history["loss"]), label="loss")
    axes[0].plot(history["step"], smooth(history["recon"]), label="reconstruction")
    if "eval_recon" in history:
        ev = history.dropna(subset=["eval_recon"])
        axes[0].plot(ev["step"], ev["eval_recon"], "o-", ms=2, label=f"held-out recon, top {config.p:.0%}")
    axes[0].set(xlabel="step", ylabel="loss", title="loss terms")
    axes[0].legend(fontsize=6)
    axes[1].plot(history["step"], smooth(history["kept"]))
    axes[1].axhline(config.p, ls="--", c="k", lw=0.8, label="p")
    axes[1].set(xlabel="step", ylabel="mean(M)", title="kept fraction (hard mask)")
    axes[1].legend(fontsize=6)
    axes[2].axis("off")
    axes[2].text(
        0,
        0.5,
        "\n".join(f"{k}: {v}" for k, v in vars(config).items() if k not in ("extra", "model")),
        fontsize=6,
        va="center",
    )
    return fig


def kept_token_maps(examples: Sequence[Any], batch: Any, scores: Sequence[np.ndarray], kept: dict):
    """One row per example: the image, the selector's logits, and the tokens kept at each ratio of
    ``kept`` (dropped tokens dark; titles give the share of relevant tokens kept). ``kept``:
    ``vtrlab.analysis.reconstruction.kept_sets``'s ``{ratio: [{"keep", "relevant_kept"}, ...]}``."""
    n = len(examples)
    show = list(kept)
    fig, axes = figure("double", height=1.45 * n, nrows=n, ncols=2 + len(show), squeeze=False)
    for i, (s, lay, sc) in enumerate(zip(examples, batch.layouts, scores)):
        axes[i, 0].imshow(s.image)
        axes[i, 0].set_title(f"{s.family} → {s.answer}", fontsize=6)
        heatmap_over_image(axes[i, 1], s.image, sc, layout=lay, colorbar=False)
        axes[i, 1].set_title("selector logits", fontsize=6)
        for j, r in enumerate(show):
            keep = kept[r][i]["keep"]
            heatmap_over_image(
                axes[i, 2 + j],
                s.image,
                np.where(keep, np.nan, 0.0),
                layout=lay,
                alpha=0.85,
                cmap="gray",
                vmin=0,
                vmax=1,
                colorbar=False,
            )
            axes[i, 2 + j].set_title(f"keep {r:.0%}: {kept[r][i]['relevant_kept']:.0%} of relevant", fontsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def accuracy_vs_keep_ratio(acc, groups: Sequence[str] = GROUPS):
    """Accuracy vs share of image tokens kept, one panel per group: selector and random curves,
    full and no-image as horizontal lines. ``acc``: the by-group table of ``accuracy_tables``."""
    fig, axes = figure("double", height=2.3, ncols=2, sharey=True)
    for ax, group in zip(axes, groups):
        d = acc[acc["group"] == group]
        for method, style in (("selector", "o-"), ("random", "s--")):
            m = d[d["method"] == method].sort_values("ratio")
            ax.plot(m["ratio"] * 100, m["accuracy"], style, ms=3, label=method)
        for method, ls in (("full", "-"), ("no_image", ":")):
            v = d.loc[d["method"] == method, "accuracy"]
            if len(v):
                ax.axhline(float(v.iloc[0]), ls=ls, c="0.4", lw=0.9, label=method.replace("_", "-"))
        n = int(d["n"].max())
        ax.set(xlabel="image tokens kept (%)", title=f"{group} (n={n})", ylim=(-0.02, 1.02))
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=6)
    return fig


def token_error_maps(examples: Sequence[Any], batch: Any, err):
    """Per-token reconstruction error (``vtrlab.recon.token_error``'s Dataset) over each example image,
    one colour scale (0 to the 99th percentile) for every map."""
    n = len(examples)
    err = err["recon_error"]
    vmax = float(np.nanpercentile(err.values, 99))
    fig, axes = figure("double", height=1.5, ncols=n, squeeze=False)
    for i, (s, lay) in enumerate(zip(examples, batch.layouts)):
        v = err.sel(sample=i).values[: lay.n_image_tokens]
        heatmap_over_image(axes[0, i], s.image, v, layout=lay, vmin=0.0, vmax=vmax, colorbar=i == n - 1)
        axes[0, i].set_title(s.family, fontsize=6)
        axes[0, i].set_xticks([])
        axes[0, i].set_yticks([])
    return fig


def layer_error_curves(per_sample):
    """Per-layer reconstruction error (mean with bootstrap band), vision and LM panels.
    ``per_sample``: the table of ``layer_error_table``."""
    data = per_sample.rename(columns={"error": "layer_recon_error"})
    fig, axes = figure("double", height=2.0, ncols=2, sharey=True)
    for ax, stack in zip(axes, ["vision", "lm"]):
        layer_curve(ax, data[data["stack"] == stack], x="index", y="layer_recon_error")
        ax.set(xlabel=f"{stack} layer", title=f"{stack}: dropped tokens rebuilt from kept 50%")
    axes[0].set_ylabel("standardised MSE")
    return fig


def relevance_recall(agree, groups: Sequence[str] = GROUPS):
    """Recall of relevant tokens in the kept set vs share kept, selector and random, one panel per
    group, random keep as the control beside the selector. The selector's AUROC is not titled here: it
    stands beside its controls (objectness, among-objects, randomized model) in notebook 03's signal-controls
    figure. ``agree``: ``relevance_agreement``'s table."""
    fig, axes = figure("double", height=2.1, ncols=2, sharey=True)
    for ax, group in zip(axes, groups):
        d = agree[(agree["group"] == group) & (agree["metric"] == "recall")]
        for method, style in (("selector", "o-"), ("random", "s--")):
            m = d[d["method"] == method].groupby("ratio")["value"].mean()
            ax.plot(m.index * 100, m.values, style, ms=3, label=method)
        ax.set(xlabel="image tokens kept (%)", title=f"{group}: relevant tokens kept")
    axes[0].set_ylabel("relevant tokens kept (recall)")
    axes[1].legend(fontsize=6)
    return fig
