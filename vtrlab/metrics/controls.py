"""Controls that sit beside every relevance score: what a signal's AUROC means, and how sure we are of it.

Pure numpy / pandas functions; no model runs here.

* :func:`objectness_auroc` — the AUROC of a map that marks every patch holding *any* object, ignoring
  the question. An attention layer that does not beat it has learnt "where the objects are", not "which
  object the question is about".
* :func:`object_auroc` — AUROC restricted to object patches: target (relevant) vs distractor objects.
  0.5 = the signal cannot tell the asked-about object from the others; this is the informative number.
* :func:`relevant_lift` — share of the signal on relevant tokens over the share a uniform map gives
  (1 = uniform, ``1 / relevant_fraction`` = all mass on relevant tokens).
* :func:`bootstrap_ci` / :func:`ci_table` — percentile bootstrap over samples with a seed.
* :func:`question_agnostic` — whether the ranking of image keys at an LM layer can depend on the
  question at all, from the positions of the query row, the image keys and the question tokens.

Like :mod:`vtrlab.metrics.agreement`, the per-token functions reduce along the last axis and broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .agreement import auroc


def _bool(mask, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != bool:
        m = np.asarray(m, dtype=np.float64)
        if np.isnan(m).any() or not np.isin(m, (0.0, 1.0)).all():
            raise ValueError(f"{name} must be boolean (or 0/1); got values {np.unique(m)[:5].tolist()}")
        m = m.astype(bool)
    return m


def objectness_auroc(objects, relevant) -> np.ndarray:
    """AUROC of the objectness map (1 on every token holding any object, 0 elsewhere) against ``relevant``.

    The baseline a question-blind "where are the objects" detector scores; ties count ½, so a token that
    holds an object but is not relevant is not in favour of the map. NaN where ``relevant`` is all True or
    all False. Relevant tokens count as object tokens even where ``objects`` misses them."""
    obj, rel = np.broadcast_arrays(_bool(objects, "objects"), _bool(relevant, "relevant"))
    return auroc((obj | rel).astype(np.float64), rel)  # the targets are objects by definition


def object_auroc(scores, relevant, objects) -> np.ndarray:
    """AUROC of ``scores`` separating target tokens (``relevant``) from distractor tokens (``objects`` and not
    ``relevant``), over object tokens only. NaN where a row has no target or no distractor token."""
    s = np.asarray(scores, dtype=np.float64)
    rel, obj = _bool(relevant, "relevant"), _bool(objects, "objects")
    s, rel, obj = np.broadcast_arrays(s, rel, obj)
    if np.isnan(s[obj]).any():
        raise ValueError("scores contain NaN on object tokens")
    flat_s, flat_r, flat_o = (x.reshape(-1, x.shape[-1]) for x in (s, rel, obj))
    out = np.full(flat_s.shape[0], np.nan)
    for i, (si, ri, oi) in enumerate(zip(flat_s, flat_r, flat_o)):
        target, distractor = ri & oi, oi & ~ri
        if target.any() and distractor.any():
            out[i] = float(auroc(si[oi], target[oi]))
    return out.reshape(s.shape[:-1])


def relevant_lift(scores, relevant) -> np.ndarray:
    """(share of the summed non-negative ``scores`` on relevant tokens) / (share of tokens that are relevant).

    1 = a uniform map; NaN where the mask is empty or full, or the scores sum to zero."""
    s = np.asarray(scores, dtype=np.float64)
    if (s < 0).any():
        raise ValueError("relevant_lift needs non-negative scores (attention, shares); got a negative value")
    rel = _bool(relevant, "relevant")
    s, rel = np.broadcast_arrays(s, rel)
    total = s.sum(-1)
    frac = rel.mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rel, s, 0).sum(-1) / total
        out = share / frac
    return np.where((total > 0) & (frac > 0) & (frac < 1), out, np.nan)


def bootstrap_ci(
    values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, statistic: Callable[[np.ndarray], float] = np.mean
) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap over the entries of ``values`` (one per sample).

    NaN entries are left out first; with fewer than 2 finite values the interval is NaN. ``statistic``
    takes a 1-D array; the resamples are drawn with ``numpy.random.default_rng(seed)``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not 0 < ci < 1:
        raise ValueError(f"ci={ci!r}: need a level in (0, 1), e.g. 0.95")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r}: need a positive integer")
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(statistic(v))
    if v.size < 2:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    if statistic is np.mean:
        stats = v[idx].mean(1)
    else:
        stats = np.array([statistic(v[i]) for i in idx])
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return point, float(lo), float(hi)


def ci_table(
    df, by: Sequence[str] | str, value: str | Sequence[str], n_boot: int = 1000, ci: float = 0.95, seed: int = 0
):
    """Per group of ``by``: mean of each ``value`` column with its percentile-bootstrap CI over rows (samples).

    Returns a DataFrame with the ``by`` columns, then ``metric``, ``mean``, ``low``, ``high``, ``n``
    (finite rows). The same ``seed`` is used in every group, so the table is deterministic."""
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by)
    values = [value] if isinstance(value, str) else list(value)
    missing = [c for c in by + values if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; it has {list(df.columns)}")
    rows = []
    for key, group in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for col in values:
            v = group[col].to_numpy(dtype=np.float64)
            mean, lo, hi = bootstrap_ci(v, n_boot=n_boot, ci=ci, seed=seed)
            rows.append(
                {
                    **dict(zip(by, key)),
                    "metric": col,
                    "mean": mean,
                    "low": lo,
                    "high": hi,
                    "n": int(np.isfinite(v).sum()),
                }
            )
    return pd.DataFrame(rows, columns=by + ["metric", "mean", "low", "high", "n"])


def question_agnostic(
    layer: int, query_positions, image_positions, question_positions, bidirectional_image: bool = False
) -> bool:
    """Whether, at LM layer ``layer`` (0-indexed), the ranking of the image keys by the attention of the
    query rows cannot depend on the question under a causal mask.

    The attention logits at layer l are ⟨q_l(query), k_l(key)⟩ from the residual streams *entering* layer
    l. At layer 0 each stream is its own token's embedding, so a query row depends on the question only
    if it is a question token, and an image key never does. From layer 1 on, a stream has read every
    earlier position: the query depends on the question when a question token is at or before it, an
    image key when a question token precedes it. (Softmax normalisation over the question keys scales
    all image keys alike and does not change their ranking.) With ``bidirectional_image`` (image tokens
    see each other and, for safety, are assumed to see the whole prompt), keys depend on the question
    from layer 1 on whenever there is one. No question tokens: agnostic.
    """
    q = np.asarray(query_positions, dtype=np.int64).ravel()
    k = np.asarray(image_positions, dtype=np.int64).ravel()
    t = np.asarray(question_positions, dtype=np.int64).ravel()
    if not isinstance(layer, (int, np.integer)) or layer < 0:
        raise ValueError(f"layer={layer!r}: need a non-negative LM layer index")
    if q.size == 0:
        raise ValueError("no query positions given")
    if t.size == 0:
        return True
    if layer == 0:
        return not np.isin(q, t).any()
    query_reads = (t.min() <= q).any()
    key_reads = bidirectional_image or (k.size > 0 and (t.min() < k).any())
    return not (query_reads or key_reads)
