"""Figures of notebook 05 (findings): one small figure per claim, drawn only from the claim's record.

Each function takes a record of :mod:`vtrlab.analysis.findings` (its ``data`` and ``verdict``) and returns
a single-column figure; :func:`claim_figure` picks the right one by ``record["claim"]``. Error bars and bands
are the records' bootstrap 95% CIs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vtrlab.plots.style import figure


def _title(ax, record: Mapping) -> None:
    ax.set_title(f"{record['source']}: {record['verdict']}", fontsize=6)


def _band(ax, x, stats, label: str, style: str = "o-", **kw):
    s = np.asarray([[np.nan if v is None else v for v in t] for t in stats], dtype=float)
    (line,) = ax.plot(x, s[:, 0], style, ms=2.5, lw=1, label=label, **kw)
    ax.fill_between(x, s[:, 1], s[:, 2], color=line.get_color(), alpha=0.2, lw=0)
    return line


def _bars(ax, labels, stats, color=None):
    s = np.asarray([[np.nan if v is None else v for v in t] for t in stats], dtype=float)
    x = np.arange(len(labels))
    err = np.abs(np.stack([s[:, 0] - s[:, 1], s[:, 2] - s[:, 0]]))
    ax.bar(x, s[:, 0], yerr=np.nan_to_num(err), color=color, capsize=2, error_kw={"lw": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=5)


def fastv_figure(record: Mapping):
    """Share of the last row's attention on image tokens (and on the first token) per LM layer."""
    d = record["data"]
    fig, ax = figure("single", height=2.0)
    _band(ax, d["layers"], d["image_share"], "image tokens")
    _band(ax, d["layers"], d["first_share"], "first token", "s--")
    ax.axhline(d["uniform_image_share"], c="0.5", ls=":", lw=0.8, label="uniform (image share of positions)")
    ax.axvspan(-0.5, d["shallow"] - 0.5, color="0.9", lw=0, zorder=0)
    ax.set(xlabel="LM layer", ylabel="share of last row's attention", ylim=(-0.02, 1.02))
    ax.legend(fontsize=5)
    _title(ax, record)
    return fig


def feather_figure(record: Mapping):
    """Spearman of the last row's attention with the image tokens' raster order per layer, and FastV's kept set."""
    d = record["data"]
    fig, ax = figure("single", height=2.0)
    _band(ax, d["layers"], d["spearman"], "attention vs raster index")
    k = [np.nan if v is None else v for v in d["fastv_kept_spearman"]]
    ax.errorbar(
        [d["fastv_layer"]],
        [k[0]],
        yerr=[[k[0] - k[1]], [k[2] - k[0]]],
        fmt="D",
        ms=3,
        c="C3",
        label="FastV's kept set",
        capsize=2,
    )
    ax.axhline(0, c="0.5", lw=0.8, ls=":")
    ax.set(xlabel="LM layer", ylabel="Spearman (+: favours late tokens)")
    ax.legend(fontsize=5)
    _title(ax, record)
    return fig


def zhang_figure(record: Mapping):
    """Mean drop of p(answer) when an edge is cut in each window of layers."""
    d = record["data"]
    fig, ax = figure("single", height=2.0)
    for name, stats in zip(d["edges"], d["effect"]):
        _band(ax, d["window_mid"], stats, f"cut {name}")
    ax.axhline(0, c="0.5", lw=0.8, ls=":")
    ax.set(xlabel=f"LM layer (centre of a {d['window']}-layer window)", ylabel="drop of p(answer)")
    ax.legend(fontsize=5)
    _title(ax, record)
    return fig


def neo_figure(record: Mapping):
    """Accuracy with the object's tokens vs matched random tokens removed; logit-lens hit rate per layer."""
    d = record["data"]
    fig, (a1, a2) = figure("single", height=2.0, ncols=2)
    _bars(a1, list(d["accuracy"]), list(d["accuracy"].values()), color="C0")
    a1.set(ylabel="accuracy", ylim=(0, 1.05))
    _band(a2, d["layers"], d["hit_rate"], f"top-{d['top_k']} at object")
    a2.axvspan(d["late_layers"][0] - 0.5, d["late_layers"][-1] + 0.5, color="0.9", lw=0, zorder=0)
    a2.set(xlabel="LM layer", ylabel="gold token decoded", ylim=(-0.02, 1.02))
    _title(a1, record)
    return fig


def kaduri_figure(record: Mapping):
    """First-answer-token accuracy: plain, image -> last cut, image -> all text cut (blind)."""
    d = record["data"]
    fig, ax = figure("single", height=2.0)
    _bars(ax, list(d["accuracy"]), list(d["accuracy"].values()), color="C1")
    ax.set(ylabel="first answer token accuracy", ylim=(0, 1.05))
    _title(ax, record)
    return fig


def wen_figure(record: Mapping):
    """Accuracy per method at the claim's keep ratio (random highlighted), and relative drop per family."""
    d = record["data"]
    fig, (a1, a2) = figure("single", height=2.2, ncols=2)
    colors = ["0.5" if m == "random" else "k" if m == "full" else "C0" for m in d["methods"]]
    _bars(a1, d["methods"], d["accuracy"])
    for patch, c in zip(a1.patches, colors):
        patch.set_color(c)
    a1.set(ylabel=f"accuracy ({d['budget']:.0%} keep)", ylim=(0, 1.05))
    if d.get("drop"):
        _bars(a2, d["families"], d["drop"], color="C2")
    a2.set(ylabel="relative accuracy drop")
    _title(a1, record)
    return fig


def when_less_figure(record: Mapping):
    """Reading: selector vs random per keep ratio; scenes: full vs random at the scene keep ratio."""
    d = record["data"]
    fig, (a1, a2) = figure("single", height=2.0, ncols=2)
    if "reading" in d:
        x = [b * 100 for b in d["reading_budgets"]]
        for m in ("selector", "random"):
            _band(a1, x, d["reading"][m], m)
        a1.legend(fontsize=5)
    a1.set(xlabel="kept (%)", ylabel="reading accuracy", ylim=(-0.02, 1.05))
    if "scenes" in d:
        fams = list(d["scenes"])
        x = np.arange(len(fams))
        for k, (key, off) in enumerate((("full", -0.2), ("random", 0.2))):
            s = np.asarray([[np.nan if v is None else v for v in d["scenes"][f][key]] for f in fams], dtype=float)
            err = np.abs(np.stack([s[:, 0] - s[:, 1], s[:, 2] - s[:, 0]]))
            label = key if key == "full" else f"random {d['scene_budget']:.0%}"
            a2.bar(
                x + off,
                s[:, 0],
                0.4,
                yerr=np.nan_to_num(err),
                label=label,
                color=f"C{k}",
                capsize=2,
                error_kw={"lw": 0.8},
            )
        a2.set_xticks(x)
        a2.set_xticklabels(fams, rotation=30, ha="right", fontsize=5)
        a2.legend(fontsize=5)
    a2.set(ylabel="accuracy", ylim=(0, 1.05))
    _title(a1, record)
    return fig


def gsearch_figure(record: Mapping):
    """Layer x layer mean Spearman of the image-token rankings by attention."""
    from vtrlab.plots.curves import layer_matrix

    m = np.asarray([[np.nan if v is None else v for v in row] for row in record["data"]["matrix"]], dtype=float)
    fig, ax = figure("single", height=2.6)
    layer_matrix(ax, m, labels=list(range(m.shape[0])), xlabel="LM layer", ylabel="LM layer", vmin=-1, vmax=1)
    _title(ax, record)
    return fig


def darcet_figure(record: Mapping):
    """Distribution of tower token norm / picture median, with the high-norm threshold."""
    d = record["data"]
    fig, ax = figure("single", height=2.0)
    counts = np.asarray(d["ratio_hist"], dtype=float)
    lo, hi = d["hist_range"]
    edges = np.linspace(lo, hi, counts.size + 1)
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(d["factor"], c="C3", ls="--", lw=0.8, label=f"high-norm: > {d['factor']:g}x median")
    ax.set(xlabel="token norm / median norm of its picture (all tower layers)", ylabel="tokens", yscale="log")
    ax.legend(fontsize=5)
    _title(ax, record)
    return fig


def haurum_figure(record: Mapping):
    """Per keep ratio: each method's kept-set Jaccard with the most accurate method vs its accuracy."""
    pts = record["data"]["points"]
    fig, ax = figure("single", height=2.2)
    for k, (budget, p) in enumerate(sorted(pts.items())):
        ax.scatter(p["jaccard"], p["accuracy"], s=8, c=f"C{k}", label=f"{float(budget):.0%} keep (best: {p['best']})")
        for x, y, lab in zip(p["jaccard"], p["accuracy"], p["labels"]):
            ax.annotate(lab, (x, y), fontsize=4, xytext=(2, 1), textcoords="offset points")
    ax.set(xlabel="Jaccard with the best method's kept set", ylabel="accuracy")
    ax.legend(fontsize=5)
    _title(ax, record)
    return fig


FIGURES = {
    "fastv": fastv_figure,
    "feather": feather_figure,
    "zhang": zhang_figure,
    "neo": neo_figure,
    "kaduri": kaduri_figure,
    "wen": wen_figure,
    "when_less": when_less_figure,
    "gsearch": gsearch_figure,
    "darcet": darcet_figure,
    "haurum": haurum_figure,
}


def claim_figure(record: Mapping):
    """The figure of one claim's record (by ``record["claim"]``); None when the record has no data to draw."""
    if record["claim"] not in FIGURES:
        raise ValueError(f"claim {record['claim']!r} has no figure; known: {', '.join(FIGURES)}")
    if not record.get("data"):
        return None
    return FIGURES[record["claim"]](record)
