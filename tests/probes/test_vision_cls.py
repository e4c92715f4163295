"""Vision [CLS] rows from the tower's hidden states (vtrlab.probes.vision_cls) against the per-layer path, a
float64 eager reference and the model's own outputs; where it is not exact or does not pay, capture probes the
tower's layers one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vtrlab.probes import engine, vision_cls
from vtrlab.probes import grouped as G
from vtrlab.probes.attention import Site, session

CLS_FAMILIES = ["llava", "llava_next"]  # the CLIP towers among the tiny families


def _tiny(family: str, dtype=torch.float32):
    from tiny_cases import _build

    vlm, batch = _build(family)
    if dtype != torch.float32:
        vlm.model.to(dtype)
        inputs = dict(batch.inputs)
        batch.inputs = {
            k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()
        }
    return vlm, batch


def _eager_vision_rows(vlm, batch) -> dict[int, torch.Tensor]:
    """Each vision layer's [CLS] rows (crops, H, S) from an explicit softmax(QKᵀ·s + mask) run as the model's
    attention (the queries and keys the tower itself computes)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    layer_of = {id(m): i for i, m in enumerate(engine.attention_modules(vlm, vision=True))}
    cls = engine._cls_index(batch.layouts)
    rows: dict[int, torch.Tensor] = {}

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]  # (the LM's grouped KV heads)
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        s = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            s = s + attention_mask
        p = torch.softmax(s, dim=-1)
        if id(module) in layer_of:
            rows[layer_of[id(module)]] = p[:, :, cls].detach()
        return torch.matmul(p, value).transpose(1, 2).contiguous(), p

    AttentionInterface.register("vtrlab_test_vision_ref", fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register("vtrlab_test_vision_ref", eager_mask)
    vlm.model.set_attn_implementation("vtrlab_test_vision_ref")
    try:
        with torch.no_grad():
            vlm.model(**batch.inputs, use_cache=False)
    finally:
        vlm.model.set_attn_implementation("sdpa")
    assert sorted(rows) == list(range(len(vlm.vision_layers)))
    return rows


@pytest.fixture
def plans(monkeypatch):
    """The ClsFromHidden plans capture made (None where it probed the tower's layers one by one); any number of
    encoder sequences allowed unless a test sets MAX_SEQUENCES itself."""
    made = []
    real = vision_cls.plan

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(vision_cls, "plan", spy)
    monkeypatch.setattr(vision_cls, "MAX_SEQUENCES", 64)
    return made


def _capture(vlm, batch, **kwargs):
    return engine.capture(vlm, batch, queries="last", vision=True, **kwargs)


def _per_layer(vlm, batch, monkeypatch, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(vision_cls, "FROM_HIDDEN", False)
        return _capture(vlm, batch, **kwargs)


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_rows_from_hidden_states_equal_the_per_layer_rows_in_float64(family, plans, monkeypatch):
    vlm, batch = _tiny(family, torch.float64)
    got = _capture(vlm, batch)
    assert plans and plans[-1] is not None and plans[-1].calls == 1  # the tower's hook ran, once
    want = _per_layer(vlm, batch, monkeypatch)
    assert plans[-1] is None  # FROM_HIDDEN off: the per-layer path
    np.testing.assert_allclose(got.vision_attn.values, want.vision_attn.values, atol=1e-7, rtol=1e-6, equal_nan=True)
    for name in got.variables:
        if name != "vision_attn":
            assert got[name].equals(want[name]), name


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_rows_equal_a_float64_eager_reference(family, plans):
    """softmax(q_cls · Kᵀ · scale) of each vision layer, from the queries and keys the tower itself ran."""
    vlm, batch = _tiny(family, torch.float64)
    got = _capture(vlm, batch)
    assert plans[-1] is not None
    want = _eager_vision_rows(vlm, batch)  # layer -> (crops, H, S) [CLS] rows
    for b, L in enumerate(batch.layouts):
        t = L.vision.reset_index(drop=True)
        crop, vpos = torch.as_tensor(t["crop"].to_numpy().copy()), torch.as_tensor(t["vpos"].to_numpy().copy())
        for li, layer in enumerate(got.vision_layer.values):
            ref = want[int(layer)][crop, :, vpos].T.numpy()
            np.testing.assert_allclose(got.vision_attn.values[b, li, :, : len(t)], ref, atol=1e-7, rtol=1e-6)


def test_rows_are_computed_when_the_lm_starts(plans, monkeypatch):
    """After the tower (and LLaVA's wait for the device there), before the LM's first recorded layer is held."""
    vlm, batch = _tiny("llava")
    events = []
    add, put = G.LayerGroup.add, engine._ClsSink.put

    def noting_add(self, site, *a, **k):  # noted once held
        add(self, site, *a, **k)
        events.append(site.stream)

    monkeypatch.setattr(G.LayerGroup, "add", noting_add)
    monkeypatch.setattr(engine._ClsSink, "put", lambda self, *a, **k: events.append("cls rows") or put(self, *a, **k))
    _capture(vlm, batch, layers=[1])
    assert plans[-1] is not None and events == ["cls rows", "lm"]
    events.clear()
    _capture(vlm, batch)  # every LM layer: the rows come before the first
    assert events[0] == "cls rows" and set(events[1:]) == {"lm"}


def test_capture_leaves_the_models_outputs_and_hooks_as_they_were(plans):
    vlm, batch = _tiny("llava")
    tower = vlm.adapter.vision_tower(vlm.model)
    with torch.no_grad():
        plain = vlm.model(**batch.inputs, use_cache=False).logits
    pre, post = dict(tower._forward_pre_hooks), dict(tower._forward_hooks)
    seen = []
    handle = vlm.model.register_forward_hook(lambda m, a, out: seen.append(out.logits.detach().clone()))
    try:
        _capture(vlm, batch)
    finally:
        handle.remove()
    assert plans[-1] is not None
    assert dict(tower._forward_pre_hooks) == pre and dict(tower._forward_hooks) == post
    torch.testing.assert_close(seen[0], plain, atol=0, rtol=0)  # the pre-hook only asks for more hidden states
    with torch.no_grad():
        torch.testing.assert_close(vlm.model(**batch.inputs, use_cache=False).logits, plain, atol=0, rtol=0)


def test_a_tower_without_every_hidden_state_raises_and_restores(plans, monkeypatch):
    vlm, batch = _tiny("llava")
    tower = vlm.adapter.vision_tower(vlm.model)

    def no_hidden(_module, args, kwargs):
        kwargs["output_hidden_states"] = False
        return args, kwargs

    monkeypatch.setattr(vision_cls, "_every_hidden_state", no_hidden)
    with pytest.raises(RuntimeError, match=r"returned none hidden states.*FROM_HIDDEN = False"):
        _capture(vlm, batch)
    assert not tower._forward_pre_hooks and not tower._forward_hooks
    assert all(c._attn_implementation == "sdpa" for c in (vlm.model.config, vlm.model.config.vision_config))


def test_more_sequences_than_max_take_the_per_layer_path(plans, monkeypatch):
    """LLaVA-NeXT's crops (10 sequences for two images): above MAX_SEQUENCES the tower's layers are probed."""
    vlm, batch = _tiny("llava_next")
    monkeypatch.setattr(vision_cls, "MAX_SEQUENCES", 2)
    many = _capture(vlm, batch)
    assert plans[-1] is None
    monkeypatch.setattr(vision_cls, "MAX_SEQUENCES", 64)
    few = _capture(vlm, batch)
    assert plans[-1] is not None
    np.testing.assert_allclose(few.vision_attn.values, many.vision_attn.values, atol=1e-6, equal_nan=True)


def test_bfloat16_rows_are_the_per_layer_rows_up_to_rounding(plans, monkeypatch):
    """In bfloat16 the projections are recomputed: a q or k element may round differently in its last bit, so the
    rows agree with the per-layer path (the tower's own q, k) to bfloat16 precision."""
    vlm, batch = _tiny("llava", torch.bfloat16)
    got = _capture(vlm, batch)
    assert plans[-1] is not None
    want = _per_layer(vlm, batch, monkeypatch)
    np.testing.assert_allclose(got.vision_attn.values, want.vision_attn.values, atol=2e-3, rtol=0)


class _WrappedLinear(nn.Linear):
    """A projection of another class (as a quantised or adapter-wrapped one would be)."""


@pytest.mark.parametrize("change", ["projection", "layer_norm", "other_probe", "off"])
def test_towers_it_is_not_exact_for_take_the_per_layer_path(change, monkeypatch, plans):
    vlm, batch = _tiny("llava")
    v_attn = engine.attention_modules(vlm, vision=True)
    want = _capture(vlm, batch)
    assert plans[-1] is not None
    ctx = None
    if change == "projection":
        old = v_attn[1].k_proj
        new = _WrappedLinear(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        monkeypatch.setattr(v_attn[1], "k_proj", new)
    elif change == "layer_norm":
        layer = vlm.vision_layers[0]
        monkeypatch.setattr(layer, "layer_norm1", nn.RMSNorm(layer.layer_norm1.normalized_shape))
    elif change == "other_probe":  # a site that records nothing, already on a vision attention module
        ctx = session({id(v_attn[0]): Site("vision", 0)})
    else:
        monkeypatch.setattr(vision_cls, "FROM_HIDDEN", False)
    if ctx is not None:
        with ctx:
            got = _capture(vlm, batch)
    else:
        got = _capture(vlm, batch)
    assert plans[-1] is None
    if change != "layer_norm":  # the same model: the same rows
        np.testing.assert_allclose(got.vision_attn.values, want.vision_attn.values, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "gemma3"])
def test_towers_without_cls_never_plan(family, plans):
    vlm, batch = _tiny(family)
    _capture(vlm, batch)
    assert plans == []  # no [CLS]: the mean over queries, probed per layer
