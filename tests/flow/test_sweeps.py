"""Knockout sweeps: each (edge, window) cell equals vl.knockout with that cut (itself tested against a float64
eager reference), on every tiny family; windows; bad input."""

from __future__ import annotations

import numpy as np
import pytest

from vtrlab.flow import knockout, knockout_sweep, windows


def test_windows():
    assert windows(5, 2) == [(0, 2), (1, 3), (2, 4), (3, 5)]
    assert windows(5, 2, stride=2) == [(0, 2), (2, 4)]
    assert windows(3, 9) == [(0, 3)]  # a window wider than the LM is the whole LM
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="window="):
            windows(5, bad)


def _check_cells(vlm, batch, ds, window):
    for e, (keys, queries) in enumerate([("image", "last"), ("image", "question"), ("question", "last")]):
        for w, start in enumerate(ds.window_start.values.tolist()):
            ko = knockout(vlm, batch, keys=keys, queries=queries, layers=list(range(start, start + window)))
            np.testing.assert_array_equal(ds.target.values, ko.target.values)
            np.testing.assert_allclose(ds.prob.values[e, w], np.exp(ko.logprob.values), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(ds.prob_clean.values, np.exp(ko.logprob_clean.values), rtol=1e-9)
            want = (np.exp(ko.logprob.values) - np.exp(ko.logprob_clean.values)) / np.exp(ko.logprob_clean.values)
            np.testing.assert_allclose(ds.relative_change.values[e, w], want, rtol=1e-7, atol=1e-12)
            np.testing.assert_array_equal(ds.correct.values[e, w], ko.logprobs.values.argmax(-1) == ko.target.values)
    assert ds.correct_clean.values.all()


def test_sweep_equals_knockout_per_cell(tiny_f64):
    """Every family: one window over the whole LM (each cell one knockout)."""
    vlm, batch = tiny_f64
    n = len(vlm.lm_layers)
    ds = knockout_sweep(vlm, batch, window=n)
    assert ds.edge.values.tolist() == ["image→last", "image→question", "question→last"]
    assert ds.window_start.values.tolist() == [0] and ds.window_stop.values.tolist() == [n]
    _check_cells(vlm, batch, ds, n)
    assert np.abs(ds.relative_change.values[0]).max() > 1e-6  # cutting image -> last changes the answer's p


def test_sweep_sliding_windows(llava_f64):
    vlm, batch = llava_f64
    n = len(vlm.lm_layers)
    ds = knockout_sweep(vlm, batch, window=1)
    assert ds.window_start.values.tolist() == list(range(n))
    _check_cells(vlm, batch, ds, 1)


def test_sweep_explicit_edges_and_bad_input(llava_f64):
    vlm, batch = llava_f64
    first = [[int(L.image_positions[0])] for L in batch.layouts]
    ds = knockout_sweep(vlm, batch, edges={"first patch→last": (first, "last")}, window=2, target=[1, 2])
    assert ds.target.values.tolist() == [1, 2]
    with pytest.raises(ValueError, match="need a \\(keys, queries\\) pair"):
        knockout_sweep(vlm, batch, edges={"x": "image"})
    with pytest.raises(ValueError, match="keys='pixels' is not accepted"):
        knockout_sweep(vlm, batch, edges={"x": ("pixels", "last")})
    with pytest.raises(ValueError, match="names no edge"):
        knockout_sweep(vlm, batch, edges={})
