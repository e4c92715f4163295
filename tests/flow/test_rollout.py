"""vl.rollout against a float64 reference from HF eager ``output_attentions`` on every tiny family; under a
knockout against an eager reference with the same edges cut; the model's outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.flow import knocked_out, rollout


def _reference_rollout(attentions, layouts):
    """Dense float64 rollout from per-layer (B, H, N, N) weights: head mean, + I, rows renormalised,
    multiplied from layer 0; padding query rows are identity rows."""
    out, prod = [], None
    N = attentions[0].shape[-1]
    for att in attentions:
        a = att.double().mean(1).clone()
        for b, L in enumerate(layouts):
            pad = np.setdiff1d(np.arange(N), L.valid_positions)
            a[b, pad] = 0.0
        a = a + torch.eye(N, dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        prod = a if prod is None else a @ prod
        out.append(prod)
    return torch.stack(out, 1).numpy()  # (B, L, N, N)


def _explicit_attention(blocked: dict | None = None):
    """Float64 eager reference: explicit softmax(QK^T * s) over the keys the eager mask allows (masked_fill,
    so NaN in padding rows, which some families' eager code produces, cannot leak), with ``blocked[id(module)]``
    (B, Q, N) edges removed; returns the weights, so ``output_attentions`` yields them."""
    blocked = blocked or {}

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        s = torch.matmul(query, k.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e30
            s = s.masked_fill(~allowed, float("-inf"))
        if id(module) in blocked:
            s = s.masked_fill(blocked[id(module)][:, None], float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        return torch.matmul(p, v).transpose(1, 2).contiguous(), p

    return fn


def _eager_attentions(vlm, batch, blocked: dict | None = None):
    """The LM's per-layer weights from ``output_attentions`` of a float64 eager reference forward."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register("vtrlab_test_rollout_ref", _explicit_attention(blocked))
    ALL_MASK_ATTENTION_FUNCTIONS.register("vtrlab_test_rollout_ref", eager_mask)
    vlm.model.set_attn_implementation("vtrlab_test_rollout_ref")
    try:
        with torch.no_grad():
            out = vlm.model(**batch.inputs, use_cache=False, output_attentions=True)
    finally:
        vlm.model.set_attn_implementation("sdpa")
    att = out.attentions
    assert len(att) == len(vlm.lm_layers)
    return att, out.logits


def _compare(ds, ref, batch, layers, atol=1e-5):
    for b, L in enumerate(batch.layouts):
        rows = ds.query_position.values[b]
        rows = rows[~np.isnan(rows)].astype(int)
        valid = np.asarray(L.valid_positions)
        got = ds.rollout.values[b][:, : len(rows)][..., valid]
        want = ref[b][layers][:, rows][..., valid]
        np.testing.assert_allclose(got, want, atol=atol)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)  # every row is a distribution over real tokens


def test_rollout_equals_float64_eager_reference(tiny_f64):
    vlm, batch = tiny_f64
    att, _ = _eager_attentions(vlm, batch)
    ref = _reference_rollout(att, batch.layouts)
    n = len(vlm.lm_layers)
    ds = rollout(vlm, batch, queries="question", layers="all")
    assert ds.layer.values.tolist() == list(range(n))
    _compare(ds, ref, batch, list(range(n)))
    last = rollout(vlm, batch, queries="last", layers=[-1])
    assert last.layer.values.tolist() == [n - 1]
    _compare(last, ref, batch, [n - 1])
    assert set(np.unique(ds.key_kind.values)) >= {"image", "text"}


def test_rollout_leaves_outputs_unchanged_and_composes_with_knockout(llava_f64):
    vlm, batch = llava_f64
    with torch.no_grad():
        before = vlm.model(**batch.inputs, use_cache=False).logits
    n = len(vlm.lm_layers)
    cut_layers = [0, 1] if n > 2 else [0]
    N = batch.inputs["input_ids"].shape[1]
    blocked = torch.zeros(len(batch), N, N, dtype=torch.bool)
    for b, L in enumerate(batch.layouts):
        blocked[b, L.last_position, torch.as_tensor(L.image_positions)] = True
    blocked = {id(vlm.adapter.lm_attention(vlm.lm_layers[i])): blocked for i in cut_layers}
    att, _ = _eager_attentions(vlm, batch, blocked)
    ref = _reference_rollout(att, batch.layouts)
    with knocked_out(vlm, batch, keys="image", queries="last", layers=cut_layers):
        ds = rollout(vlm, batch, queries="last", layers="all")
    _compare(ds, ref, batch, list(range(n)))
    plain = rollout(vlm, batch, queries="last", layers="all")
    assert np.nanmax(np.abs(plain.rollout.values - ds.rollout.values)) > 1e-4  # the cut shows
    with torch.no_grad():
        after = vlm.model(**batch.inputs, use_cache=False).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_rollout_bad_input(llava_f64):
    import vtrlab as vl

    vlm, batch = llava_f64
    with pytest.raises(ValueError, match="queries='pixels' is not accepted"):
        rollout(vlm, batch, queries="pixels")
    with pytest.raises(ValueError, match="layers: 99 is not an index"):
        rollout(vlm, batch, layers=[99])
    assert vl.rollout is rollout
