"""Extension points in the attention function: knockout and A ⊙ (dO·Vᵀ), against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.flow import knocked_out, knockout, saliency
from vtrlab.probes.switch import _configs


def _float64_inputs(batch):
    """``batch`` with its floating inputs (pixels) in float64, for the float64 model."""
    batch.inputs = {
        k: (v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in dict(batch.inputs).items()
    }
    return batch


def _tiny64(family: str):
    from tiny_cases import _build

    vlm, batch = _build(family)
    vlm.model.to(torch.float64)
    return vlm, _float64_inputs(batch)


def _families():
    from tiny_cases import _tiny_families

    return [f for f in _tiny_families() if f != "organism"]


@pytest.fixture(scope="module", params=_families())
def tiny64(request):
    return _tiny64(request.param)


def _ref_attention(blocked: dict, kept: dict | None = None):
    """Float64 eager reference: explicit softmax(QKᵀ·s + mask) with `blocked[id(module)]` (B, Q, N)
    edges removed; keeps each call's probabilities (with grad) in `kept`."""

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        s = torch.matmul(query, k.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            s = s + attention_mask  # eager masks are additive
        b = blocked.get(id(module))
        if b is not None:
            s = s.masked_fill(b[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        if kept is not None and id(module) in kept:
            p.retain_grad()
            kept[id(module)].append(p)
        return torch.matmul(p, v).transpose(1, 2).contiguous(), p

    return fn


def _run_reference(vlm, batch, fn, grad=False):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register("vtrlab_test_ref", fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register("vtrlab_test_ref", eager_mask)
    vlm.model.set_attn_implementation("vtrlab_test_ref")
    try:
        with torch.set_grad_enabled(grad):
            return vlm.model(**batch.inputs, use_cache=False).logits
    finally:
        vlm.model.set_attn_implementation("sdpa")


def test_knockout_equals_float64_reference(tiny64):
    vlm, batch = tiny64
    layers = [0, len(vlm.lm_layers) - 1]
    N = batch.inputs["input_ids"].shape[1]
    blocked = {}
    for i in layers:
        m = torch.zeros(len(batch), N, N, dtype=torch.bool)
        for b, L in enumerate(batch.layouts):
            m[b, L.last_position, torch.as_tensor(L.image_positions)] = True
        blocked[id(vlm.adapter.lm_attention(vlm.lm_layers[i]))] = m
    ref = _run_reference(vlm, batch, _ref_attention(blocked))
    with knocked_out(vlm, batch, keys="image", queries="last", layers=layers), torch.no_grad():
        got = vlm.model(**batch.inputs, use_cache=False).logits
    plain = _run_reference(vlm, batch, _ref_attention({}))
    last = [L.last_position for L in batch.layouts]
    rows = torch.arange(len(batch))
    for b, L in enumerate(batch.layouts):  # padded rows are undefined in every implementation
        valid = torch.as_tensor(L.valid_positions)
        torch.testing.assert_close(got[b, valid], ref[b, valid], atol=1e-10, rtol=1e-10)
    # the cut matters at the last row, and only there (no other query lost an edge)
    assert (got[rows, last] - plain[rows, last]).abs().max() > 1e-6
    for b, L in enumerate(batch.layouts):
        others = torch.as_tensor(np.setdiff1d(L.valid_positions, [L.last_position]))
        torch.testing.assert_close(got[b, others], plain[b, others], atol=1e-10, rtol=1e-10)
    # the verb: log-probs at the last position, with and without the cut, and what was cut
    ds = knockout(vlm, batch, keys="image", queries="last", layers=layers)
    ref_lp = torch.log_softmax(ref[rows, last], -1)
    plain_lp = torch.log_softmax(plain[rows, last], -1)
    np.testing.assert_allclose(ds.logprobs.values, ref_lp.numpy(), atol=1e-9)
    np.testing.assert_allclose(ds.logprobs_clean.values, plain_lp.numpy(), atol=1e-9)
    tgt = plain_lp.argmax(-1)
    assert ds.target.values.tolist() == tgt.tolist()
    np.testing.assert_allclose(ds.logprob.values, ref_lp[rows, tgt].numpy(), atol=1e-9)
    np.testing.assert_allclose(ds.delta.values, (ref_lp[rows, tgt] - plain_lp[rows, tgt]).numpy(), atol=1e-9)
    assert ds.layer.values.tolist() == layers
    for b, L in enumerate(batch.layouts):
        assert np.flatnonzero(ds.cut_query.values[b]).tolist() == [L.last_position]
        assert np.flatnonzero(ds.cut_key.values[b]).tolist() == sorted(L.image_positions.tolist())
        assert (ds.key_kind.values[b][ds.cut_key.values[b]] == "image").all()


def test_knockout_restores_and_rejects_empty_rows(tiny64):
    vlm, batch = tiny64
    impls = [(c, c._attn_implementation) for c in _configs(vlm.model)]
    with pytest.raises(ValueError, match="no key to attend to"):
        knockout(vlm, batch, keys="all", queries="last", layers=[0])
    assert all(c._attn_implementation == impl for c, impl in impls)
    with pytest.raises(ValueError, match="keys='pixels' is not accepted"):
        knockout(vlm, batch, keys="pixels")
    with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
        assert vlm.model.config.text_config._attn_implementation == "vtrlab_sdpa"
    assert all(c._attn_implementation == impl for c, impl in impls)


def test_attention_saliency_equals_float64_autograd(tiny64):
    vlm, batch = tiny64
    ds = saliency(vlm, batch, queries="question", layers="all")
    kept = {id(vlm.adapter.lm_attention(layer)): [] for layer in vlm.lm_layers}
    logits = _run_reference(vlm, batch, _ref_attention({}, kept), grad=True)
    last = torch.as_tensor([L.last_position for L in batch.layouts])
    logp = torch.log_softmax(logits[torch.arange(len(batch)), last], -1)
    assert torch.equal(logp.argmax(-1), torch.as_tensor(ds.target.values))
    logp.gather(1, torch.as_tensor(ds.target.values)[:, None]).sum().backward()
    vlm.model.zero_grad(set_to_none=True)
    for li, layer in enumerate(vlm.lm_layers):
        (p,) = kept[id(vlm.adapter.lm_attention(layer))]
        ref = (p * p.grad).detach()  # (B, H, N, N): the float64 oracle, N×N on purpose
        for b, L in enumerate(batch.layouts):
            q = torch.as_tensor(L.question_positions)
            got = ds.attn_grad.values[b, li, :, : len(q)]
            np.testing.assert_allclose(got, ref[b][:, q].numpy(), atol=1e-6, rtol=1e-5)
            np.testing.assert_allclose(
                ds.saliency.values[b, li, : len(q)], ref[b][:, q].sum(0).abs().numpy(), atol=1e-6, rtol=1e-5
            )
    assert all(p.grad is None for p in vlm.model.parameters())


def test_saliency_restores_when_it_raises(tiny64):
    vlm, batch = tiny64
    impls = [(c, c._attn_implementation) for c in _configs(vlm.model)]
    with pytest.raises(ValueError, match="target has 3 token ids for a batch of 2"):
        saliency(vlm, batch, queries="last", target=[1, 2, 3])  # refused before any forward
    with pytest.raises(ValueError, match="no key to attend to"):  # raised inside the forward, in the session
        with knocked_out(vlm, batch, keys="all", queries="last", layers=[0]):
            saliency(vlm, batch, queries="last")
    assert all(c._attn_implementation == impl for c, impl in impls)
    from vtrlab.probes.attention import current_session

    assert current_session() is None
    assert all(p.grad is None for p in vlm.model.parameters())


def test_saliency_inside_knocked_out_equals_float64_autograd_with_the_cut(tiny64):
    vlm, batch = tiny64
    N = batch.inputs["input_ids"].shape[1]
    blocked = {}
    m = torch.zeros(len(batch), N, N, dtype=torch.bool)
    for b, L in enumerate(batch.layouts):
        m[b, L.last_position, torch.as_tensor(L.image_positions)] = True
    blocked[id(vlm.adapter.lm_attention(vlm.lm_layers[0]))] = m
    with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
        ds = saliency(vlm, batch, queries="last", layers="all")
    kept = {id(vlm.adapter.lm_attention(layer)): [] for layer in vlm.lm_layers}
    logits = _run_reference(vlm, batch, _ref_attention(blocked, kept), grad=True)
    last = torch.as_tensor([L.last_position for L in batch.layouts])
    logp = torch.log_softmax(logits[torch.arange(len(batch)), last], -1)
    assert torch.equal(logp.argmax(-1), torch.as_tensor(ds.target.values))
    logp.gather(1, torch.as_tensor(ds.target.values)[:, None]).sum().backward()
    vlm.model.zero_grad(set_to_none=True)
    for li, layer in enumerate(vlm.lm_layers):
        (p,) = kept[id(vlm.adapter.lm_attention(layer))]
        ref = (p * p.grad).detach()
        for b, L in enumerate(batch.layouts):
            got = ds.attn_grad.values[b, li, :, 0]
            np.testing.assert_allclose(got, ref[b][:, L.last_position].numpy(), atol=1e-6, rtol=1e-5)
            if li == 0:  # the cut edges carry no attention, so no saliency
                assert np.all(got[:, L.image_positions] == 0)


@pytest.mark.parametrize(
    "target, match",
    [
        ([10**9, 1], "token id 1000000000 is outside the vocabulary"),
        ([-1, 1], "token id -1 is outside the vocabulary"),
        ([1.5, 2.0], "holds float64 values, not token ids"),
        ("yes", "target='yes' is a string"),
        ([True, False], "holds bool values"),
        ([[1, 2], [3, 4]], r"target of shape \(2, 2\)"),
    ],
)
def test_saliency_refuses_bad_targets(tiny64, target, match):
    vlm, batch = tiny64
    with pytest.raises(ValueError, match=match):
        saliency(vlm, batch, target=target)
    with pytest.raises(ValueError, match=match):
        knockout(vlm, batch, target=target)


def test_saliency_refuses_inference_mode_and_ignores_frozen_parameters(tiny64):
    vlm, batch = tiny64
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.inference_mode"):
        saliency(vlm, batch)
    want = saliency(vlm, batch, layers=[0, 1])
    flags = [p.requires_grad for p in vlm.model.parameters()]
    vlm.model.requires_grad_(False)  # dL/dA is a gradient w.r.t. activations: frozen weights change nothing
    try:
        got = saliency(vlm, batch, layers=[0, 1])
        assert all(not p.requires_grad for p in vlm.model.parameters())  # the caller's flags are restored
    finally:
        for p, f in zip(vlm.model.parameters(), flags):
            p.requires_grad_(f)
    np.testing.assert_array_equal(got.attn_grad.values, want.attn_grad.values)
    with torch.no_grad():  # no_grad around the call is fine: saliency enables grad itself
        ds = saliency(vlm, batch, layers=[0])
    assert np.isfinite(ds.saliency.values[:, :, 0]).all()
    assert torch.is_grad_enabled() and [p.requires_grad for p in vlm.model.parameters()] == flags


def test_saliency_of_later_layers_equals_those_of_all_layers(tiny64):
    """The graph starts at the first chosen layer's input: a later start gives the same A ⊙ ∂L/∂A there
    (the float64 oracle above checks layers='all', whose graph starts at layer 0)."""
    vlm, batch = tiny64
    last = len(vlm.lm_layers) - 1
    every = saliency(vlm, batch, layers="all")
    late = saliency(vlm, batch, layers=[last])
    np.testing.assert_allclose(late.attn_grad.values[:, 0], every.attn_grad.values[:, last], rtol=1e-12, atol=1e-14)
