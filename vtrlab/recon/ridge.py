"""Reconstruction error as a per-token, per-layer importance signal.

``layer_error`` answers, for every vision layer and every LM layer (hidden states
of the image tokens): if a random subset of the image tokens is kept, how well can the dropped
ones be rebuilt from the kept ones at this layer?

Reconstructor (why this one): a closed-form **ridge regression per layer**, shared by all tokens
and samples, from a dropped token's context to its features. The context is
``[mean of kept tokens in its 3x3 grid neighbourhood (the sample mean if it has none), 1 if it
has none, mean of all kept tokens, 1]``.
A linear map with fixed inputs has the same (small) capacity at every layer and no training
randomness, so differences between layers reflect how redundant the features *are* at that
layer rather than optimisation luck; it is closed form (seconds on CPU for every layer), needs no
tuning beyond one ridge strength, and works for any width. A trained per-layer transformer
(like the selector's reconstructor) would rebuild better in absolute terms but would cost a
training run per layer and confound layers with training. Errors are measured out of sample
(two folds over samples: fit on one half, score the other) in per-channel standardised units,
so ``1.0`` means "no better than the layer's channel means" and layers of different widths
compare directly.

:func:`layer_error` returns an ``xarray.Dataset`` like every verb: ``lm_error`` (sample, layer,
token) and ``vision_error`` (sample, vision_layer, token), with the per-image-token axis ``token``
labelled by ``models.labels.token_coordinates`` (padded with NaN where samples have fewer image tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..models.base import KIND_IMAGE
from ..models.labels import token_dataset
from .features import token_features


def _neighbours(layout: Any) -> np.ndarray:
    """(T, T) bool: token j lies in token i's 3x3 grid neighbourhood (same image and tile, j != i)."""
    img = layout.kind == KIND_IMAGE
    r, c, t, im = (np.asarray(getattr(layout, k)[img]) for k in ("row", "col", "tile", "image"))
    near = (np.abs(r[:, None] - r[None]) <= 1) & (np.abs(c[:, None] - c[None]) <= 1)
    near &= (t[:, None] == t[None]) & (im[:, None] == im[None])
    np.fill_diagonal(near, False)
    return near


def _contexts(feats: np.ndarray, keep: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Context rows for the dropped tokens of one sample (see module docstring)."""
    kept = np.nan_to_num(feats[keep])
    global_mean = kept.mean(0) if len(kept) else np.zeros(feats.shape[1])
    w = near[~keep][:, keep].astype(float)
    cnt = w.sum(1, keepdims=True)
    # no kept neighbour: fall back to the sample mean, so the local term is always an estimate
    local = np.divide(w @ kept, cnt, out=np.tile(global_mean, (w.shape[0], 1)), where=cnt > 0)
    none = (cnt == 0).astype(float)
    ones = np.ones_like(none)
    return np.hstack([local, none, np.broadcast_to(global_mean, local.shape), ones])


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """W minimising ||xW - y||^2 + lam ||W||^2 with lam = alpha * mean diagonal of x^T x (float64)."""
    xtx = x.T @ x
    lam = alpha * np.trace(xtx) / max(xtx.shape[0], 1)
    return np.linalg.solve(xtx + lam * np.eye(xtx.shape[0]), x.T @ y)


def ridge_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, alpha: float) -> np.ndarray:
    """``x_new @ ridge_fit(x, y, alpha)`` without forming the (d, d) system when there are fewer rows than
    columns: then ``W = x^T (x x^T + lam I)^-1 y`` (the same W, an (n, n) solve), so a fit on a few hundred
    tokens of a 4096-wide LM layer costs an n x n solve instead of an 8194 x 8194 one. float64."""
    n, d = x.shape
    lam = alpha * float(np.einsum("ij,ij->", x, x)) / max(d, 1)  # alpha * trace(x^T x) / d, as ridge_fit
    if n >= d or lam <= 0:
        return x_new @ ridge_fit(x, y, alpha)
    return (x_new @ x.T) @ np.linalg.solve(x @ x.T + lam * np.eye(n), y)


def ridge_token_error(
    feats: Sequence[np.ndarray],
    layouts: Sequence[Any],
    keep_ratio: float = 0.5,
    n_draws: int = 4,
    alpha: float = 0.1,
    seed: int = 0,
) -> list[np.ndarray]:
    """One layer: per sample, per token, the out-of-sample ridge reconstruction error (standardised
    MSE over channels) averaged over the random draws in which the token was dropped."""
    if not 0.0 < keep_ratio < 1.0:
        raise ValueError(f"keep_ratio={keep_ratio}; accepted: (0, 1) so that some tokens are kept and some dropped")
    if len(feats) < 2:
        raise ValueError(f"need at least 2 samples for out-of-sample (two-fold) ridge; got {len(feats)}")
    stacked = np.concatenate([f for f in feats])
    mu = np.nanmean(stacked, 0)
    sd = np.nanstd(stacked, 0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    z = [np.nan_to_num((f - mu) / sd) for f in feats]
    rng = np.random.default_rng(seed)
    near = [_neighbours(lay) for lay in layouts]
    sums = [np.zeros(len(f)) for f in feats]
    counts = [np.zeros(len(f)) for f in feats]
    fold = np.arange(len(feats)) % 2
    for _ in range(n_draws):
        keeps = []
        for f in z:
            k = min(max(int(round(keep_ratio * len(f))), 1), len(f) - 1)
            m = np.zeros(len(f), dtype=bool)
            m[rng.choice(len(f), size=k, replace=False)] = True
            keeps.append(m)
        ctx = [_contexts(f, m, nb) for f, m, nb in zip(z, keeps, near)]
        tgt = [f[~m] for f, m in zip(z, keeps)]
        for held in (0, 1):
            fit = [i for i in range(len(z)) if fold[i] != held]
            held_out = np.flatnonzero(fold == held)
            pred = ridge_predict(
                np.concatenate([ctx[i] for i in fit]),
                np.concatenate([tgt[i] for i in fit]),
                np.concatenate([ctx[i] for i in held_out]),
                alpha,
            )
            ends = np.cumsum([len(ctx[i]) for i in held_out])[:-1]
            for i, p in zip(held_out, np.split(pred, ends)):
                err = ((p - tgt[i]) ** 2).mean(1)
                sums[i][~keeps[i]] += err
                counts[i][~keeps[i]] += 1
    with np.errstate(invalid="ignore"):
        return [s / c for s, c in zip(sums, counts)]


def layer_error(
    vlm: Any,
    batch: Any,
    *,
    layers: Sequence[int] | str | None = "all",
    vision_layers: Sequence[int] | str | None = "all",
    keep_ratio: float = 0.5,
    n_draws: int = 4,
    alpha: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Per layer and image token, how badly the token is rebuilt from a random ``keep_ratio`` subset
    (ridge, out of sample; see module docstring).

    ``layers`` / ``vision_layers``: ``"all"``, indices, or ``None`` to skip that stack. Returns a
    Dataset with ``lm_error`` (sample, layer, token) and/or ``vision_error`` (sample, vision_layer,
    token), the ``token`` axis labelled with the layouts' image / tile / row / col / pixel box."""
    from tqdm.auto import tqdm

    feats = token_features(vlm, batch, layers=layers, vision_layers=vision_layers)
    values = {
        key: ridge_token_error(f, batch.layouts, keep_ratio=keep_ratio, n_draws=n_draws, alpha=alpha, seed=seed)
        for key, f in tqdm(feats.items(), desc="ridge per layer", disable=not progress)
    }
    variables = {}
    for stack, name, dim in (("vision", "vision_error", "vision_layer"), ("lm", "lm_error", "layer")):
        per = {i: v for (st, i), v in values.items() if st == stack}
        if per:
            variables[name] = (dim, per)
    return token_dataset(
        variables,
        batch.layouts,
        attrs={
            "signal": "ridge reconstruction error from kept neighbours",
            "keep_ratio": keep_ratio,
            "n_draws": n_draws,
            "alpha": alpha,
            "seed": seed,
        },
    )
