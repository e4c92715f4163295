"""Per-token reconstruction error of a trained selector's reconstructor: how badly a token is
rebuilt when it is masked. High error = the token carries information its neighbours do not
(a candidate to keep); low error = redundant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..models.labels import token_dataset
from .features import SampleFeatures, resolve_vision_layer, vision_features
from .selector import Selector, collate

MODES = ("single", "random")
ATTENTION_BYTES = 1 << 30  # the reconstructor's attention weights of one chunk of masks stay within this (1 GiB)


def mask_chunk(sel: Selector, n: int, chunk: int = 256, budget: int = ATTENTION_BYTES) -> int:
    """How many masks of ``n`` patches go through the reconstructor at once: at most ``chunk``, and few enough
    that the chunk's attention weights (masks x heads x n x n, float32) fit in ``budget`` bytes. ``mode="single"``
    at LLaVA-NeXT size (2,880 patches) would otherwise ask for 256 x 4 x 2880² floats = 31.6 GiB at once."""
    per_mask = max(int(sel.config.n_heads) * int(n) * int(n) * 4, 1)
    return int(max(1, min(int(chunk), budget // per_mask)))


@torch.no_grad()
def masked_token_error(
    sel: Selector,
    samples: Sequence[SampleFeatures],
    mode: str = "single",
    keep_ratio: float = 0.5,
    n_draws: int = 16,
    seed: int = 0,
    chunk: int = 256,
    budget: int = ATTENTION_BYTES,
) -> list[np.ndarray]:
    """Per sample, per patch: standardised squared error (mean over channels) of the patch when masked.

    Masks go through the reconstructor in chunks of at most ``chunk``, fewer when their attention weights would
    pass ``budget`` bytes (:func:`mask_chunk`): memory stays bounded however many patches a sample has.

    ``single``: mask one patch at a time, every other patch kept (one reconstruction per patch).
    ``random``: ``n_draws`` uniform random masks keeping ``keep_ratio`` of the patches; each
    patch's error is averaged over the draws where it was masked (NaN if never masked).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; accepted: {MODES}")
    if not 0.0 <= keep_ratio < 1.0:
        raise ValueError(f"keep_ratio={keep_ratio}; accepted: [0, 1) so that some patches are masked")
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        n = len(s.features)
        if mode == "single":
            keeps = ~np.eye(n, dtype=bool)
        else:
            k = int(round(keep_ratio * n))
            keeps = np.zeros((n_draws, n), dtype=bool)
            for d in range(n_draws):
                keeps[d, rng.choice(n, size=k, replace=False)] = True
        feats, row, col, valid = collate([s], sel.device)
        target = sel.normalize(feats)
        errs = np.zeros((len(keeps), n))
        step = mask_chunk(sel, n, chunk, budget)
        for a in range(0, len(keeps), step):
            kk = torch.as_tensor(keeps[a : a + step], device=sel.device)
            m = kk.shape[0]
            rec = sel.reconstruct(
                feats.expand(m, -1, -1), kk.float(), row.expand(m, -1), col.expand(m, -1), valid.expand(m, -1)
            )
            errs[a : a + m] = ((rec - target) ** 2).mean(-1).cpu().numpy()
        masked = ~keeps
        with np.errstate(invalid="ignore"):
            out.append(np.where(masked, errs, 0).sum(0) / masked.sum(0))
    return out


def patches_to_tokens(sample: SampleFeatures, per_patch: np.ndarray) -> np.ndarray:
    """Mean of per-patch values over the patches each LM image token covers (NaN if none)."""
    ok = (sample.token >= 0) & np.isfinite(per_patch)
    sums = np.bincount(sample.token[ok], weights=per_patch[ok], minlength=sample.n_tokens)
    cnt = np.bincount(sample.token[ok], minlength=sample.n_tokens)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)


def token_error(
    vlm: Any,
    batch,
    *,
    selector: Selector,
    mode: str = "single",
    keep_ratio: float = 0.5,
    n_draws: int = 16,
    seed: int = 0,
) -> xr.Dataset:
    """Per LM image token, the selector-reconstructor's error when the token is masked.

    The selector reads one vision layer (``selector.config.vision_layer``, default the projector's
    input layer); the result names it in the ``vision_layer`` coordinate. Returns a Dataset with
    ``recon_error`` (sample, token), the ``token`` axis labelled with the layouts' image / tile / row /
    col / pixel box, NaN-padded where a sample has fewer image tokens."""
    if not isinstance(selector, Selector):
        raise TypeError(f"selector must be a vtrlab.recon.Selector; got {type(selector).__name__}")
    layer = resolve_vision_layer(vlm, selector.config.vision_layer)
    samples = vision_features(vlm, batch, layer)[layer]
    per_patch = masked_token_error(selector, samples, mode=mode, keep_ratio=keep_ratio, n_draws=n_draws, seed=seed)
    values = [patches_to_tokens(s, e) for s, e in zip(samples, per_patch)]
    ds = token_dataset(
        {"recon_error": (None, {layer: values})},
        batch.layouts,
        attrs={"signal": "selector reconstruction error when masked", "mode": mode},
    )
    return ds.assign_coords(vision_layer=layer)
