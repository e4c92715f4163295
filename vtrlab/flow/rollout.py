"""Attention rollout (Abnar & Zuidema 2020) through the LM, streamed: one running product, no N×N per layer.

Per LM layer ``l``: ``Â_l = (mean_heads A_l + I)`` with rows renormalised (so ``(A + I) / 2``), and the
rollout after layer ``l`` is ``R_l = Â_l · Â_{l-1} ··· Â_0``: how much of each input position flows
into each position's residual stream, counting the skip connection. A recorder site on every LM
attention module (``Site.on_call``, see :mod:`vtrlab.probes.attention`) forms ``Â_l`` from the
attention probabilities under the mask the model actually ran (in chunks of query rows) and folds it
into one running ``(B, N, N)`` product; only the chosen query rows of ``R_l`` are kept, for the chosen
layers. Peak extra memory: two ``(B, N, N)`` tensors, whatever the number of layers.

Probes compose: inside :func:`vtrlab.knocked_out` the rollout is that of the knocked-out attention.
Padding query rows (no key to attend to) are identity rows, so they never feed real positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from vtrlab.models.labels import key_coordinates
from vtrlab.probes.attention import Site, row_probabilities, session
from vtrlab.probes.spec import layer_indices, padded_rows, queries_per_sample
from vtrlab.probes.switch import attention_switched

_CHUNK = 256  # query rows whose (B, H, rows, N) probabilities exist at once


def residual_attention(mean_attn: torch.Tensor) -> torch.Tensor:
    """``Â = (A + I)`` with rows renormalised, for head-mean attention ``A`` (B, N, N); rows of A that
    are NaN or empty (padding queries) become identity rows."""
    a = torch.nan_to_num(mean_attn, nan=0.0)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = a + eye
    return a / a.sum(-1, keepdim=True)


@dataclass
class _Rollout:
    """The running product shared by the sites of one rollout call."""

    rows: torch.Tensor  # (B, R) long, -1 padding
    report: set[int]
    n_layers: int
    dtype: torch.dtype
    product: torch.Tensor | None = None
    next_layer: int = 0
    kept: dict[int, torch.Tensor] = field(default_factory=dict)

    def on_call(self, site: Site, module, query, key, value, mask, scaling, causal, out) -> None:
        if site.layer != self.next_layer:
            raise RuntimeError(
                f"rollout expected LM layer {self.next_layer}'s attention, but layer {site.layer}'s ran "
                "(layers must run once each, in order, in one forward without cache)"
            )
        B, _, Q, _ = query.shape
        N = key.shape[2]
        if Q != N:
            raise ValueError(
                f"rollout needs a full forward (queries = keys); got {Q} queries x {N} keys (a cached decode step)"
            )
        with torch.no_grad():
            q, k = query.detach(), key.detach()
            mean = torch.empty((B, N, N), dtype=self.dtype, device=q.device)
            for s in range(0, Q, _CHUNK):
                rows = torch.arange(s, min(Q, s + _CHUNK), device=q.device)[None].expand(B, -1)
                p = row_probabilities(module, q, k, mask, scaling, causal, rows)  # (B, H, r, N)
                mean[:, s : s + rows.shape[1]] = p.mean(1).to(self.dtype)
            a_hat = residual_attention(mean)
            del mean
            self.product = a_hat if self.product is None else torch.bmm(a_hat, self.product)
            if site.layer in self.report:
                idx = self.rows.clamp(min=0).to(q.device)
                picked = torch.gather(self.product, 1, idx[:, :, None].expand(B, idx.shape[1], N))
                self.kept[site.layer] = picked.float().cpu()
        self.next_layer += 1
        if self.next_layer == self.n_layers:
            self.product = None  # free the running product at the end of the forward


def rollout(vlm, batch, *, queries="last", layers="all") -> xr.Dataset:
    """Attention rollout of the chosen query rows after each chosen LM layer, in one sdpa forward.

    Args:
        queries: ``"last"``, ``"question"``, ``"text"``, ``"all"``, ``"image"`` or explicit positions.
        layers: ``"all"`` or LM layer indices at which to report the rollout (the product always runs
            through every layer from the first).

    Returns an ``xarray.Dataset``: ``rollout`` (sample, layer, query, key) — row ``q`` of
    ``Â_l ··· Â_0`` (each row sums to 1 over the sample's real positions), ``query_position``
    (sample, query), and the key labels ``key_kind/key_image/key_tile/key_row/key_col``. The model's
    outputs are those of a plain sdpa forward (rollout only records).
    """
    layouts = list(batch.layouts)
    n = len(vlm.lm_layers)
    report = layer_indices(layers, n)
    rows_np = padded_rows(queries_per_sample(layouts, queries))
    rows_t = torch.as_tensor(rows_np, device=vlm.device)
    dtype = torch.float64 if vlm.dtype == torch.float64 else torch.float32
    state = _Rollout(rows=rows_t, report=set(report), n_layers=n, dtype=dtype)
    sites = {
        id(vlm.adapter.lm_attention(mod)): Site("lm", i, on_call=state.on_call, probe="rollout")
        for i, mod in enumerate(vlm.lm_layers)
    }
    inputs = dict(batch.inputs)
    try:
        with attention_switched(vlm.model), session(sites), torch.no_grad():
            vlm.model(**inputs, use_cache=False)
    finally:
        state.product = None
    if state.next_layer != n:
        raise RuntimeError(
            f"rollout saw {state.next_layer} of {n} LM layers' attention run through vtrlab's attention function"
        )
    values = torch.stack([state.kept[i] for i in report], 1).numpy()  # (B, L, R, N)
    values = np.where((rows_np < 0)[:, None, :, None], np.nan, values)
    seq_len = values.shape[-1]
    same = bool((rows_np == rows_np[:1]).all()) and not (rows_np < 0).any()
    ds = xr.Dataset(
        {
            "rollout": (("sample", "layer", "query", "key"), values.astype(np.float32)),
            "query_position": (("sample", "query"), np.where(rows_np >= 0, rows_np, np.nan)),
            **key_coordinates(layouts, seq_len),
        },
        coords={
            "sample": np.arange(len(layouts)),
            "layer": np.asarray(report),
            "query": rows_np[0] if same else np.arange(rows_np.shape[1]),
            "key": np.arange(seq_len),
        },
    )
    ds.attrs.update(
        {
            "model": str(vlm.name),
            "family": str(vlm.family),
            "queries": queries if isinstance(queries, str) else "explicit",
            "query_coordinate": "sequence position" if same else "row index (see query_position)",
            "method": "rollout: head mean, +I, rows renormalised, product from LM layer 0 (Abnar & Zuidema 2020)",
        }
    )
    return ds
