"""Agreement between importance signals, and between a signal and a ground-truth mask.

Pure numpy functions. Every function reduces along the last axis and broadcasts over the leading
axes, so ``spearman(scores[:, None], scores[None, :])`` gives a layer x layer matrix at once.
Ties get average ranks (Spearman, AUROC) and tau-b corrections (Kendall). NaN inputs are refused.
"""

from __future__ import annotations

import numpy as np


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    try:
        a, b = np.broadcast_arrays(a, b)
    except ValueError:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}") from None
    if a.ndim == 0 or a.shape[-1] < 2:
        raise ValueError(f"need at least 2 entries along the last axis; got shape {a.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("inputs contain NaN; select the tokens to compare first (e.g. image tokens only)")
    return a, b


def _rank_row(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], x.size]  # exclusive
    avg = (starts + ends - 1) / 2 + 1  # mean of 1-based ranks start+1..end
    ranks = np.empty(x.size)
    ranks[order] = avg[np.cumsum(new) - 1]
    return ranks


def rankdata(x) -> np.ndarray:
    """Average ranks (1-based) along the last axis, ties sharing the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1])
    return np.stack([_rank_row(r) for r in flat]).reshape(x.shape) if flat.shape[0] else x.copy()


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1), np.nan)


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation along the last axis (NaN where one side is constant)."""
    _pair(a, b)  # validate shapes / NaN
    ra, rb = np.broadcast_arrays(rankdata(a), rankdata(b))  # rank before broadcasting: cheaper
    return _pearson(ra, rb)


def kendall(a, b) -> np.ndarray:
    """Kendall's tau-b along the last axis (O(n²) pairs; n = a few thousand tokens is fine)."""
    a, b = _pair(a, b)
    n = a.shape[-1]
    iu = np.triu_indices(n, k=1)
    da = np.sign(a[..., :, None] - a[..., None, :])[..., iu[0], iu[1]]
    db = np.sign(b[..., :, None] - b[..., None, :])[..., iu[0], iu[1]]
    num = (da * db).sum(-1)
    den = np.sqrt((da != 0).sum(-1) * (db != 0).sum(-1).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def top_k_mask(x, k: int) -> np.ndarray:
    """Boolean mask of the k largest entries along the last axis (ties broken by lower index)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k={k!r}: need an integer in 1..{n}")
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, order, True, -1)
    return mask


def top_k_iou(a, b, k: int) -> np.ndarray:
    """|top-k(a) ∩ top-k(b)| / |top-k(a) ∪ top-k(b)| along the last axis."""
    a, b = _pair(a, b)
    ma, mb = top_k_mask(a, k), top_k_mask(b, k)
    return (ma & mb).sum(-1) / (ma | mb).sum(-1)


def top_k_ioa(a, b, k: int) -> np.ndarray:
    """|top-k(a) ∩ top-k(b)| / k: the share of a's top-k that b also keeps."""
    a, b = _pair(a, b)
    return (top_k_mask(a, k) & top_k_mask(b, k)).sum(-1) / k


def auroc(scores, mask) -> np.ndarray:
    """Area under the ROC curve of ``scores`` separating ``mask`` True from False (ties count ½).

    Equals the probability that a random relevant entry outscores a random irrelevant one (Mann-
    Whitney U / (n_pos · n_neg)). NaN where the mask is all True or all False.
    """
    s, m = _pair(scores, np.asarray(mask, dtype=np.float64))
    if not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("mask must be boolean (or 0/1)")
    m = m.astype(bool)
    ranks = rankdata(s)
    n_pos = m.sum(-1)
    n_neg = m.shape[-1] - n_pos
    u = np.where(m, ranks, 0).sum(-1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / np.maximum(n_pos * n_neg, 1), np.nan)


def pointing_game(scores, mask) -> np.ndarray:
    """Whether the highest-scoring entry lies inside ``mask``; NaN where the mask is empty.

    Ties count fractionally: with several entries sharing the maximum, the result is the share of
    them that lie inside the mask (a flat map scores the mask's coverage, not the luck of whichever
    token comes first)."""
    s, m = _pair(scores, np.asarray(mask, dtype=np.float64))
    if not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("mask must be boolean (or 0/1)")
    m = m.astype(bool)
    top = s == s.max(-1, keepdims=True)
    hit = (top & m).sum(-1) / top.sum(-1)
    return np.where(m.any(-1), hit.astype(np.float64), np.nan)
