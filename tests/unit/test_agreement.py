"""vtrlab.metrics.agreement against plain float64 Python references (no scipy / sklearn)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vtrlab.metrics import agreement as ag


def ref_ranks(x):
    x = list(map(float, x))
    return [sum(1 for y in x if y < v) + (sum(1 for y in x if y == v) + 1) / 2 for v in x]


def ref_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return num / den


def ref_spearman(a, b):
    return ref_pearson(ref_ranks(a), ref_ranks(b))


def ref_kendall_b(a, b):
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif da * db > 0:
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))


def ref_topk(x, k):
    return set(sorted(range(len(x)), key=lambda i: (-x[i], i))[:k])


def ref_auroc(s, m):
    pos = [v for v, t in zip(s, m) if t]
    neg = [v for v, t in zip(s, m) if not t]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def _cases(seed, n=40):
    rng = np.random.default_rng(seed)
    cont = rng.random(n)
    tied = rng.integers(0, 5, n).astype(float)  # many ties
    return [(cont, rng.random(n)), (tied, rng.integers(0, 4, n).astype(float)), (cont, cont**3), (cont, -cont)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_correlations_match_reference(seed):
    for a, b in _cases(seed):
        assert ag.spearman(a, b) == pytest.approx(ref_spearman(a, b), abs=1e-12)
        assert ag.kendall(a, b) == pytest.approx(ref_kendall_b(a, b), abs=1e-12)
    a, b = _cases(seed)[0]
    assert ag.spearman(a, a**2) == pytest.approx(1.0)
    assert ag.kendall(a, -a) == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 5, 13])
def test_top_k_overlap_matches_sets(seed, k):
    for a, b in _cases(seed):
        ta, tb = ref_topk(a, k), ref_topk(b, k)
        assert ag.top_k_iou(a, b, k) == pytest.approx(len(ta & tb) / len(ta | tb))
        assert ag.top_k_ioa(a, b, k) == pytest.approx(len(ta & tb) / k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_pointing_game_match_reference(seed):
    rng = np.random.default_rng(seed)
    for s in (rng.random(50), rng.integers(0, 3, 50).astype(float)):
        m = rng.random(50) < 0.3
        assert ag.auroc(s, m) == pytest.approx(ref_auroc(s, m), abs=1e-12)
        tops = [i for i in range(50) if s[i] == max(s)]  # every entry sharing the maximum
        assert ag.pointing_game(s, m) == pytest.approx(sum(m[i] for i in tops) / len(tops), abs=1e-12)
    m = np.zeros(10, bool)
    m[[2, 7]] = True
    s = np.arange(10.0)
    assert ag.auroc(s, m) == pytest.approx(ref_auroc(s, m))
    assert np.isnan(ag.auroc(s, np.zeros(10, bool))) and np.isnan(ag.pointing_game(s, np.zeros(10, bool)))


def test_pointing_game_ties_count_fractionally_not_toward_the_first_token():
    # a flat map: every token ties for the maximum. The old code took argmax (the top-left token),
    # so a mask holding only the first token scored 1.0 and one holding only the last scored 0.0.
    flat = np.ones(16)
    first, last = np.zeros(16, bool), np.zeros(16, bool)
    first[0], last[-1] = True, True
    assert ag.pointing_game(flat, first) == pytest.approx(1 / 16)
    assert ag.pointing_game(flat, last) == pytest.approx(1 / 16)
    # two tied maxima, one inside the mask: half a hit, whichever comes first
    s = np.array([0.1, 0.9, 0.3, 0.9])
    assert ag.pointing_game(s, np.array([0, 1, 0, 0], bool)) == 0.5
    assert ag.pointing_game(s, np.array([0, 0, 0, 1], bool)) == 0.5
    assert ag.pointing_game(s, np.array([0, 1, 0, 1], bool)) == 1.0
    # broadcasting over leading axes keeps the per-row share
    np.testing.assert_allclose(ag.pointing_game(np.stack([s, flat[:4]]), np.array([0, 1, 0, 0], bool)), [0.5, 0.25])
    with pytest.raises(ValueError, match="boolean"):
        ag.pointing_game(s, np.array([0, 2, 0, 0]))


def test_broadcasting_gives_layer_by_layer_matrices():
    rng = np.random.default_rng(3)
    scores = rng.random((4, 30))  # 4 layers x 30 tokens
    mat = ag.spearman(scores[:, None], scores[None, :])
    iou = ag.top_k_iou(scores[:, None], scores[None, :], 5)
    assert mat.shape == iou.shape == (4, 4)
    for i, j in itertools.product(range(4), repeat=2):
        assert mat[i, j] == pytest.approx(ref_spearman(scores[i], scores[j]), abs=1e-12)
        ti, tj = ref_topk(scores[i], 5), ref_topk(scores[j], 5)
        assert iou[i, j] == pytest.approx(len(ti & tj) / len(ti | tj))
    masks = rng.random((4, 30)) < 0.4
    np.testing.assert_allclose(ag.auroc(scores, masks), [ref_auroc(s, m) for s, m in zip(scores, masks)], atol=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ag.spearman([1.0, np.nan, 2.0], [1, 2, 3]), "NaN"),
        (lambda: ag.kendall([1, 2, 3], [1, 2]), "shapes"),
        (lambda: ag.top_k_iou([1, 2, 3], [3, 2, 1], 0), r"k=0: need an integer in 1..3"),
        (lambda: ag.auroc([1, 2, 3], [0, 2, 1]), "boolean"),
        (lambda: ag.spearman([1.0], [2.0]), "at least 2"),
    ],
)
def test_bad_inputs_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_constant_input_gives_nan():
    assert np.isnan(ag.spearman(np.ones(5), np.arange(5.0)))
    assert np.isnan(ag.kendall(np.ones(5), np.arange(5.0)))
