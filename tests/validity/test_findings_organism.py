"""Findings on the organism: every claim returns a well-formed record on a few samples, and the shared capture's
numbers (image share, first-token share, raster Spearman, tower norm ratios) equal the realism record's, which
runs plain transformers with eager attention (the oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vtrlab.analysis import findings as F
from vtrlab.data.synthetic import FAMILIES, generate


@pytest.fixture(scope="module")
def organism():
    import vtrlab as vl

    return vl.load("organism")


def test_shared_capture_equals_eager_realism_record(organism):
    from vtrlab.models.loader import organism_path
    from vtrlab.organism import realism

    n = 3
    model, processor = realism._load(organism_path())
    ref = realism.measure(model, processor, n=n, seed=0)  # samples generate(n, 0), one at a time, eager
    rows = F.tower_norms_and_capture(organism, generate(n, 0), F.FindingsCache(batch_size=n))
    share = np.stack([r["image_share"] for r in rows]).mean(0)
    first = np.stack([r["first"] for r in rows]).mean(0)
    rho = np.array([[F._raster_spearman(r["lm"][j]) for j in range(len(share))] for r in rows]).mean(0)
    np.testing.assert_allclose(share, ref["last_row_share"]["image"], atol=2e-4)
    np.testing.assert_allclose(first, ref["last_row_share"]["first"], atol=2e-4)
    np.testing.assert_allclose(rho, ref["last_row_spearman_raster"], atol=2e-3)
    ratio = np.stack([r["norm"] / np.median(r["norm"], axis=1, keepdims=True) for r in rows]).max(axis=(0, 2))
    np.testing.assert_allclose(ratio, ref["max_norm_over_median_max"], atol=2e-3)


def test_every_claim_returns_a_well_formed_record(organism):
    samples = [s for fam in FAMILIES for s in generate(1, 0, family=fam)]
    recs = F.run_all(organism, samples, methods=["random", "selector", "fastv"], budgets=[0.5], n_boot=50)
    assert [r["claim"] for r in recs] == list(F.CLAIM_FUNCTIONS)
    json.dumps(recs, allow_nan=False)
    for r in recs:
        assert r["verdict"] in F.VERDICTS and r["why"] and r["source"] and r["title"]
        if r["verdict"] == "not applicable here":
            continue
        assert r["n"] >= 1 and isinstance(r["value"], float)
        for p in r["parts"]:
            assert p["verdict"] == F.verdict_of(
                *(np.nan if c is None else c for c in p["ci"]), p["threshold"], p["direction"]
            )
    by = {r["claim"]: r for r in recs}
    d = by["darcet"]  # not applicable exactly when no tower token (before the last layer) is high-norm
    assert (d["verdict"] == "not applicable here") == (max(d["data"]["max_ratio"][:-1]) <= d["data"]["factor"])
    from vtrlab.plots.findings import claim_figure

    for r in recs:
        fig = claim_figure(r)
        if fig is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)
