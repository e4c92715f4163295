"""Logit lens: the model's own final norm + LM head applied to the residual stream after chosen layers.

For each chosen LM layer ``l`` and each chosen position ``p``, ``softmax(head(norm(h_l[p])))`` where
``h_l`` is the output of decoder layer ``l`` (HF module order, 0-indexed), ``norm`` the decoder's
final norm and ``head`` the model's LM head (with the config's final logit softcapping, if any), so
that the lens after the last layer *is* the model's output distribution.

Memory is bounded: the vocabulary distribution is formed on the model's device for ``chunk``
positions at a time and reduced at once to the top-k tokens and the probabilities of the targets;
a (layers x positions x vocab) tensor never exists (``full=True`` asks for it explicitly).

The lens reads layer outputs with forward hooks (:func:`vtrlab.models.hooks.record`), so it composes
with every probe of the session: inside :func:`vtrlab.knocked_out` it reads the knocked-out stream.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from vtrlab.models.hooks import record
from vtrlab.models.labels import key_coordinates
from vtrlab.probes.spec import layer_indices, padded_rows, queries_per_sample

from .target import log_probs_at_last

_CHUNK = 512  # positions whose vocabulary distribution exists at once (per sample)


def _final_norm(vlm) -> torch.nn.Module:
    lm = vlm.adapter.language_model(vlm.model)
    for name in ("norm", "final_layernorm", "ln_f"):
        mod = getattr(lm, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ValueError(
        f"{type(lm).__name__} has no final norm (looked for .norm, .final_layernorm, .ln_f); "
        "the logit lens needs the decoder's own final norm"
    )


def _softcap(vlm) -> float | None:
    cfg = vlm.model.config
    text = getattr(cfg, "text_config", None) or cfg
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


def lens_logits(vlm, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own readout of residual-stream vectors ``hidden`` (..., D): final norm, LM head,
    softcapping (as the model's config says) -> logits (..., vocab)."""
    logits = vlm.adapter.lm_head(vlm.model)(_final_norm(vlm)(hidden))
    cap = _softcap(vlm)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _targets(targets, n_samples: int, vocab: int, default: torch.Tensor | None):
    """(B, T) long ids and the ``target`` coordinate labels."""
    accepted = (
        "None (each sample's greedy answer), one token id per sample, a list of ids per sample, "
        "or a dict {word: token id} shared by every sample"
    )
    if targets is None:
        return default[:, None].cpu(), np.array(["prediction"])
    if isinstance(targets, dict):
        if not targets:
            raise ValueError(f"targets={{}} names no token; accepted: {accepted}")
        names = list(targets)
        ids = [targets[n] for n in names]
        bad = [v for v in ids if not isinstance(v, (int, np.integer)) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"targets: {bad[0]!r} is not a token id; accepted: {accepted}")
        arr = np.tile(np.asarray(ids, dtype=np.int64)[None], (n_samples, 1))
        labels = np.asarray([str(n) for n in names])
    else:
        if isinstance(targets, (str, bytes, float, bool)):
            raise ValueError(f"targets={targets!r} is not accepted; accepted: {accepted}")  # noqa: TRY004
        arr = np.asarray(targets.detach().cpu() if torch.is_tensor(targets) else targets)
        if arr.dtype == bool or arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
            raise ValueError(f"targets={targets!r} is not accepted; accepted: {accepted}")
        if arr.shape[0] != n_samples:
            raise ValueError(
                f"targets gives {arr.shape[0]} entries for a batch of {n_samples} samples; accepted: {accepted}"
            )
        arr = arr.astype(np.int64).reshape(n_samples, -1)
        labels = np.asarray([f"target_{i}" for i in range(arr.shape[1])]) if arr.shape[1] > 1 else np.array(["target"])
    out = arr[(arr < 0) | (arr >= vocab)]
    if out.size:
        raise ValueError(f"targets: token id {int(out[0])} is outside the vocabulary 0..{vocab - 1}")
    return torch.as_tensor(arr), labels


def logit_lens(
    vlm,
    batch,
    *,
    queries="image",
    layers="all",
    targets=None,
    top_k: int = 5,
    full: bool = False,
    chunk: int = _CHUNK,
) -> xr.Dataset:
    """Decode the residual stream after each chosen LM layer at each chosen position.

    Args:
        queries: positions to decode: ``"image"``, ``"question"``, ``"last"``, ``"text"``, ``"all"`` or
            explicit integer positions (one list, or one per sample).
        layers: ``"all"`` or LM layer indices (the output of that decoder layer is decoded).
        targets: ``None`` (each sample's greedy answer at its last position, from the same forward),
            one token id per sample, a list of ids per sample, or ``{word: token id}`` shared by all.
        top_k: how many top tokens to keep per layer and position.
        full: also return ``logprobs`` (sample, layer, query, vocab) on the host (large; off by default).
        chunk: positions decoded at once per layer (bounds the vocabulary-sized working memory).

    Returns an ``xarray.Dataset``: ``top_token`` / ``top_prob`` (sample, layer, query, k),
    ``target_prob`` / ``target_logprob`` (sample, layer, query, target), ``target_id`` (sample, target),
    ``target_rank`` (sample, layer, query, target; 0 = the top token), ``query_position`` (sample, query)
    and per-query labels ``query_kind/query_image/query_tile/query_row/query_col`` (sample, query).
    Padding queries (samples with fewer positions) hold NaN / -1.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k={top_k!r}: need a positive integer")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}: need a positive integer")
    layouts = list(batch.layouts)
    lm_layers = layer_indices(layers, len(vlm.lm_layers))
    rows_np = padded_rows(queries_per_sample(layouts, queries))
    B, R = rows_np.shape
    head = vlm.adapter.lm_head(vlm.model)
    vocab = int(head.weight.shape[0])
    top_k = min(int(top_k), vocab)
    if targets is not None:
        _targets(targets, B, vocab, None)  # refuse bad targets before any forward
    rows_t = torch.as_tensor(rows_np.clip(min=0))

    def pick(h: torch.Tensor) -> torch.Tensor:
        """(B, N, D) layer output -> the chosen positions' vectors (B, R, D), kept on the device."""
        idx = rows_t.to(h.device)
        return torch.gather(h, 1, idx[:, :, None].expand(B, R, h.shape[-1])).detach()

    names = {f"lm{i}": vlm.lm_layers[i] for i in lm_layers}
    inputs = dict(batch.inputs)
    if targets is None:
        # the model's own answer needs the whole forward
        with record(outputs=names, transform=pick) as seen, torch.no_grad():
            logits = vlm.model(**inputs, use_cache=False).logits
        default = log_probs_at_last(vlm, layouts, logits).argmax(-1)
        del logits
    else:
        with record(outputs=names, transform=pick, stop=True) as seen, torch.no_grad():
            vlm.model(**inputs, use_cache=False)
        default = None
    missing = [i for i in lm_layers if f"lm{i}" not in seen]
    if missing:
        raise RuntimeError(f"LM layer(s) {missing} never ran in the forward of {type(vlm.model).__name__}")
    tgt, labels = _targets(targets, B, vocab, default)
    T = tgt.shape[1]

    L = len(lm_layers)
    top_prob = np.full((B, L, R, top_k), np.nan, dtype=np.float32)
    top_token = np.full((B, L, R, top_k), -1, dtype=np.int64)
    t_logp = np.full((B, L, R, T), np.nan, dtype=np.float64)
    t_rank = np.full((B, L, R, T), -1, dtype=np.int64)
    full_lp = np.full((B, L, R, vocab), np.nan, dtype=np.float32) if full else None
    valid = rows_np >= 0
    with torch.no_grad():
        for li, layer in enumerate(lm_layers):
            picked = seen.pop(f"lm{layer}")
            tg = tgt.to(picked.device)
            # the vocabulary distribution exists for `chunk` positions at a time, never for all layers
            for s in range(0, R, chunk):
                e = min(R, s + chunk)
                lp = lens_logits(vlm, picked[:, s:e])
                lp = torch.log_softmax(lp if lp.dtype == torch.float64 else lp.float(), dim=-1)  # (B, r, V)
                v, i = lp.topk(top_k, dim=-1)
                g = torch.gather(lp, 2, tg[:, None, :].expand(B, e - s, T))  # (B, r, T)
                # rank: how many tokens are strictly more likely than the target (0 = top)
                rank = torch.stack([(lp > g[..., t : t + 1]).sum(-1) for t in range(T)], -1)
                top_prob[:, li, s:e] = v.exp().float().cpu().numpy()
                top_token[:, li, s:e] = i.cpu().numpy()
                t_logp[:, li, s:e] = g.double().cpu().numpy()
                t_rank[:, li, s:e] = rank.cpu().numpy()
                if full:
                    full_lp[:, li, s:e] = lp.float().cpu().numpy()
    pad = ~valid[:, None, :, None]
    top_prob = np.where(pad, np.nan, top_prob)
    top_token = np.where(pad, -1, top_token)
    t_logp = np.where(pad, np.nan, t_logp)
    t_rank = np.where(pad, -1, t_rank)

    seq_len = int(inputs["input_ids"].shape[1]) if "input_ids" in inputs else layouts[0].seq_len
    keys = key_coordinates(layouts, seq_len)
    qcoords = {}
    for name, (_, arr) in keys.items():
        arr = np.asarray(arr)
        vals = np.take_along_axis(arr, rows_np.clip(min=0), axis=1)
        fill = "pad" if arr.dtype.kind in "OUS" else -1
        qcoords[name.replace("key_", "query_")] = (("sample", "query"), np.where(valid, vals, fill))
    same = bool((rows_np == rows_np[:1]).all()) and not (~valid).any()
    data = {
        "top_token": (("sample", "layer", "query", "k"), top_token),
        "top_prob": (("sample", "layer", "query", "k"), top_prob),
        "target_logprob": (("sample", "layer", "query", "target"), t_logp),
        "target_prob": (("sample", "layer", "query", "target"), np.exp(t_logp)),
        "target_rank": (("sample", "layer", "query", "target"), t_rank),
        "target_id": (("sample", "target"), tgt.numpy()),
        "query_position": (("sample", "query"), np.where(valid, rows_np, np.nan)),
        **qcoords,
    }
    if full:
        data["logprobs"] = (("sample", "layer", "query", "vocab"), np.where(pad, np.nan, full_lp))
    ds = xr.Dataset(
        data,
        coords={
            "sample": np.arange(B),
            "layer": np.asarray(lm_layers),
            "k": np.arange(top_k),
            "target": labels,
            "query": rows_np[0] if same else np.arange(R),
        },
    )
    ds.attrs.update(
        {
            "model": str(vlm.name),
            "family": str(vlm.family),
            "queries": queries if isinstance(queries, str) else "explicit",
            "query_coordinate": "sequence position" if same else "row index (see query_position)",
            "readout": "final norm + LM head of the model" + (f" + softcap {_softcap(vlm)}" if _softcap(vlm) else ""),
            "targets": "greedy answer at the last position" if targets is None else "given",
        }
    )
    return ds
