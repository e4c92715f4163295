"""Oracle tests of the pure selection rules (vtrlab.reduce.scoring) against float64 numpy
references written independently from each method's definition, on fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.reduce import scoring

RNG = np.random.default_rng(0)


def _rank(x: np.ndarray) -> list[int]:
    """Largest first, lower index first among equals (a plain Python sort, not torch)."""
    return sorted(range(len(x)), key=lambda i: (-x[i], i))


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.mark.parametrize("seed", range(3))
def test_fastervlm_and_vtc_cls(seed):
    rng = np.random.default_rng(seed)
    attn = rng.dirichlet(np.ones(37), size=(3, 4))  # (layers, heads, V)
    k = 9
    ref = sorted(_rank(attn[-1].mean(0))[:k])
    assert scoring.fastervlm_select(_t(attn[-1]), k).tolist() == ref
    vtc = sum(attn[i].mean(0) for i in range(3))
    np.testing.assert_allclose(scoring.vtc_cls_scores(_t(attn)).numpy(), vtc, rtol=1e-12)


def test_top_k_ties_and_errors():
    s = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    assert scoring.top_k(s, 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="outside 0..5"):
        scoring.top_k(s, 6)
    with pytest.raises(TypeError, match="need an integer"):
        scoring.top_k(s, 2.5)


def _visionzip_ref(attn, hidden, keys, dominant, contextual):
    V = attn.shape[1]
    s = attn.sum(0)
    dom = sorted(_rank(s)[: dominant - 1])
    rest = [v for v in range(V) if v not in dom]
    R = len(rest)
    step = max(1, R // contextual)
    tpos = list(range(0, R, step))[:contextual]
    opos = [p for p in range(R) if p not in tpos]
    members = {t: [] for t in tpos}
    group = {v: v for v in dom}
    for p in opos:
        sims = [_cos(keys[1 + rest[p]], keys[1 + rest[t]]) for t in tpos]
        best = tpos[int(np.argmax(sims))]
        members[best].append(rest[p])
        group[rest[p]] = rest[best]
    ctx = []
    for t in tpos:
        m = members[t]
        mean = np.mean([hidden[1 + v] for v in m], axis=0) if m else np.zeros(hidden.shape[1])
        ctx.append(hidden[1 + rest[t]] + mean)
        group[rest[t]] = rest[t]
    embeds = np.vstack([hidden[:1]] + [hidden[1 + v][None] for v in dom] + [np.vstack(ctx)])
    sources = [-1] + dom + [rest[t] for t in tpos]
    return sources, embeds, [group.get(v, -1) for v in range(V)]


@pytest.mark.parametrize("seed", range(3))
def test_visionzip_matches_reference(seed):
    rng = np.random.default_rng(seed)
    V, D, d = 30, 8, 4
    attn = rng.dirichlet(np.ones(V), size=3)
    hidden = rng.normal(size=(V + 1, D))
    keys = rng.normal(size=(V + 1, d))
    res = scoring.visionzip_merge(_t(attn), _t(hidden), _t(keys), dominant=7, contextual=4)
    src, emb, grp = _visionzip_ref(attn, hidden, keys, 7, 4)
    assert res.sources.tolist() == src
    np.testing.assert_allclose(res.embeds.numpy(), emb, rtol=1e-12, atol=1e-12)
    assert res.group.tolist() == grp
    # bookkeeping: every patch is kept, or merged into exactly one contextual target
    assert len(src) == 7 + 4 and (res.group >= 0).all()


def test_visionzip_split_matches_released_budgets():
    assert [scoring.visionzip_split(n) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]


def _prumerge_ref(q, k, x, plus, n_nb=32):
    C = q.shape[0]
    logits = k @ q * C**-0.5
    p = np.exp(logits - logits.max())
    p = p / p.sum()
    a = p[1:]
    V = len(a)
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    n_out = int((a > q3 + 1.5 * (q3 - q1)).sum())
    picked = _rank(a)[: int(V * (n_out / V))]
    if plus:
        step = max(1, int(int(1 / (n_out / V)) / 3))
        picked += [v for v in range(0, V - 1, step) if v not in picked]
    compl = [v for v in range(V) if v not in picked]
    keys = k[1:]
    out = []
    for i, v in enumerate(picked):
        others = picked[:i] + picked[i + 1 :] + compl
        sims = np.array([_cos(keys[v], keys[o]) for o in others])
        nb = [others[j] for j in _rank(sims)[: min(n_nb, len(others))]]
        out.append(x[v] + sum(a[j] * x[j] for j in nb))
    out.append(sum((a[j] * x[j] for j in compl), np.zeros(x.shape[1])))
    return picked + [-1], np.vstack(out), a


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_prumerge_matches_reference(plus, seed):
    rng = np.random.default_rng(seed)
    V, C = 48, 16
    q = rng.normal(size=C) * 3
    k = rng.normal(size=(V + 1, C))
    x = rng.normal(size=(V, C))
    attn = scoring.prumerge_cls_attention(_t(q), _t(k))
    n = scoring.iqr_outlier_count(attn)
    assert n > 0
    picked = scoring.rank_desc(attn)[:n]
    if plus:
        picked = torch.cat([picked, scoring.prumerge_plus_grid(picked, n / V, V)])
    res = scoring.prumerge_merge(attn, _t(k[1:]), _t(x), picked, n_neighbors=8)
    src, emb, a = _prumerge_ref(q, k, x, plus, n_nb=8)
    np.testing.assert_allclose(attn.numpy(), a, rtol=1e-10)
    assert res.sources.tolist() == src
    np.testing.assert_allclose(res.embeds.numpy(), emb, rtol=1e-10, atol=1e-12)


def _vispruner_ref(a, x, T, ratio=0.5):
    imp = int(T * ratio)
    order = _rank(a)
    important, residual = order[:imp], order[imp:]
    while True:
        R = len(residual)
        r = min(8, R - (T - imp))
        if r <= 0:
            break
        ev, od = residual[::2], residual[1::2]
        s = np.array([max(_cos(x[i], x[j]) for j in od) for i in ev])
        keep = _rank(s)[r:]
        residual = [ev[i] for i in keep] + od
    return sorted(important + residual)


@pytest.mark.parametrize("T", [5, 12, 31])
def test_vispruner_matches_reference(T):
    rng = np.random.default_rng(T)
    V = 64
    a = rng.dirichlet(np.ones(V))
    x = rng.normal(size=(V, 6))
    got = scoring.vispruner_select(_t(a), _t(x), T)
    assert got.tolist() == _vispruner_ref(a, x, T)
    assert got.numel() == T


def _divprune_ref(x, k):
    V = len(x)
    D = np.array([[1 - _cos(x[i], x[j]) for j in range(V)] for i in range(V)])
    first = [sorted(D[:, j])[1] for j in range(V)]
    S = [int(np.argmax(first))]
    while len(S) < k:
        m = [min(D[i, j] for i in S) for j in range(V)]
        S.append(int(np.argmax(m)))
    return sorted(S)


@pytest.mark.parametrize("k", [1, 6, 20])
def test_divprune_matches_reference(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(40, 5))
    got = scoring.divprune_select(_t(x), k)
    assert got.tolist() == _divprune_ref(x, k)
    assert len(set(got.tolist())) == k


def _hired_ref(a0, a22, grid, rate, alpha):
    n, _, V = a22.shape
    bottom, top = a22.sum(1), a0.sum(1)
    mask = np.zeros((n, V), bool)
    total = int(n * V * rate)
    full = min(int(total * alpha), V)
    sub = min(total - full, (n - 1) * V)
    mask[0, _rank(bottom[0])[:full]] = True
    spatial = np.zeros(V, bool)
    spatial[_rank(top[0])[: int(V * (1 - alpha))]] = True
    chunk = V // (n - 1)
    per = np.array([spatial[i * chunk : (i + 1) * chunk].sum() for i in range(n - 1)], dtype=np.float32)
    share = np.floor(per / per.sum() * np.float32(sub)).astype(int)
    for i in range(n - 1):
        mask[i + 1, _rank(bottom[i + 1])[: min(share[i], V)]] = True
    return mask


@pytest.mark.parametrize("grid", [(2, 2), (1, 3)])
def test_hired_matches_reference(grid):
    rng = np.random.default_rng(sum(grid))
    n, V = 1 + grid[0] * grid[1], 36
    a0 = rng.dirichlet(np.ones(V), size=(n, 2))
    a22 = rng.dirichlet(np.ones(V), size=(n, 2))
    got = scoring.hired_select(_t(a0), _t(a22), grid, budget_rate=0.2, alpha=0.5)
    np.testing.assert_array_equal(got.numpy(), _hired_ref(a0, a22, grid, 0.2, 0.5))
    assert got.sum() <= int(n * V * 0.2)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_cdpruner_dpp_matches_bruteforce_greedy(k):
    rng = np.random.default_rng(k)
    feats = rng.normal(size=(20, 24))
    img, txt = rng.normal(size=(20, 4)), rng.normal(size=(3, 4))
    cos = np.array([[_cos(a, b) for b in txt] for a in img])
    r = -cos.mean(1)
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    rel = scoring.cdpruner_relevance(_t(img), _t(txt))
    np.testing.assert_allclose(rel.numpy(), r, rtol=1e-12)
    S = np.array([[_cos(a, b) for b in feats] for a in feats])
    L = r[:, None] * S * r[None, :]
    picked = []
    for _ in range(k):
        gains = [
            np.linalg.det(L[np.ix_(picked + [j], picked + [j])]) if j not in picked else -np.inf for j in range(20)
        ]
        picked.append(int(np.argmax(gains)))
    assert scoring.cdpruner_select(_t(feats), rel, k).tolist() == sorted(picked)


def test_cdpruner_dpp_refuses_beyond_kernel_rank():
    feats = _t(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match="numerical rank 3 < k=5"):
        scoring.cdpruner_select(feats, torch.ones(10, dtype=torch.float64), 5)
