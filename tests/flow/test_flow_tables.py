"""vtrlab.analysis.flow: pure tables on frames whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vtrlab.analysis import flow as fl


def _tokens():
    rng = np.random.default_rng(0)
    rows = []
    for sample in range(6):
        rel = np.zeros(16, dtype=bool)
        rel[:3] = True
        obj = rel.copy()
        obj[3:6] = True  # three distractor objects
        noise = rng.random(16)
        for signal, score in {
            "perfect": rel.astype(float) + 0.01 * noise,  # relevant above everything
            "objectness": obj.astype(float) + 0.01 * noise * ~rel,  # objects, distractors slightly above
            "uniform": np.full(16, 1 / 16),
        }.items():
            rows.append(
                pd.DataFrame(
                    {
                        "signal": signal,
                        "sample": sample,
                        "family": "color" if sample < 3 else "shape",
                        "layer": 0,
                        "score": score,
                        "relevant": rel,
                        "object": obj,
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def test_scores_vs_truth_controls():
    per = fl.token_scores_vs_truth(_tokens())
    by = per.groupby("signal")
    assert np.allclose(by.get_group("perfect")["auroc"], 1.0)
    assert np.allclose(by.get_group("perfect")["auroc_objects"], 1.0)
    # an objectness map finds objects (AUROC high) but does not rank relevant objects above distractors
    # relevant tokens rank above the 10 background tokens, below the 3 distractors: AUROC 10/13
    assert np.allclose(by.get_group("objectness")["auroc"], 10 / 13)
    assert np.allclose(by.get_group("objectness")["auroc_objects"], 0.0)
    assert np.allclose(by.get_group("uniform")["auroc"], 0.5)
    assert np.allclose(by.get_group("uniform")["lift"], 1.0)  # lift over uniform
    # perfect: the relevant tokens hold ~all the mass: mean on relevant / mean overall ~ 16 / 3
    assert np.allclose(by.get_group("perfect")["lift"], 16 / 3, rtol=0.05)
    # objectness baseline: 3 relevant among 6 object tokens of 16 -> AUROC = (1 + 10/13) / 2
    assert np.allclose(per["objectness_auroc"], (1 + 10 / 13) / 2)
    summ = fl.truth_summary(per)
    assert set(summ["family"]) == {"color", "shape"}
    assert (summ["auroc_lo"] <= summ["auroc"] + 1e-12).all() and (summ["auroc"] <= summ["auroc_hi"] + 1e-12).all()


def test_sweep_summary_and_headline_prose():
    sweep = pd.DataFrame(
        {
            "edge": ["image→last"] * 6 + ["question→last"] * 6,
            "window_start": [0, 0, 0, 1, 1, 1] * 2,
            "sample": [0, 1, 2] * 4,
            "family": "color",
            "relative_change": [-0.9, -0.8, -0.7, -0.1, 0.0, 0.1, 0.0, 0.0, 0.0, -0.2, -0.2, -0.2],
            "correct": [False, False, True, True, True, True] + [True] * 6,
        }
    )
    s = fl.sweep_summary(sweep, by_family=False)
    row = s[(s["edge"] == "image→last") & (s["window_start"] == 0)].iloc[0]
    assert row["relative_change"] == pytest.approx(-0.8) and row["correct"] == pytest.approx(1 / 3)
    assert row["relative_change_lo"] <= -0.8 <= row["relative_change_hi"]
    per = fl.token_scores_vs_truth(_tokens())
    m = fl.headline(s, fl.truth_summary(per, by_family=False))
    assert m["knockout/image→last/worst_window_start"] == 0
    assert m["knockout/question→last/worst_window_start"] == 1
    assert m["truth/perfect/auroc"] == pytest.approx(1.0)
    lines = fl.summary_lines(m)
    assert any("-80.0%" in line and "image→last" in line for line in lines)


def test_bad_frames():
    with pytest.raises(ValueError, match="columns \\['object'\\] not in the token frame"):
        fl.token_scores_vs_truth(_tokens().drop(columns="object"))
    with pytest.raises(ValueError, match="not in the frame"):
        fl.sweep_summary(pd.DataFrame({"edge": [], "window_start": [], "family": [], "correct": []}))
