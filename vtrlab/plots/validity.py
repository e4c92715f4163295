"""Figures of the validity checks: relevance scores beside their controls, deletion / insertion curves,
and the model-randomization check. Plots draw the tables they are given (``vtrlab.analysis.controls``,
``vtrlab.analysis.deletion``, ``vtrlab.analysis.randomization``); CIs come precomputed in the tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from vtrlab.plots.style import figure

CONTROL_STYLE = {  # metric -> (label, line style, colour): fixed, so a missing metric never shifts the colours
    "auroc": ("AUROC (all tokens)", "-", "C0"),
    "object_auroc": ("AUROC target vs distractor objects", "-", "C1"),
    "objectness_auroc": ("objectness baseline (all objects)", ":", "C2"),
}


def _band(ax, d: pd.DataFrame, x: str, label: str, ls: str = "-", color=None):
    d = d.sort_values(x)
    (line,) = ax.plot(d[x], d["mean"], ls=ls, marker="o", markersize=2.5, label=label, color=color)
    ax.fill_between(d[x], d["low"], d["high"], alpha=0.2, color=line.get_color(), lw=0)
    return line


def _shade_agnostic(ax, agnostic: Mapping[int, bool] | None, label: bool):
    first = True
    for k, v in sorted((agnostic or {}).items()):
        if v:
            ax.axvspan(
                k - 0.5,
                k + 0.5,
                color="0.85",
                zorder=0,
                lw=0,
                label="question-agnostic layer" if (label and first) else None,
            )
            first = False


def controls_per_layer(
    ci: pd.DataFrame,
    agnostic: Mapping[int, bool] | None = None,
    layer: str = "layer",
    families: Sequence[str] | None = None,
    title: str = "",
):
    """One panel per family: per-layer AUROC and target-vs-distractor AUROC with their 95% CIs, the
    objectness baseline (band), chance (0.5), and question-agnostic layers shaded. ``ci``: a
    :func:`vtrlab.analysis.controls.controls_ci` table."""
    families = list(families or dict.fromkeys(ci["family"]))
    ncols = min(3, len(families))
    nrows = int(np.ceil(len(families) / ncols))
    fig, axes = figure("double", height=1.7 * nrows + 0.3, nrows=nrows, ncols=ncols, squeeze=False, sharey=True)
    for i, fam in enumerate(families):
        ax = axes.flat[i]
        g = ci[ci["family"] == fam]
        _shade_agnostic(ax, agnostic, label=i == 0)
        for metric, (label, ls, color) in CONTROL_STYLE.items():
            d = g[(g["metric"] == metric)].dropna(subset=["mean"])
            if not d.empty:
                _band(ax, d, layer, label, ls, color=color)
        ax.axhline(0.5, color="0.5", lw=0.6, ls="--")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{fam} (n={int(g['n'].max()) if len(g) else 0})", fontsize=7)
        ax.set_xlabel(layer.replace("_", " "))
        xs = sorted(g[layer].unique())
        if xs:
            ax.set_xticks(xs)
    for ax in list(axes.flat)[len(families) :]:
        ax.set_axis_off()
    axes.flat[0].set_ylabel("AUROC")
    axes.flat[0].legend(fontsize=5, frameon=False, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def deletion_curves_figure(curves: pd.DataFrame, y: str = "accuracy", signals: Sequence[str] | None = None):
    """Deletion (left) and insertion (right) curves: ``y`` (mean with 95% CI band) against the fraction
    of image tokens removed / kept, one line per signal; points flagged ``out_of_distribution`` are
    drawn hollow. ``curves``: a :func:`vtrlab.analysis.deletion.curve_table` table."""
    signals = list(signals or dict.fromkeys(curves["signal"]))
    fig, axes = figure("double", nrows=1, ncols=2, sharey=True)
    for ax, mode in zip(axes, ("deletion", "insertion")):
        sub = curves[(curves["mode"] == mode) & (curves["metric"] == y)]
        for j, s in enumerate(signals):
            d = sub[sub["signal"] == s].sort_values("fraction")
            if d.empty:
                continue
            line = _band(ax, d, "fraction", s, color=f"C{j % 10}")  # one colour per signal in both panels
            ood = d[d["out_of_distribution"]]
            ax.plot(ood["fraction"], ood["mean"], "o", mfc="white", mec=line.get_color(), markersize=3.5)
        ax.set_xlabel("fraction of image tokens " + ("removed" if mode == "deletion" else "kept"))
        ax.set_title(mode, fontsize=7)
    axes[0].set_ylabel(y.replace("_", " "))
    axes[0].legend(fontsize=5, frameon=False)
    return fig


def randomization_figure(table: pd.DataFrame, signals: Sequence[str] | None = None):
    """Model-randomization check: per cascade step, each signal's Spearman correlation with its map on
    the trained model (left) and its AUROC against ground truth (right), mean with 95% CI band.
    ``table``: a :func:`vtrlab.analysis.randomization.randomization_ci` table."""
    signals = list(signals or dict.fromkeys(table["signal"]))
    steps = list(dict.fromkeys(table.sort_values("step")["step_name"]))
    fig, axes = figure("double", nrows=1, ncols=2)
    for ax, metric, label in zip(axes, ("spearman", "auroc"), ("Spearman ρ with trained map", "AUROC")):
        sub = table[table["metric"] == metric]
        for j, s in enumerate(signals):
            d = sub[sub["signal"] == s].dropna(subset=["mean"])
            if not d.empty:
                _band(ax, d, "step", s, color=f"C{j % 10}")
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels(steps, rotation=60, ha="right", fontsize=5)
        ax.set_ylabel(label)
        ax.axhline(0.5 if metric == "auroc" else 0.0, color="0.5", lw=0.6, ls="--")
    axes[0].legend(fontsize=5, frameon=False)
    return fig


def accuracy_per_family(acc_ci: pd.DataFrame, methods: Sequence[str] = ("selector", "random"), by: str = "family"):
    """Accuracy vs keep ratio, one panel per family (or group), selector and random with 95% CI bands,
    full and no-image as horizontal lines. ``acc_ci``: a :func:`vtrlab.analysis.controls.accuracy_ci` table."""
    fams = list(dict.fromkeys(acc_ci[by]))
    ncols = min(3, len(fams))
    nrows = int(np.ceil(len(fams) / ncols))
    fig, axes = figure("double", height=1.6 * nrows + 0.3, nrows=nrows, ncols=ncols, squeeze=False, sharey=True)
    for i, fam in enumerate(fams):
        ax = axes.flat[i]
        g = acc_ci[acc_ci[by] == fam]
        for j, m in enumerate(methods):
            d = g[(g["method"] == m) & (g["ratio"] > 0) & (g["ratio"] < 1)]
            if not d.empty:
                _band(ax, d, "ratio", m, color=f"C{j}")
        for m, ls in (("full", "-"), ("no_image", ":")):
            d = g[g["method"] == m]
            if not d.empty:
                ax.axhline(float(d["mean"].iloc[0]), color="0.4", lw=0.7, ls=ls, label=m.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{fam} (n={int(g['n'].max()) if len(g) else 0})", fontsize=7)
        ax.set_xlabel("keep ratio")
    for ax in list(axes.flat)[len(fams) :]:
        ax.set_axis_off()
    axes.flat[0].set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=5, frameon=False)
    return fig
