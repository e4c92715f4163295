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


def randomization_figure(
    table: pd.DataFrame, signals: Sequence[str] | None = None, baseline: tuple[float, float, float] | None = None
):
    """Model-randomization check: per cascade step, each signal's Spearman correlation with its map on
    the trained model (left), its AUROC against ground truth (middle) and its AUROC between target and
    distractor objects (right), mean with 95% CI band; ``baseline`` (mean, low, high): the objectness
    baseline drawn beside the AUROC. ``table``: a :func:`vtrlab.analysis.randomization.randomization_ci`
    table (pooled, or its family ``"all"`` rows are used)."""
    if "family" in table.columns:
        table = table[table["family"] == "all"]
    signals = list(signals or dict.fromkeys(table["signal"]))
    steps = list(dict.fromkeys(table.sort_values("step")["step_name"]))
    panels = [
        ("spearman", "Spearman ρ with trained map"),
        ("auroc", "AUROC"),
        ("object_auroc", "AUROC target vs distractors"),
    ]
    panels = [p for p in panels if p[0] in set(table["metric"])]
    fig, axes = figure("double", nrows=1, ncols=len(panels), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        sub = table[table["metric"] == metric]
        for j, s in enumerate(signals):
            d = sub[sub["signal"] == s].dropna(subset=["mean"])
            if not d.empty:
                _band(ax, d, "step", s, color=f"C{j % 10}")
        if metric == "auroc" and baseline is not None and np.isfinite(baseline[0]):
            ax.axhline(baseline[0], color="C2", ls=":", lw=0.8, label="objectness baseline")
            ax.axhspan(baseline[1], baseline[2], color="C2", alpha=0.12, lw=0)
            ax.legend(fontsize=5, frameon=False, loc="lower left")
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels(steps, rotation=60, ha="right", fontsize=5)
        ax.set_ylabel(label)
        ax.axhline(0.5 if metric != "spearman" else 0.0, color="0.5", lw=0.6, ls="--")
    axes[0, 0].legend(fontsize=5, frameon=False)
    return fig


FAMILY_ALL = "all"


def signal_controls_figure(
    ci: pd.DataFrame, signals: Sequence[str] | None = None, families: Sequence[str] | None = None
):
    """Every signal's AUROC against ground truth beside its controls, one panel per family: AUROC (all
    tokens) and AUROC target vs distractor objects with 95% CIs per signal, the objectness baseline as a
    dotted line with its CI band, chance as a dashed line. ``ci``: a
    :func:`vtrlab.analysis.controls.signal_controls_ci` table."""
    families = list(families or dict.fromkeys(ci["family"]))
    signals = list(signals or dict.fromkeys(ci["signal"]))
    ncols = min(3, len(families))
    nrows = int(np.ceil(len(families) / ncols))
    height = max(1.6, 0.11 * len(signals) + 0.6) * nrows
    fig, axes = figure("double", height=height, nrows=nrows, ncols=ncols, squeeze=False, sharex=True)
    y = np.arange(len(signals))
    for i, fam in enumerate(families):
        ax = axes.flat[i]
        g = ci[ci["family"] == fam]
        ob = g[g["metric"] == "objectness_auroc"].dropna(subset=["mean"])
        if not ob.empty:
            r = ob.iloc[0]
            ax.axvline(
                r["mean"],
                color=CONTROL_STYLE["objectness_auroc"][2],
                ls=":",
                lw=0.8,
                label=CONTROL_STYLE["objectness_auroc"][0],
            )
            ax.axvspan(r["low"], r["high"], color=CONTROL_STYLE["objectness_auroc"][2], alpha=0.12, lw=0)
        for off, metric in ((-0.15, "auroc"), (0.15, "object_auroc")):
            d = g[g["metric"] == metric].set_index("signal").reindex(signals)
            label, _, color = CONTROL_STYLE[metric]
            err = np.vstack([d["mean"] - d["low"], d["high"] - d["mean"]])
            ax.errorbar(d["mean"], y + off, xerr=np.nan_to_num(err), fmt="o", ms=2.2, lw=0.6, color=color, label=label)
        ax.axvline(0.5, color="0.5", lw=0.6, ls="--")
        ax.set_yticks(y)
        ax.set_yticklabels(signals if i % ncols == 0 else [], fontsize=5)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.02)
        ax.set_title(f"{fam} (n={int(g['n'].max()) if len(g) else 0})", fontsize=7)
        ax.set_xlabel("AUROC")
    spare = list(axes.flat)[len(families) :]
    for ax in spare:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:  # the legend in a free panel, clear of the data
        spare[0].legend(handles, labels, fontsize=6, frameon=False, loc="center")
    else:
        fig.legend(handles, labels, fontsize=5, frameon=False, loc="lower center", ncols=3)
    return fig


def area_figure(ci: pd.DataFrame, metric: str = "auc_accuracy", signals: Sequence[str] | None = None):
    """The causal ranking: area under the deletion (left; lower = the signal's top tokens matter more) and
    insertion (right; higher = better) curves per signal, with 95% CIs; one marker per family, pooled
    (``"all"``) in black. ``ci``: a :func:`vtrlab.analysis.deletion.area_ci` table."""
    d0 = ci[ci["metric"] == metric]
    signals = list(signals or dict.fromkeys(d0["signal"]))
    families = [f for f in dict.fromkeys(d0["family"]) if f != FAMILY_ALL] + [FAMILY_ALL]
    fig, axes = figure("double", height=max(1.8, 0.12 * len(signals) + 0.7), nrows=1, ncols=2, sharey=True)
    y = np.arange(len(signals))
    span = 0.6
    for ax, mode in zip(axes, ("deletion", "insertion")):
        sub = d0[d0["mode"] == mode]
        for j, fam in enumerate(families):
            d = sub[sub["family"] == fam].set_index("signal").reindex(signals)
            if d["mean"].isna().all():
                continue
            off = (j / max(len(families) - 1, 1) - 0.5) * span if len(families) > 1 else 0.0
            color = "k" if fam == FAMILY_ALL else f"C{j % 10}"
            err = np.vstack([d["mean"] - d["low"], d["high"] - d["mean"]])
            ax.errorbar(d["mean"], y + off, xerr=np.nan_to_num(err), fmt="o", ms=2, lw=0.5, color=color, label=fam)
        if "random" in signals:
            r = sub[(sub["family"] == FAMILY_ALL) & (sub["signal"] == "random")]
            if not r.empty:
                ax.axvline(float(r["mean"].iloc[0]), color="0.5", lw=0.6, ls="--")
        ax.set_yticks(y)
        ax.set_yticklabels(signals, fontsize=5)
        ax.set_title(f"{mode} ({'lower' if mode == 'deletion' else 'higher'} is better)", fontsize=7)
        ax.set_xlabel(f"area under the {metric.removeprefix('auc_')} curve")
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=5, frameon=False, loc="lower right")
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
