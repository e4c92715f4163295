"""`apply(vlm, batch, method, keep=)`: which image tokens survive at which stage, as a labelled Dataset.

The record is on the layout's image-token axis ``token`` (per sample, layout order; padded with
``valid == False`` where samples have fewer image tokens), labelled with each token's sequence
position, image, tile, row, col and pixel box. Variables:

* ``kept`` (sample, stage_layer, token) bool — the token is still in the sequence after that stage:
  ``stage_layer = -1`` is the LM input (tower / projector methods), ``k >= 0`` is "from LM layer k on"
  for methods that prune inside the LM.
* ``score`` (sample, stage_layer, token) float — what the method ranked by at that stage (NaN: none).
* ``group`` (sample, token) int — layout index of the kept token it was merged into, -1 if none.
* ``budget`` (sample) int — image tokens entering the LM (pre-LM) or left after the last LM stage.

``attrs``: method, params, stage, positions (kept | renumbered), merges, source.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..models.base import Batch
from .context import ReductionContext, budgets
from .forward import forward_embeds
from .keep import reduced_decoder_inputs
from .registry import Method, Selection, get, prepare
from .stages.lm import LMMethod, lm_removal, pre_lm

LABELS = ("image", "tile", "row", "col", "x0", "y0", "x1", "y1")


def resolve(method: str | Method, params: dict | None = None) -> Method:
    return get(method, **(params or {}))


def select(vlm: Any, batch: Batch, method: Method, keep: Any, decoder_inputs: dict | None = None) -> Selection:
    """Run a pre-LM method's selection with exact per-sample budgets (checked)."""
    return select_in_context(vlm, batch, method, keep, decoder_inputs)[0]


def select_in_context(
    vlm: Any, batch: Batch, method: Method, keep: Any, decoder_inputs: dict | None = None
) -> tuple[Selection, ReductionContext]:
    """:func:`select` and the :class:`ReductionContext` it ran in: its cached ``decoder_inputs`` (when the
    method's signals needed the tower) are the LM inputs of this batch, so the caller need not run the
    tower again (:func:`vtrlab.reduce.answer.generate_ids`)."""
    if method.stage == "lm":
        raise ValueError(f"method {method.name!r} prunes inside the LM; use vtrlab.reduce.stages.lm")
    prepare(method, vlm)
    n_keep = budgets(batch, keep)
    ctx = ReductionContext(vlm, batch, decoder_inputs)
    sel = method.select(ctx, n_keep)
    if len(sel.keep) != len(batch):
        raise RuntimeError(f"method {method.name!r} returned {len(sel.keep)} masks for {len(batch)} samples")
    for i, (m, k, lay) in enumerate(zip(sel.keep, n_keep, batch.layouts)):
        if m.shape != (lay.n_image_tokens,):
            raise RuntimeError(f"method {method.name!r}: sample {i} mask {m.shape} != ({lay.n_image_tokens},)")
        if getattr(method, "exact_budget", True) and int(m.sum()) != k:
            raise RuntimeError(f"method {method.name!r} kept {int(m.sum())} tokens of sample {i}; budget is {k}")
    return sel, ctx


def _json(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return f"<array {v.shape}>"
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], np.ndarray):
        return f"<{len(v)} arrays>"
    return v


def record(
    batch: Batch,
    method: Method,
    stage_layers: list[int],
    kept: list[np.ndarray],
    scores: list[np.ndarray],
    group: list[np.ndarray],
) -> xr.Dataset:
    """Build the Dataset: ``kept[i]``/``scores[i]`` are (n_stage_layers, n_tokens_i), ``group[i]`` (n_tokens_i,)."""
    layouts = batch.layouts
    n_max = max(lay.n_image_tokens for lay in layouts)
    bsz, n_st = len(layouts), len(stage_layers)
    kept_a = np.zeros((bsz, n_st, n_max), dtype=bool)
    score_a = np.full((bsz, n_st, n_max), np.nan)
    group_a = np.full((bsz, n_max), -1, dtype=np.int64)
    valid = np.zeros((bsz, n_max), dtype=bool)
    pos = np.full((bsz, n_max), -1, dtype=np.int64)
    labels = {
        k: np.full(
            (bsz, n_max),
            np.nan if k.startswith(("x", "y")) else -1,
            dtype=float if k.startswith(("x", "y")) else np.int64,
        )
        for k in LABELS
    }
    for i, lay in enumerate(layouts):
        n = lay.n_image_tokens
        img = lay.kind == "image"
        kept_a[i, :, :n] = kept[i]
        score_a[i, :, :n] = scores[i]
        group_a[i, :n] = group[i]
        valid[i, :n] = True
        pos[i, :n] = lay.positions[img]
        for k in LABELS:
            labels[k][i, :n] = getattr(lay, k)[img]
    coords = {
        "sample": np.arange(bsz),
        "stage_layer": np.asarray(stage_layers, dtype=np.int64),
        "token": np.arange(n_max),
        "token_position": (("sample", "token"), pos),
        **{f"token_{k}": (("sample", "token"), v) for k, v in labels.items()},
    }
    last = kept_a[:, -1]
    ds = xr.Dataset(
        {
            "kept": (("sample", "stage_layer", "token"), kept_a),
            "score": (("sample", "stage_layer", "token"), score_a),
            "group": (("sample", "token"), group_a),
            "valid": (("sample", "token"), valid),
            "budget": (("sample",), (last & valid).sum(-1)),
        },
        coords=coords,
    )
    ds.attrs.update(
        {
            "method": method.name,
            "params": json.dumps({k: _json(v) for k, v in method.params.items()}, default=str),
            "stage": method.stage,
            "positions": method.positions,
            "merges": int(method.merges),
            "source": method.source,
            "stage_layer_meaning": "-1: LM input (pre-LM stages); k >= 0: in the sequence from LM layer k on",
        }
    )
    return ds


def apply(vlm: Any, batch: Batch, method: str | Method, keep: float | int = 0.25, **params: Any) -> xr.Dataset:
    """Which image tokens ``method`` keeps on ``batch`` at a budget ``keep`` (ratio in (0, 1] or a
    number of image tokens per sample). ``params`` override the method's defaults when ``method``
    is a name. Returns the record described in the module docstring."""
    m = resolve(method, params)
    if m.stage == "lm":
        return lm_record(vlm, batch, m, keep)
    sel = select(vlm, batch, m, keep)
    kept = [k[None] for k in sel.keep]
    scores = [np.asarray(s, dtype=float)[None] for s in sel.scores]
    return record(batch, m, [-1], kept, scores, list(sel.group))


def lm_record(vlm: Any, batch: Batch, method: LMMethod, keep: Any):
    """The record of :func:`vtrlab.reduce.apply` for an in-LM method: one prefill with removal (and a
    ``stage_layer = -1`` row first where the method also acts before the LM)."""
    pre = pre_lm(vlm, batch, method, keep)
    if pre is None:
        red = reduced_decoder_inputs(vlm, batch, None)
    else:
        red = reduced_decoder_inputs(
            vlm, batch, pre.keep, embeds=pre.embeds, positions=method.positions, extra=pre.info.get("extra")
        )
    with lm_removal(vlm, batch, method, keep, red.source_positions, pre=pre) as state, torch.no_grad():
        forward_embeds(
            vlm,
            red.inputs_embeds,
            red.attention_mask,
            red.position_ids,
            use_cache=False,
            extras=red.per_token,
            last_only=True,
        )
    n_tok = [lay.n_image_tokens for lay in batch.layouts]
    kept = [np.stack([state.kept[j][i] for j in range(len(state.layers))]) for i in range(len(n_tok))]
    scores = [np.stack([state.scores[j][i] for j in range(len(state.layers))]) for i in range(len(n_tok))]
    group = state.group if state.group is not None else [np.full(n, -1, dtype=np.int64) for n in n_tok]
    if pre is None:
        return record(batch, method, list(state.layers), kept, scores, group)
    kept = [np.concatenate([np.asarray(pre.keep[i])[None], k]) for i, k in enumerate(kept)]
    scores = [np.concatenate([np.asarray(pre.scores[i], dtype=float)[None], s]) for i, s in enumerate(scores)]
    return record(batch, method, [-1, *state.layers], kept, scores, list(pre.group))
