"""vtrlab.capture: rows equal HF eager attention, outputs unchanged, everything restored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from tiny_cases import (
    _build,
    _tiny_families,
    tiny_llava,
    tiny_llava_batch,
)

import vtrlab
from vtrlab.probes import ATTN_NAME, capture, load, save
from vtrlab.probes.switch import _configs

TOL = 1e-5


@pytest.fixture(scope="module", params=_tiny_families())
def tiny(request):
    return request.param, *_build(request.param)


def _recording_eager(store: dict):
    """An attention function that runs the module's own HF eager code and keeps its weights."""
    import sys

    def fn(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        store.setdefault(id(module), []).append(weights.detach())
        return out, weights

    return fn


def _eager_reference(vlm, batch):
    """LM attentions (HF eager, output_attentions) and, per vision layer, the eager weights of every
    call of its attention (packed encoders call it once per image or window)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    model = vlm.model
    calls: dict[int, list] = {}
    AttentionInterface.register("vtrlab_test_eager", _recording_eager(calls))
    ALL_MASK_ATTENTION_FUNCTIONS.register("vtrlab_test_eager", eager_mask)
    model.set_attn_implementation("vtrlab_test_eager")
    try:
        with torch.no_grad():
            out = model(**batch.inputs, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    lm = [a.detach() for a in out.attentions]
    vision = []
    for layer in vlm.vision_layers:
        pieces = calls[id(vlm.adapter.vision_attention(layer))]
        if vlm.has_cls:
            cls = int(batch.layouts[0].vision.query("kind == 'cls'")["vpos"].iloc[0])
            vision.append(torch.cat([w[:, :, cls] for w in pieces], dim=-1))
        else:
            vision.append(torch.cat([w.mean(2) for w in pieces], dim=-1))  # mean over each call's queries
    return lm, vision


@pytest.fixture(scope="module")
def eager(tiny):
    _, vlm, batch = tiny
    return _eager_reference(vlm, batch)


@pytest.mark.parametrize("queries", ["last", "question", "text", "all", "image", [-1, -3], "per-sample"])
def test_queries_equal_hf_eager(tiny, eager, queries):
    _, vlm, batch = tiny
    lm_ref, _ = eager
    if queries == "per-sample":
        queries = [L.question_positions[:2].tolist() for L in batch.layouts]
    ds = capture(vlm, batch, queries=queries, vision=False)
    assert ds.lm_attn.dims == ("sample", "layer", "head", "query", "key")
    checked = 0
    for b in range(len(batch)):
        qpos = ds.query_position.values[b]
        for qi, p in enumerate(qpos):
            if np.isnan(p):
                assert np.isnan(ds.lm_attn.values[b, :, :, qi]).all()
                continue
            for li, layer in enumerate(ds.layer.values):
                ref = lm_ref[layer][b, :, int(p)].numpy()
                got = ds.lm_attn.values[b, li, :, qi]
                np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
                checked += 1
    assert checked >= len(batch) * len(ds.layer)


def test_layers_heads_subset_and_head_mean(tiny, eager):
    _, vlm, batch = tiny
    lm_ref, _ = eager
    n_layers = len(vlm.lm_layers)
    ds = capture(vlm, batch, queries="last", layers=[-1, 0], heads=[1, 0], vision=False)
    assert ds.layer.values.tolist() == [0, n_layers - 1]
    assert ds["head"].values.tolist() == [0, 1]
    for b, L in enumerate(batch.layouts):
        for li, layer in enumerate(ds.layer.values):
            np.testing.assert_allclose(
                ds.lm_attn.values[b, li, :, 0], lm_ref[layer][b, :2, L.last_position].numpy(), atol=TOL
            )
    dm = capture(vlm, batch, queries="last", head_mean=True, vision=False)
    assert "head" not in dm.lm_attn.dims
    for b, L in enumerate(batch.layouts):
        ref = torch.stack([a[b, :, L.last_position].mean(0) for a in lm_ref]).numpy()
        np.testing.assert_allclose(dm.lm_attn.values[b, :, 0], ref, atol=TOL)


def test_vision_attention_equals_hf_eager(tiny, eager):
    _, vlm, batch = tiny
    _, vis_ref = eager
    ds = capture(vlm, batch, queries="last", vision=True)
    tables = [L.vision.reset_index(drop=True) for L in batch.layouts]
    # packed encoders (one sequence for the whole batch): crop c starts after all tokens of crops < c
    counts = pd.concat(tables)["crop"].value_counts().sort_index()
    start = dict(zip(counts.index, np.r_[0, np.cumsum(counts.to_numpy())[:-1]]))
    checked = 0
    for b, t in enumerate(tables):
        for li, layer in enumerate(ds.vision_layer.values):
            ref = vis_ref[int(layer)]  # (crops, H, S) or (1, H, S_total)
            crop, vpos = t["crop"].to_numpy().copy(), t["vpos"].to_numpy().copy()
            if ref.shape[0] == 1 and len(start) > 1:
                vpos, crop = vpos + np.array([start[c] for c in crop]), np.zeros_like(crop)
            want = ref[torch.as_tensor(crop), :, torch.as_tensor(vpos)].T.numpy()
            np.testing.assert_allclose(ds.vision_attn.values[b, li, :, : len(t)], want, atol=TOL)
            assert np.isnan(ds.vision_attn.values[b, li, :, len(t) :]).all()
            checked += 1
    assert checked == len(tables) * len(vlm.vision_layers)


def test_key_labels_come_from_layout(tiny):
    _, vlm, batch = tiny
    ds = capture(vlm, batch, queries="last", vision=False)
    for b, L in enumerate(batch.layouts):
        kinds = ds.key_kind.values[b]
        assert (kinds[L.positions] == L.kind).all()
        np.testing.assert_array_equal(ds.key_row.values[b, L.positions], L.row)
        np.testing.assert_array_equal(ds.key_col.values[b, L.positions], L.col)
        pad = np.setdiff1d(np.arange(L.seq_len), L.valid_positions)
        assert (kinds[pad] == "pad").all()
        assert (kinds[L.text_positions] == "text").all()


def _all_hooks(model):
    """Hooks on the model, less transformers' own output recorders: transformers installs those
    once, lazily and for good, on the first call that asks for hidden states or attentions, so
    whether they appear during a test depends on which test touched the shared model first."""

    def ours(hook) -> bool:
        fn = getattr(hook, "func", hook)  # functools.partial
        return not getattr(fn, "__module__", "").startswith("transformers.")

    return sum(
        sum(map(ours, (*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values())))
        for m in model.modules()
    )


def test_logits_unchanged_and_state_restored(tiny):
    _, vlm, batch = tiny
    model = vlm.model
    impls = [(c, c._attn_implementation) for c in _configs(model)]
    hooks = _all_hooks(model)
    with torch.no_grad():
        plain = model(**batch.inputs, use_cache=False).logits
    seen = {}
    h = vlm.adapter.lm_head(model).register_forward_hook(lambda m, a, o: seen.setdefault("logits", o.detach()))
    try:
        capture(vlm, batch, queries="all", vision=True, hidden=True)
    finally:
        h.remove()
    assert torch.equal(seen["logits"], plain)
    assert all(c._attn_implementation == impl for c, impl in impls)
    assert _all_hooks(model) == hooks


def test_restored_when_forward_raises(tiny):
    _, vlm, batch = tiny
    model = vlm.model
    impls = [(c, c._attn_implementation) for c in _configs(model)]
    hooks = _all_hooks(model)

    def boom(*_):
        assert model.config.text_config._attn_implementation == ATTN_NAME  # raised *inside* the switch
        raise RuntimeError("boom")

    h = vlm.lm_layers[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture(vlm, batch, queries="last", hidden=True)
    finally:
        h.remove()
    assert all(c._attn_implementation == impl for c, impl in impls)
    assert _all_hooks(model) == hooks
    assert vtrlab.probes.attention.current_session() is None


def test_hidden_norms_equal_hidden_states(tiny):
    _, vlm, batch = tiny
    ds = capture(vlm, batch, queries="last", vision=False, hidden=True, layers=[0])
    with torch.no_grad():
        out = vlm.model(**batch.inputs, output_hidden_states=True, use_cache=False)
    ref = out.hidden_states[1].norm(dim=-1).numpy()
    np.testing.assert_allclose(ds.hidden_norm.values[:, 0], ref, rtol=1e-5)


def test_netcdf_roundtrip_opens_with_xarray(tiny, tmp_path):
    _, vlm, batch = tiny
    _check_roundtrip(vlm, batch, tmp_path, "float32", None)


@pytest.mark.parametrize("dtype, engine", [("float16", None), ("float32", "scipy")])
def test_netcdf_storage_variants(tmp_path, dtype, engine):
    # the storage variants do not depend on the family: checked once, on the directly built LLaVA
    vlm = tiny_llava()
    _check_roundtrip(vlm, tiny_llava_batch(vlm, n=2), tmp_path, dtype, engine)


def _check_roundtrip(vlm, batch, tmp_path, dtype, engine):
    ds = capture(vlm, batch, queries="question", dtype=dtype, hidden=True)
    assert ds.lm_attn.dtype == np.dtype(dtype)
    path = save(ds, tmp_path / "cap.nc", engine=engine)
    assert [p.name for p in tmp_path.iterdir()] == ["cap.nc"]  # no temp file left behind
    with xr.open_dataset(path) as raw:  # xarray alone: float16 comes back as exact float32
        raw = raw.load()
    as32 = ds.copy()
    for name, var in ds.data_vars.items():
        if var.dtype == np.float16:
            as32[name] = var.astype(np.float32)
    np.testing.assert_array_equal(raw.lm_attn.values, as32.lm_attn.values)
    xr.testing.assert_equal(raw.drop_vars(list(as32.data_vars)), as32.drop_vars(list(as32.data_vars)))
    for name in as32.data_vars:  # netCDF-3 may store int64 labels as int32
        np.testing.assert_array_equal(raw[name].values, as32[name].values)
    back = load(path)
    xr.testing.assert_equal(back, ds)
    assert back.lm_attn.dtype == ds.lm_attn.dtype and back.attrs == ds.attrs


def test_padding_side_right_matches_eager():
    vlm = tiny_llava(seed=1)
    batch = tiny_llava_batch(vlm, n=2, padding="right", prompts=("Hi?", "What shape is left of the circle?"))
    lm_ref, vis_ref = _eager_reference(vlm, batch)
    ds = capture(vlm, batch, queries="last", vision=False)
    assert ds.attrs["query_coordinate"].startswith("sequence position") is False
    for b, L in enumerate(batch.layouts):
        assert ds.query_position.values[b, 0] == L.last_position
        for li in range(len(ds.layer)):
            np.testing.assert_allclose(
                ds.lm_attn.values[b, li, :, 0], lm_ref[li][b, :, L.last_position].numpy(), atol=TOL
            )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"queries": "first"}, "queries='first' is not accepted"),
        ({"queries": [10_000]}, r"queries: position\(s\) \[10000\]"),
        ({"queries": [1.5]}, r"queries: 1.5 is not an integer position"),
        ({"queries": [True]}, r"queries: True is not an integer position"),
        ({"queries": 2.0}, r"queries=2.0 is not accepted"),
        ({"layers": True}, r"layers=True is not accepted"),
        ({"layers": [1.0]}, r"layers: 1.0 is not an index"),
        ({"heads": "all"}, r"heads='all' is not accepted"),
        ({"layers": [99]}, "layers: 99 is not an index"),
        ({"layers": "some"}, "layers='some' is not accepted"),
        ({"heads": [999]}, "heads: 999 is not an index"),
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"vision_layers": [5]}, "vision_layers: 5"),
    ],
)
def test_bad_arguments_name_the_value(tiny, kwargs, match):
    _, vlm, batch = tiny
    with pytest.raises(ValueError, match=match):
        capture(vlm, batch, **kwargs)


def test_refuses_non_sdpa_model():
    vlm = tiny_llava(attn_implementation="eager")
    batch = tiny_llava_batch(vlm, n=1)
    with pytest.raises(ValueError, match="'eager'"):
        capture(vlm, batch)
    assert vlm.model.config.text_config._attn_implementation == "eager"


def test_public_name_is_callable():
    vlm = tiny_llava()
    batch = tiny_llava_batch(vlm, n=1)
    ds = vtrlab.capture(vlm, batch, queries="last", vision=False)
    np.testing.assert_allclose(ds.lm_attn.sum("key").values, 1.0, atol=1e-5)


def test_sliding_window_layers_equal_eager():
    """Gemma3's local layers: a window shorter than the sequence, so the sliding mask matters."""
    vlm, batch = _build("gemma3")
    tc = vlm.model.config.text_config
    tc.sliding_window = 8
    for layer in vlm.lm_layers:
        attn = vlm.adapter.lm_attention(layer)
        if getattr(attn, "sliding_window", None):
            attn.sliding_window = 8
    assert "sliding_attention" in tc.layer_types and batch.inputs["input_ids"].shape[1] > 8
    lm_ref, _ = _eager_reference(vlm, batch)
    ds = capture(vlm, batch, queries="all", vision=False)
    for b, L in enumerate(batch.layouts):
        pos = np.asarray(L.valid_positions)
        for li, kind in enumerate(tc.layer_types):
            got = ds.lm_attn.values[b, li][:, : len(pos)]
            np.testing.assert_allclose(got, lm_ref[li][b][:, pos].numpy(), atol=TOL)
            if kind == "sliding_attention":  # text rows see at most the last 8 keys
                far = got[:, -1, : pos[-1] - 8 + 1]
                assert np.allclose(far, 0.0)
