"""Figures of the validity checks draw the tables they are given (smoke: right panels, no error)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import vtrlab.plots.validity as vpv


def _ci_rows(keys, metrics, **cols):
    rows = []
    for key in keys:
        for m in metrics:
            rows.append({**dict(zip(cols["names"], key)), "metric": m, "mean": 0.6, "low": 0.5, "high": 0.7, "n": 4})
    return pd.DataFrame(rows)


def test_controls_per_layer_panels_and_agnostic_shading():
    ci = _ci_rows(
        [(f, lay) for f in ("color", "all") for lay in range(3)],
        ["auroc", "object_auroc", "objectness_auroc"],
        names=["family", "layer"],
    )
    fig = vpv.controls_per_layer(ci, {0: True, 1: False, 2: False})
    axes = [a for a in fig.axes if a.axison]
    assert len(axes) == 2 and [a.get_title() for a in axes] == ["color (n=4)", "all (n=4)"]
    assert any(p.get_label() == "question-agnostic layer" for p in axes[0].patches)
    plt.close(fig)


def test_deletion_and_randomization_figures():
    curves = _ci_rows(
        [(s, m, f) for s in ("a", "b") for m in ("deletion", "insertion") for f in (0, 0.05, 1.0)],
        ["accuracy"],
        names=["signal", "mode", "fraction"],
    )
    curves["out_of_distribution"] = curves["fraction"] == 0.05
    fig = vpv.deletion_curves_figure(curves)
    assert [a.get_title() for a in fig.axes] == ["deletion", "insertion"]
    plt.close(fig)
    rz = _ci_rows(
        [(i, n, "lm_attn.0") for i, n in enumerate(["trained", "lm.1", "lm.1-0"])],
        ["spearman", "auroc"],
        names=["step", "step_name", "signal"],
    )
    fig = vpv.randomization_figure(rz)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["trained", "lm.1", "lm.1-0"]
    plt.close(fig)
    acc = _ci_rows(
        [(f, m, r) for f in ("color",) for m in ("selector", "random") for r in (0.3, 0.5)],
        ["x"],
        names=["family", "method", "ratio"],
    )
    full = pd.DataFrame([{"family": "color", "method": "full", "ratio": 1.0, "mean": 1.0, "low": 1, "high": 1, "n": 4}])
    fig = vpv.accuracy_per_family(pd.concat([acc, full], ignore_index=True))
    assert np.isclose(fig.axes[0].lines[-1].get_ydata()[0], 1.0)
    plt.close(fig)


def test_signal_controls_and_area_figures():
    ci = _ci_rows(
        [(f, s) for f in ("color", "all") for s in ("lm_attn.1", "random")],
        ["auroc", "object_auroc", "objectness_auroc"],
        names=["family", "signal"],
    )
    fig = vpv.signal_controls_figure(ci)
    axes = [a for a in fig.axes if a.axison]
    assert [a.get_title() for a in axes] == ["color (n=4)", "all (n=4)"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["lm_attn.1", "random"]
    assert any(line.get_label().startswith("objectness") for line in axes[0].lines)  # the baseline beside the AUROC
    plt.close(fig)
    areas = _ci_rows(
        [(f, s, m) for f in ("color", "all") for s in ("lm_attn.1", "random") for m in ("deletion", "insertion")],
        ["auc_accuracy"],
        names=["family", "signal", "mode"],
    )
    fig = vpv.area_figure(areas)
    assert [a.get_title() for a in fig.axes][:2] == ["deletion (lower is better)", "insertion (higher is better)"]
    plt.close(fig)
    rz = _ci_rows(
        [(i, n, "lm_attn.0") for i, n in enumerate(["trained", "lm.1"])],
        ["spearman", "auroc", "object_auroc"],
        names=["step", "step_name", "signal"],
    )
    fig = vpv.randomization_figure(rz, baseline=(0.9, 0.85, 0.95))
    assert len(fig.axes) == 3 and any(line.get_label() == "objectness baseline" for line in fig.axes[1].lines)
    plt.close(fig)
