"""Notebook 03's pure tables (vtrlab.analysis.reconstruction), on small hand-made frames."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from vtrlab.analysis.reconstruction import (
    accuracy_pivot,
    accuracy_tables,
    agreement_summary,
    claim_summary,
    diagnostic_table,
    family_group,
    layer_error_table,
)


def _sweep():
    rows = []

    def add(family, method, ratio, correct):
        for c in correct:
            rows.append({"sample": len(rows), "family": family, "method": method, "ratio": ratio, "correct": c})

    # reading: full 1.0; selector 0.3 -> 1.0, 0.5 -> 1.0; random 0.3 -> 0.5, 0.5 -> 0.5; no image 0.0
    add("reading", "full", 1.0, [True, True])
    add("reading", "no_image", 0.0, [False, False])
    add("reading", "selector", 0.3, [True, True])
    add("reading", "random", 0.3, [True, False])
    add("reading", "selector", 0.5, [True, True])
    add("reading", "random", 0.5, [False, True])
    # scene = color + count: full 1.0 and 0.5, random 0.3: 1.0 and 0.0
    add("color", "full", 1.0, [True, True])
    add("count", "full", 1.0, [True, False])
    add("color", "random", 0.3, [True, True])
    add("count", "random", 0.3, [False, False])
    add("color", "selector", 0.3, [False, True])
    add("count", "selector", 0.3, [False, False])
    return pd.DataFrame(rows)


def test_family_group():
    assert family_group("reading") == "reading"
    assert [family_group(f) for f in ("color", "count", "relation")] == ["scene"] * 3


def test_accuracy_tables_by_group_and_family():
    sweep = _sweep()
    before = sweep.copy()
    acc, acc_family = accuracy_tables(sweep, family_group)
    pd.testing.assert_frame_equal(sweep, before)  # the sweep is not modified
    assert list(acc.columns) == ["group", "method", "ratio", "accuracy", "n"]
    got = {(g, m, r): (a, n) for g, m, r, a, n in acc.itertuples(index=False)}
    assert got == {
        ("reading", "full", 1.0): (1.0, 2),
        ("reading", "no_image", 0.0): (0.0, 2),
        ("reading", "random", 0.3): (0.5, 2),
        ("reading", "random", 0.5): (0.5, 2),
        ("reading", "selector", 0.3): (1.0, 2),
        ("reading", "selector", 0.5): (1.0, 2),
        ("scene", "full", 1.0): (0.75, 4),
        ("scene", "random", 0.3): (0.5, 4),
        ("scene", "selector", 0.3): (0.25, 4),
    }
    assert list(acc_family.columns) == ["family", "method", "ratio", "accuracy"]
    fam = {(f, m, r): a for f, m, r, a in acc_family.itertuples(index=False)}
    assert fam[("count", "full", 1.0)] == 0.5 and fam[("color", "random", 0.3)] == 1.0
    assert fam[("count", "random", 0.3)] == 0.0 and fam[("color", "selector", 0.3)] == 0.5
    assert len(acc_family) == 12  # reading 6 (method, ratio) pairs, color 3, count 3

    # a different grouping: every family its own group
    acc2, _ = accuracy_tables(sweep, lambda f: f)
    assert set(acc2["group"]) == {"reading", "color", "count"}

    pivot = accuracy_pivot(acc)
    assert pivot.loc[("scene", "selector"), 0.3] == 0.25
    assert np.isnan(pivot.loc[("scene", "selector"), 0.5])
    assert list(pivot.columns) == [0.0, 0.3, 0.5, 1.0]


def test_claim_summary_metrics_and_lines():
    acc, acc_family = accuracy_tables(_sweep(), family_group)
    out = claim_summary(acc, acc_family, [0.3, 0.5], n_eval=2, seed=7, families=["reading", "count", "color"])
    m = out["metrics"]
    assert m["reading_full"] == 1.0 and m["scene_full"] == 0.75
    assert m["reading_no_image"] == 0.0 and np.isnan(m["scene_no_image"])
    assert m["reading_selector_0.30"] == 1.0 and m["reading_random_0.30"] == 0.5
    assert m["reading_selector_0.50"] == 1.0 and m["reading_random_0.50"] == 0.5
    assert m["scene_selector_0.30"] == 0.25 and m["scene_random_0.30"] == 0.5 and np.isnan(m["scene_random_0.50"])
    # (a) gaps +0.5 at 30% and 50% -> reproduced; (b) |0.75 - 0.5| = 0.25 > 0.10 -> not
    assert m["claim_reading_selector_beats_random"] is True
    assert m["claim_scene_random30_close_to_full"] is False
    assert m["n_eval_per_family"] == 2 and m["seed"] == 7
    lines = out["lines"]
    assert lines[0] == "reading: full 1.00; selector - random at 30%: +0.50, 50%: +0.50"
    assert lines[1] == "scene: full 0.75, random 30% 0.50 (gap +0.25)"
    assert lines[2] == "(a) selector clearly beats random on reading at <= 50% keep: REPRODUCED"
    assert lines[3] == "(b) random 30% close to full on scene families: NOT reproduced"
    # per-family gaps full - random 30%: count 0.5 - 0.0, color 1.0 - 1.0; order of `families`
    assert lines[4] == "largest scene gap full - random 30%: count (+0.50); per family: {'count': 0.5, 'color': 0.0}"
    assert lines[5].split("\n")[0].split() == ["method", "full", "no_image", "random", "selector"]
    assert len(lines) == 6  # full reading accuracy >= 0.3: no note


def test_claim_summary_without_low_budgets_and_poor_reading():
    acc, acc_family = accuracy_tables(_sweep().query("not (family == 'reading' and method == 'full')"), family_group)
    out = claim_summary(acc, acc_family, [1.0], n_eval=2, seed=0)
    m = out["metrics"]
    assert m["claim_reading_selector_beats_random"] is False  # no budget <= 50%
    assert np.isnan(m["reading_full"]) and np.isnan(m["scene_random_1.00"])
    assert out["lines"][0] == "reading: full nan; selector - random at "
    assert not out["lines"][-1].startswith("note:")  # nan < 0.3 is False


def test_agreement_summary():
    base = {"sample": 0, "family": "reading", "group": "reading", "relevant_fraction": 0.25}
    rows = [
        {**base, "method": "selector", "ratio": np.nan, "metric": "auroc", "value": 0.9},
        {**base, "sample": 1, "method": "selector", "ratio": np.nan, "metric": "auroc", "value": 0.6},
        {**base, "method": "selector", "ratio": 0.5, "metric": "recall", "value": 1.0},
        {**base, "sample": 1, "method": "selector", "ratio": 0.5, "metric": "recall", "value": 0.5},
        {**base, "method": "random", "ratio": 0.5, "metric": "recall", "value": 1 / 3},
    ]
    s = agreement_summary(pd.DataFrame(rows))
    assert s.loc[("reading", "auroc", "selector")].dropna().tolist() == [0.75]
    assert s.loc[("reading", "recall", "selector"), 0.5] == 0.75
    assert s.loc[("reading", "recall", "random"), 0.5] == 0.333


def test_diagnostic_table():
    diag = pd.DataFrame(
        [
            {"family": "color", "plan": "selector", "correct": True, "kept": 3},
            {"family": "color", "plan": "selector", "correct": False, "kept": 4},
            {"family": "count", "plan": "selector", "correct": False, "kept": 3},
            {"family": "color", "plan": "relevant only", "correct": True, "kept": 1},
            {"family": "count", "plan": "relevant only", "correct": True, "kept": 2},
        ]
    )
    t = diagnostic_table(diag)
    assert list(t.index) == ["color", "count", "mean kept"]
    assert t.loc["color", "selector"] == 0.5 and t.loc["count", "selector"] == 0.0
    assert t.loc["color", "relevant only"] == 1.0
    assert t.loc["mean kept", "selector"] == pytest.approx(3.3) and t.loc["mean kept", "relevant only"] == 1.5


def test_layer_error_table():
    data = np.array(
        [
            [[1.0, 3.0, np.nan], [2.0, 2.0, np.nan], [0.5, 1.5, np.nan]],
            [[4.0, np.nan, np.nan], [np.nan, np.nan, np.nan], [1.0, 2.0, 3.0]],
        ]
    )
    lerr = xr.Dataset(
        {
            "vision_error": (("sample", "vision_layer", "token"), data[:, :2]),
            "lm_error": (("sample", "layer", "token"), data[:, 2:]),
        },
        coords={
            "sample": [0, 1],
            "vision_layer": [0, 1],
            "layer": [0],
            "token": [0, 1, 2],
            "row": (("sample", "token"), np.zeros((2, 3), int)),
        },
    )
    t = layer_error_table(lerr)
    assert list(t.columns) == ["sample", "stack", "index", "error"]
    got = {(s, st, i): e for s, st, i, e in t.itertuples(index=False)}
    assert got == {
        (0, "lm", 0): 1.0,
        (0, "vision", 0): 2.0,
        (0, "vision", 1): 2.0,
        (1, "lm", 0): 2.0,
        (1, "vision", 0): 4.0,
    }  # all-NaN (1, vision.1) is dropped
    assert t["index"].dtype.kind == "i"
    with pytest.raises(ValueError, match="no vision_error or lm_error"):
        layer_error_table(xr.Dataset({"x": ("sample", [1.0])}))


def test_kept_sets_top_k_and_share_of_relevant_kept():
    from vtrlab.analysis.reconstruction import kept_sets

    scores = [np.array([0.9, 0.1, 0.5, 0.3]), np.array([1.0, 2.0, 3.0, 4.0, 5.0])]
    relevant = [np.array([True, True, False, False]), np.array([False, False, False, True, True])]
    k = kept_sets(scores, relevant, [0.5, 0.2])
    assert list(k) == [0.5, 0.2]
    assert k[0.5][0]["keep"].tolist() == [True, False, True, False] and k[0.5][0]["relevant_kept"] == 0.5
    assert k[0.2][1]["keep"].tolist() == [False, False, False, False, True] and k[0.2][1]["relevant_kept"] == 0.5
