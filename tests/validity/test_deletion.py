"""Deletion / insertion curves: keep masks by brute force, endpoints equal the full and no-image answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vtrlab.analysis import deletion as dl


@pytest.mark.parametrize("seed", range(6))
def test_keep_mask_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    s = rng.integers(0, 4, n).astype(float)  # many ties
    for f in (0.0, 0.13, 0.5, 1.0):
        k = round(f * n)
        dele, ins = dl.keep_mask(s, f, "deletion", seed=seed), dl.keep_mask(s, f, "insertion", seed=seed)
        assert (dele == ~ins).all() and ins.sum() == k
        if 0 < k < n:  # every inserted token scores >= every other token
            assert s[ins].min() >= s[~ins].max()
    # ties are not broken by position: over seeds, the first of tied tokens is not always picked
    flat = np.zeros(20)
    picks = {int(np.flatnonzero(dl.keep_mask(flat, 0.05, "insertion", seed=i))[0]) for i in range(20)}
    assert len(picks) > 3
    with pytest.raises(ValueError, match="mode="):
        dl.keep_mask(s, 0.5, "delete")
    with pytest.raises(ValueError, match="fraction="):
        dl.keep_mask(s, 1.5, "deletion")
    with pytest.raises(ValueError, match="NaN"):
        dl.keep_mask(np.r_[s, np.nan], 0.5, "deletion")


def test_curve_areas_trapezoid_reference():
    rows = []
    for sample in range(2):
        for f, c, lp in ((0.0, 1, -0.1), (0.25, 1, -0.5), (0.5, 0, -2.0), (1.0, 0, -4.0)):
            rows.append(
                {
                    "sample": sample,
                    "family": "color",
                    "signal": "s",
                    "mode": "deletion",
                    "fraction": f,
                    "correct": bool(c),
                    "logprob": lp + sample,
                    "out_of_distribution": False,
                }
            )
    curves = pd.DataFrame(rows)
    a = dl.curve_areas(curves)
    # accuracy 1, 1, 0, 0 at 0, .25, .5, 1: 0.25 + 0.125 = 0.375
    assert a["auc_accuracy"].tolist() == pytest.approx([0.375, 0.375])
    lp = 0.25 * (-0.1 - 0.5) / 2 + 0.25 * (-0.5 - 2.0) / 2 + 0.5 * (-2.0 - 4.0) / 2
    assert a["auc_logprob"].tolist() == pytest.approx([lp, lp + 1])
    t = dl.area_table(curves, n_boot=50)
    assert t[t.metric == "auc_accuracy"]["mean"].iloc[0] == pytest.approx(0.375)
    ct = dl.curve_table(curves, n_boot=50)
    assert set(ct["metric"]) == {"accuracy", "logprob"} and "out_of_distribution" in ct


@pytest.fixture(scope="module")
def organism_and_data():
    import vtrlab as vl
    from vtrlab.data.sources import load_data

    vlm = vl.load("organism", device="cpu")
    data = load_data("organism", n_samples=3, seed=0)
    return vlm, data


def test_endpoints_equal_full_and_no_image_answers(organism_and_data):
    import torch

    from vtrlab.analysis.reduction_sweep import _gold_ids
    from vtrlab.metrics.fidelity import answer_logprob
    from vtrlab.reduce import answer, logits

    vlm, data = organism_and_data
    batch = vlm.prepare([s.image for s in data], [s.question for s in data])
    n = [lay.n_image_tokens for lay in batch.layouts]
    signals = {"random": dl.random_signal(n, seed=1), "truth": dl.ground_truth_signal(batch.layouts, data)}
    curves = dl.deletion_curves(vlm, data, signals, fractions=(0.0, 0.02, 1.0), batch_size=2)
    assert len(curves) == 2 * 2 * 3 * len(data)
    full = answer(vlm, batch, max_new_tokens=6)
    none = answer(vlm, batch, keep=[np.zeros(k, bool) for k in n], max_new_tokens=6)
    gold = _gold_ids(vlm, [s.answer for s in data])
    targets = torch.zeros(len(data), max(map(len, gold)), dtype=torch.long)
    for i, g in enumerate(gold):
        targets[i, : len(g)] = torch.tensor(g)
    red = logits(vlm, batch, append=gold)
    full_lp = answer_logprob(red.appended, targets, red.appended_mask).numpy()
    for (mode, f), expected, lp in (
        (("deletion", 0.0), full, full_lp),
        (("insertion", 1.0), full, full_lp),
        (("deletion", 1.0), none, None),
        (("insertion", 0.0), none, None),
    ):
        for sig in signals:
            d = curves[(curves["mode"] == mode) & (curves["fraction"] == f) & (curves["signal"] == sig)]
            assert d.sort_values("sample")["prediction"].tolist() == expected, (mode, f, sig)
            if lp is not None:
                assert d.sort_values("sample")["logprob"].to_numpy() == pytest.approx(lp, abs=1e-4)
    # very few kept tokens are flagged out of distribution; the endpoints are not
    small = curves[(curves["mode"] == "insertion") & (curves["fraction"] == 0.02)]
    assert small["out_of_distribution"].all() and (small["kept"] == [round(0.02 * k) for k in n] * 2).all()
    assert not curves[curves["fraction"].isin([0.0, 1.0])]["out_of_distribution"].any()


def test_bad_signals_are_refused(organism_and_data):
    vlm, data = organism_and_data
    with pytest.raises(ValueError, match="need one per sample"):
        dl.deletion_curves(vlm, data, {"s": [np.zeros(3)]})
    with pytest.raises(ValueError, match=r"signal 's', sample 0: \(3,\) scores"):
        dl.deletion_curves(vlm, data, {"s": [np.zeros(3)] * len(data)}, fractions=(0.5,))


def test_teacher_forced_accuracy_is_greedy_decoding_beginning_with_the_answer(organism_and_data):
    from vtrlab.analysis.reduction_sweep import _gold_ids
    from vtrlab.reduce import generate_ids

    vlm, data = organism_and_data
    batch = vlm.prepare([s.image for s in data], [s.question for s in data])
    n = [lay.n_image_tokens for lay in batch.layouts]
    sig = {"random": dl.random_signal(n, seed=2)}
    fr = (0.0, 0.5, 0.9)
    tf = dl.deletion_curves(vlm, data, sig, fractions=fr, modes=("deletion",), accuracy="teacher_forced", seed=3)
    gr = dl.deletion_curves(vlm, data, sig, fractions=fr, modes=("deletion",), seed=3)
    pd.testing.assert_series_equal(tf["logprob"], gr["logprob"])  # same forward for the log-prob
    gold = _gold_ids(vlm, [s.answer for s in data])
    for f in fr:
        keep = [dl.keep_mask(s, f, "deletion", seed=[3, i]) for i, s in enumerate(sig["random"])]
        ids = generate_ids(vlm, batch, keep=keep, max_new_tokens=max(map(len, gold)))
        ids = [list(map(int, x)) for x in ids]
        want = [x[: len(g)] == g for x, g in zip(ids, gold)]
        assert tf[tf["fraction"] == f].sort_values("sample")["correct"].tolist() == want, f
    with pytest.raises(ValueError, match="accuracy="):
        dl.deletion_curves(vlm, data, sig, accuracy="argmax")
