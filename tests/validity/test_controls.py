"""Controls beside relevance scores: brute-force float64 references on fresh random inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from vtrlab.analysis import controls as actl
from vtrlab.metrics import controls as ctl


def _auroc_pairs(s, pos):
    """P(score of a positive > score of a negative) + ½ P(tie), by enumerating every pair."""
    p, n = s[pos], s[~pos]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(p, n))
    return total / (len(p) * len(n))


def _random_case(rng, n=40):
    s = rng.integers(0, 6, n).astype(float) + rng.random(n) * (rng.random() < 0.5)  # ties half the time
    obj = rng.random(n) < 0.5
    rel = obj & (rng.random(n) < 0.4)
    return s, rel, obj


@pytest.mark.parametrize("seed", range(8))
def test_object_auroc_matches_pairwise_count_over_object_tokens(seed):
    rng = np.random.default_rng(seed)
    s, rel, obj = _random_case(rng)
    target, distractor = rel & obj, obj & ~rel
    got = float(ctl.object_auroc(s, rel, obj))
    if target.any() and distractor.any():
        keep = target | distractor
        assert got == pytest.approx(_auroc_pairs(s[keep], target[keep]), abs=1e-12)
    else:
        assert np.isnan(got)


def test_object_auroc_ignores_background_and_broadcasts():
    rng = np.random.default_rng(1)
    s, rel, obj = _random_case(rng, 30)
    rel[0], obj[0], rel[1], obj[1] = True, True, False, True  # at least one target and one distractor
    s2 = s.copy()
    s2[~obj] = rng.normal(size=(~obj).sum()) * 100  # background scores cannot matter
    assert ctl.object_auroc(s, rel, obj) == ctl.object_auroc(s2, rel, obj)
    stacked = ctl.object_auroc(np.stack([s, -s]), rel, obj)
    assert stacked.shape == (2,)
    assert stacked[0] == pytest.approx(1 - stacked[1], abs=1e-12)
    assert np.isnan(ctl.object_auroc(s, np.zeros_like(rel), obj))  # no target
    assert np.isnan(ctl.object_auroc(s, obj, obj))  # no distractor


@pytest.mark.parametrize("seed", range(5))
def test_objectness_auroc_is_the_auroc_of_the_binary_object_map(seed):
    rng = np.random.default_rng(seed)
    _, rel, obj = _random_case(rng)
    rel[0] = obj[0] = True
    obj[1], rel[1] = False, False
    assert float(ctl.objectness_auroc(obj, rel)) == pytest.approx(_auroc_pairs(obj.astype(float), rel), abs=1e-12)
    # all relevant tokens are objects: P(neg is background) + ½ P(neg is a distractor object)
    neg = ~rel
    expected = ((~obj & neg).sum() + 0.5 * (obj & neg).sum()) / neg.sum()
    assert float(ctl.objectness_auroc(obj, rel)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_relevant_lift_reference(seed):
    rng = np.random.default_rng(seed)
    s = rng.random(50)
    rel = rng.random(50) < 0.2
    rel[0], rel[1] = True, False
    expected = (s[rel].sum() / s.sum()) / (rel.sum() / 50)
    assert float(ctl.relevant_lift(s, rel)) == pytest.approx(expected, rel=1e-12)
    assert float(ctl.relevant_lift(np.ones(50), rel)) == pytest.approx(1.0)
    assert np.isnan(ctl.relevant_lift(s, np.zeros(50, bool)))
    with pytest.raises(ValueError, match="non-negative"):
        ctl.relevant_lift(-s, rel)


def test_bootstrap_ci_reference_and_determinism():
    rng = np.random.default_rng(0)
    v = rng.normal(size=37)
    v[3] = np.nan  # NaN entries are left out
    mean, lo, hi = ctl.bootstrap_ci(v, n_boot=500, seed=7)
    finite = v[np.isfinite(v)]
    r = np.random.default_rng(7)
    idx = r.integers(0, finite.size, size=(500, finite.size))
    stats = np.array([finite[i].mean() for i in idx])  # one loop, one resample at a time
    assert mean == pytest.approx(finite.mean())
    assert (lo, hi) == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])), abs=1e-12)
    assert ctl.bootstrap_ci(v, n_boot=500, seed=7) == (mean, lo, hi)
    assert lo < mean < hi
    m2, lo2, hi2 = ctl.bootstrap_ci(finite, n_boot=500, seed=7, statistic=np.median)
    assert m2 == pytest.approx(np.median(finite)) and lo2 <= m2 <= hi2
    assert np.isnan(ctl.bootstrap_ci([1.0], n_boot=10)[1])
    with pytest.raises(ValueError, match="ci="):
        ctl.bootstrap_ci(v, ci=95)


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(3)
    hits = 0
    for i in range(200):
        lo, hi = ctl.bootstrap_ci(rng.normal(size=60), n_boot=400, seed=i)[1:]
        hits += lo <= 0 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_ci_table_groups_and_columns():
    df = pd.DataFrame({"family": ["a"] * 5 + ["b"] * 5, "layer": [0] * 10, "x": np.arange(10.0), "y": [np.nan] * 10})
    t = ctl.ci_table(df, ["family", "layer"], ["x", "y"], n_boot=100)
    assert list(t.columns) == ["family", "layer", "metric", "mean", "low", "high", "n"]
    row = t[(t.family == "b") & (t.metric == "x")].iloc[0]
    assert row["mean"] == 7.0 and row["n"] == 5 and row["low"] <= 7 <= row["high"]
    assert np.isnan(t[t.metric == "y"]["mean"]).all()
    with pytest.raises(ValueError, match="not in the table"):
        ctl.ci_table(df, "family", "z")


def test_question_agnostic_from_positions():
    image, question = np.arange(5, 21), np.arange(22, 30)
    last = [33]
    # question after the image: layer 0 from a template token is agnostic, layer 1 reads the question
    assert ctl.question_agnostic(0, last, image, question)
    assert not ctl.question_agnostic(1, last, image, question)
    # a question token as query row depends on it at layer 0 already
    assert not ctl.question_agnostic(0, [25], image, question)
    # question before the query but after... a row before the question never sees it (causal)
    assert ctl.question_agnostic(3, [4], image, question)
    # question before the image: image keys read it from layer 1 on
    assert not ctl.question_agnostic(1, [2], image + 20, np.arange(0, 3))
    assert ctl.question_agnostic(5, last, image, [])
    with pytest.raises(ValueError, match="layer"):
        ctl.question_agnostic(-1, last, image, question)


def test_controlled_agreement_table_matches_metrics():
    rng = np.random.default_rng(5)
    rows, cols = 4, 4
    frames = []
    truth, objects = {}, {}
    for sample in range(3):
        obj = rng.random((rows, cols)) < 0.5
        rel = obj & (rng.random((rows, cols)) < 0.5)
        obj[0, 0] = rel[0, 0] = True
        obj[0, 1], rel[0, 1] = True, False
        truth[sample], objects[sample] = rel, obj
        for layer in range(2):
            r, c = np.divmod(np.arange(rows * cols), cols)
            frames.append(
                pd.DataFrame(
                    {
                        "sample": sample,
                        "layer": layer,
                        "image": 0,
                        "tile": 0,
                        "row": r,
                        "col": c,
                        "score": rng.random(rows * cols),
                    }
                )
            )
    scores = pd.concat(frames, ignore_index=True)
    t = actl.controlled_agreement(scores, truth, objects, families=["x", "y", "x"])
    assert len(t) == 6 and set(actl.METRICS) <= set(t.columns)
    one = scores[(scores["sample"] == 1) & (scores["layer"] == 1)]
    s = one["score"].to_numpy()
    rel, obj = truth[1].ravel(), objects[1].ravel()
    row = t[(t["sample"] == 1) & (t["layer"] == 1)].iloc[0]
    assert row["auroc"] == pytest.approx(_auroc_pairs(s, rel))
    keep = obj
    assert row["object_auroc"] == pytest.approx(_auroc_pairs(s[keep], rel[keep]))
    assert row["objectness_auroc"] == pytest.approx(_auroc_pairs(obj.astype(float), rel))
    assert row["family"] == "y"
    ci = actl.controls_ci(t, n_boot=50)
    assert set(ci["family"]) == {"x", "y", "all"}
    m = actl.controls_summary(ci, agnostic={0: True, 1: False})
    assert m["lm_question_agnostic_layers"] == [0]
    assert m["lm_best_object_layer/all"] == 1  # agnostic layers are never the "best question-aware" layer
    lines = actl.controls_prose(m)
    assert any(line.startswith("  all (n=3)") for line in lines)
    assert f"{m['lm_best_auroc/all']:.3f}" in "".join(lines)


def test_accuracy_ci_metrics_and_prose_state_the_table():
    rng = np.random.default_rng(2)
    rows = []
    for fam in ("color", "reading"):
        for s in range(20):
            rows += [
                {"sample": s, "family": fam, "method": "full", "ratio": 1.0, "correct": True},
                {"sample": s, "family": fam, "method": "no_image", "ratio": 0.0, "correct": False},
            ]
            for m in ("selector", "random"):
                rows.append(
                    {"sample": s, "family": fam, "method": m, "ratio": 0.3, "correct": bool(rng.random() < 0.6)}
                )
    sweep = pd.DataFrame(rows)
    ci = actl.accuracy_ci(sweep, n_boot=200)
    sel = sweep[(sweep.family == "reading") & (sweep.method == "selector")]["correct"].mean()
    row = ci[(ci.family == "reading") & (ci.method == "selector")].iloc[0]
    assert row["mean"] == pytest.approx(sel) and row["low"] <= sel <= row["high"] and row["n"] == 20
    m = actl.accuracy_metrics(ci)
    assert m["acc/color/full/1.00"] == 1.0 and m["acc/color/no_image/0.00_n"] == 20
    lines = actl.accuracy_prose(m, [0.3, 1.0])
    assert len(lines) == 2 and lines[1].startswith("reading (n=20): full 1.00")
    assert f"selector {m['acc/reading/selector/0.30']:.2f}" in lines[1]


def test_token_controls_skips_samples_without_contrast():
    s = [np.arange(6.0), np.arange(6.0), np.arange(6.0)]
    rel = [np.array([0, 0, 0, 0, 1, 1], bool), None, np.ones(6, bool)]
    obj = [np.array([0, 0, 1, 1, 1, 1], bool), None, None]
    t = actl.token_controls(s, rel, obj, ["a", "b", "c"], signal="sel", start=10)
    assert list(t["sample"]) == [10]
    assert t.iloc[0]["auroc"] == 1.0 and t.iloc[0]["object_auroc"] == 1.0
    assert t.iloc[0]["objectness_auroc"] == pytest.approx((2 + 0.5 * 2) / 4)


def test_signal_controls_is_token_controls_per_signal():
    rng = np.random.default_rng(4)
    n = 30
    rel = [np.arange(n) < 5, None, np.arange(n) % 7 == 0]
    obj = [np.arange(n) < 12, None, np.arange(n) % 7 < 3]
    fams = ["a", "b", "a"]
    sigs = {"x": [rng.random(n) for _ in range(3)], "gt": [r if r is None else r.astype(float) for r in rel]}
    t = actl.signal_controls(sigs, rel, obj, fams)
    ref = actl.token_controls(sigs["x"], rel, obj, fams, signal="x")
    pd.testing.assert_frame_equal(t[t.signal == "x"].reset_index(drop=True), ref)
    assert t[t.signal == "gt"]["sample"].tolist() == [0, 2] and (t[t.signal == "gt"]["auroc"] == 1.0).all()
    ci = actl.signal_controls_ci(t, n_boot=20)
    summary = actl.signal_controls_summary(ci)
    assert summary["signal_auroc/all/gt"] == 1.0
    lines = actl.signal_controls_prose(summary)
    assert lines[1].startswith("  gt: AUROC 1.00")
