"""Capture's per-call host work outside the forward (session 6) builds exactly what it built before.

The Dataset is built by xarray's direct constructor (``engine._dataset``), the key labels with integer codes
(``key_coordinates``), the vision labels in one assignment per column (``engine._vision_labels``) and the
config walk over the modules' ``__dict__`` (``switch._configs``). Each is compared here with the code it
replaced, kept below as the oracle: same variables, values, dtypes, dimension and variable order, indexes and
attrs, on padded batches of every tiny family (anyres / NeXT tiles, packed encoders, separators) with vision on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import xarray as xr
from tiny_cases import _build, _tiny_families

from vtrlab.models import labels
from vtrlab.probes import capture, engine, switch

# --- the code the session-6 fast paths replaced (oracles) ---------------------------------------------------


def _key_coordinates_before(layouts, seq_len):
    B = len(layouts)
    kind = np.full((B, seq_len), labels.KEY_KIND_PAD, dtype=object)
    fields = {name: np.full((B, seq_len), -1, dtype=np.int64) for name in ("image", "tile", "row", "col")}
    for b, L in enumerate(layouts):
        if len(L.valid_positions) and int(np.max(L.valid_positions)) >= seq_len:
            raise ValueError(f"sample {b}'s layout has positions beyond a sequence of {seq_len}")
        kind[b, L.valid_positions] = labels.KEY_KIND_TEXT
        kind[b, L.positions] = L.kind
        for name, arr in fields.items():
            arr[b, L.positions] = getattr(L, name)
    out = {"key_kind": (("sample", "key"), kind.astype(str))}
    out.update({f"key_{name}": (("sample", "key"), arr) for name, arr in fields.items()})
    return out


def _vision_labels_before(host, valid, tables):
    B, V = valid.shape
    values = host.numpy()
    np.moveaxis(values, -1, 1)[~valid] = np.nan
    coords = {}
    for col, fill in engine._VISION_LABELS:
        arr = np.full((B, V), fill, dtype=object if col == "kind" else np.int64)
        for b, t in enumerate(tables):
            arr[b, : len(t[col])] = t[col]
        coords[f"vision_key_{col}"] = (("sample", "vision_key"), arr.astype(str) if col == "kind" else arr)
    return values, coords


def _dataset_before(data, coords, attrs):
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(attrs)
    return ds


def _configs_before(model):
    seen = {}

    def visit(cfg):
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            return
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            visit(getattr(cfg, key, None))

    for module in model.modules():
        cfg = module.__dict__.get("config")
        if cfg is None and hasattr(type(module), "config"):
            cfg = getattr(module, "config", None)
        visit(cfg)
    return list(seen.values())


# --- comparisons ---------------------------------------------------------------------------------------------


def assert_same_dataset(got: xr.Dataset, ref: xr.Dataset) -> None:
    """Identical, and also in what ``identical`` does not look at: dtypes, orders, index types."""
    xr.testing.assert_identical(got, ref)
    assert list(got.variables) == list(ref.variables)
    assert list(got.data_vars) == list(ref.data_vars)
    assert list(got.coords) == list(ref.coords)
    assert list(got.sizes.items()) == list(ref.sizes.items())
    assert {k: v.dtype for k, v in got.variables.items()} == {k: v.dtype for k, v in ref.variables.items()}
    assert [(k, type(v), type(v.index)) for k, v in got.xindexes.items()] == [
        (k, type(v), type(v.index)) for k, v in ref.xindexes.items()
    ]
    for k in ref.xindexes:
        assert got.xindexes[k].index.equals(ref.xindexes[k].index)
        assert got.xindexes[k].index.dtype == ref.xindexes[k].index.dtype
    assert got.attrs == ref.attrs and [type(v) for v in got.attrs.values()] == [type(v) for v in ref.attrs.values()]


def _vision_coords_before(valid, tables):
    """The labels half of the replaced ``_vision_labels`` (capture now pads the values apart from labelling)."""
    B, V = valid.shape
    return _vision_labels_before(torch.zeros(B, 1, V), valid, tables)[1]


@pytest.fixture(scope="module", params=_tiny_families())
def tiny(request):
    return request.param, *_build(request.param)


def _options(batch):
    L0, L1 = batch.layouts
    ragged = [[int(L0.last_position)], [int(L1.valid_positions[0]), int(L1.last_position)]]  # 1 and 2 rows
    return [
        dict(queries="last", vision=False),
        dict(queries="question", vision=True),
        dict(queries=ragged, vision=True, head_mean=True, hidden=True, layers=[0, -1]),
        dict(queries="text", vision=True, heads=[0], dtype="float16", vision_layers=[0]),
    ]


def test_capture_builds_the_dataset_it_built_before(tiny, monkeypatch):
    """Every tiny family's padded batch of two (different image sizes: anyres tiles differ), four option sets."""
    family, vlm, batch = tiny
    assert len(batch.layouts) == 2
    for kw in _options(batch):
        fast = capture(vlm, batch, **kw)
        with monkeypatch.context() as m:
            m.setattr(engine, "_dataset", _dataset_before)
            m.setattr(engine, "key_coordinates", _key_coordinates_before)
            m.setattr(engine, "_vision_coords", _vision_coords_before)
            ref = capture(vlm, batch, **kw)
        assert_same_dataset(fast, ref)
        if kw.get("vision"):
            assert "vision_attn" in fast and fast.sizes["vision_key"] > 0


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_batch_of_eight_with_padding_and_tiles(family):
    """Eight samples of three image sizes and three prompt lengths: LLaVA-NeXT (anyres tiles, newline tokens)
    and Qwen2-VL (packed vision encoder, vision tables of different lengths: padded vision keys)."""
    from tiny_cases import _images

    from vtrlab import testing

    vlm = testing.tiny(family)
    vlm.model.set_attn_implementation("sdpa")
    images = (_images(0) + _images(1)[:1]) * 3
    prompts = ["What color is the circle?", "Where?", "Is there a red square in the picture?"] * 3
    batch = vlm.prepare(images[:8], prompts[:8])
    assert len({int(L.valid_positions.min()) for L in batch.layouts}) > 1  # LM sequences padded
    if family == "llava_next":
        assert {"image", "newline"} <= {str(k) for L in batch.layouts for k in L.kind}
    else:
        assert len({len(L.vision) for L in batch.layouts}) > 1  # vision tables of different lengths
    for kw in (dict(queries="question", vision=True), dict(queries="last", vision=True, head_mean=True)):
        fast = capture(vlm, batch, **kw)
        orig = (engine._dataset, engine.key_coordinates, engine._vision_coords)
        engine._dataset, engine.key_coordinates, engine._vision_coords = (
            _dataset_before,
            _key_coordinates_before,
            _vision_coords_before,
        )
        try:
            ref = capture(vlm, batch, **kw)
        finally:
            engine._dataset, engine.key_coordinates, engine._vision_coords = orig
        assert_same_dataset(fast, ref)


def _assert_same_coords(got: dict, ref: dict) -> None:
    assert list(got) == list(ref)
    for k in ref:
        assert got[k][0] == ref[k][0]
        assert got[k][1].dtype == ref[k][1].dtype, k
        np.testing.assert_array_equal(got[k][1], ref[k][1])


def test_key_coordinates_equal_the_object_array_version(tiny):
    """Label widths follow the labels present: a separator/newline widens key_kind, no pad or no text narrows it."""
    _, _, batch = tiny
    layouts = list(batch.layouts)
    n = layouts[0].seq_len
    L = layouts[0]
    every_real_is_block = dataclasses.replace(L, valid_positions=L.positions.copy())  # no "text" position
    long_kind = dataclasses.replace(L, kind=np.array(["separator"] * len(L.kind), dtype=object))
    no_block = dataclasses.replace(L, positions=L.positions[:0], kind=L.kind[:0], image=L.image[:0],
                                   tile=L.tile[:0], row=L.row[:0], col=L.col[:0])  # fmt: skip
    for case, seq_len in (
        (layouts, n),
        (layouts, n + 3),  # pad positions past every sample
        ([layouts[1]], n),
        ([every_real_is_block], int(L.positions.max()) + 1),  # neither pad nor text: the block's kinds only
        ([every_real_is_block, long_kind], n),
        ([no_block], n),
    ):
        _assert_same_coords(labels.key_coordinates(case, seq_len), _key_coordinates_before(case, seq_len))
    with pytest.raises(ValueError, match="beyond a sequence of"):
        labels.key_coordinates(layouts, int(L.valid_positions.max()))


def test_vision_labels_equal_the_per_sample_version():
    """Tables of different lengths, an empty one (object columns, as an empty DataFrame gives), long kinds."""
    rng = np.random.default_rng(0)

    def table(n, kinds=("cls", "patch")):
        t = {col: rng.integers(-1, 9, n).astype(np.int64) for col, _ in engine._VISION_LABELS if col != "kind"}
        t["kind"] = np.array([kinds[min(i, 1)] for i in range(n)], dtype=object)
        return t

    empty = {col: np.array([], dtype=object) for col, _ in engine._VISION_LABELS}
    for tables in (
        [table(5), table(3), table(5)],
        [table(4), empty],
        [table(4, ("cls", "separator"))],
        [empty, empty],
    ):
        B, V = len(tables), max(len(t["crop"]) for t in tables)
        valid = np.zeros((B, V), dtype=bool)
        for b, t in enumerate(tables):
            valid[b, : len(t["crop"])] = True
        host = torch.rand(B, 2, 3, V)
        got_values, got = engine._vision_labels(host.clone(), valid, tables)
        ref_values, ref = _vision_labels_before(host.clone(), valid, tables)
        np.testing.assert_array_equal(got_values, ref_values)
        _assert_same_coords(got, ref)


def test_direct_constructor_checked_and_public_fallback(monkeypatch):
    """On this xarray the direct constructor matches xr.Dataset (so capture uses it); when it would not,
    capture's Dataset comes from xr.Dataset, the same."""
    assert engine._direct_matches()
    rng = np.random.default_rng(1)
    data = {
        "lm_attn": (("sample", "layer", "head", "query", "key"), rng.random((2, 2, 3, 1, 4), dtype=np.float32)),
        "key_kind": (("sample", "key"), np.array([["pad", "text", "image", "image"]] * 2)),
    }
    coords = {"sample": np.arange(2), "layer": np.asarray([1, 3]), "query": np.asarray([3]), "key": np.arange(4)}
    coords["head"] = np.arange(3)
    attrs = {"model": "m", "head_mean": 0}
    fast = engine._dataset(data, coords, attrs)
    monkeypatch.setattr(engine, "_DIRECT", False)
    assert_same_dataset(engine._dataset(data, coords, attrs), fast)
    assert_same_dataset(fast, _dataset_before(data, coords, attrs))
    bad = dict(data, key_row=(("sample", "key"), np.zeros((2, 5), dtype=np.int64)))  # 5 keys, not 4
    monkeypatch.setattr(engine, "_DIRECT", True)
    with pytest.raises(ValueError, match="key_row has 5 entries along 'key'"):
        engine._dataset(bad, coords, attrs)


def test_config_walk_equals_the_modules_walk(tiny):
    """Same configs in the same order as walking ``model.modules()``, also with a shared submodule, a child
    registered as None and a module whose config is a class-level property."""
    _, vlm, _ = tiny
    model = vlm.model
    ref = _configs_before(model)
    assert [id(c) for c in switch._configs(model)] == [id(c) for c in ref]

    class WithProperty(torch.nn.Module):
        @property
        def config(self):
            return model.config

    tree = torch.nn.Module()
    tree.first = torch.nn.Linear(2, 2)
    tree.none = None
    tree.register_module("empty", None)
    tree.model = model
    tree.again = model  # shared: reached twice
    tree.prop = WithProperty()
    assert [id(c) for c in switch._configs(tree)] == [id(c) for c in _configs_before(tree)]
    assert [id(c) for c in switch._configs(WithProperty())] == [id(c) for c in _configs_before(WithProperty())]


def test_a_dataset_that_copied_the_buffers_is_built_again_after_the_wait(monkeypatch):
    """The Dataset is made before the copies into its host buffers have landed; if the constructor copied those
    buffers (it does not: checked), the values it holds would be stale, so capture builds it again after the
    wait. Simulated with a constructor that copies: the result still has the padded, final values."""
    from vtrlab import testing

    vlm = testing.tiny("qwen2_vl")
    imgs = [np.zeros((40, 56, 3), np.uint8), np.zeros((64, 48, 3), np.uint8)]
    batch = vlm.prepare(imgs, ["What color?", "Where?"])
    want = capture(vlm, batch, queries="question", vision=True)
    assert np.isnan(want["vision_attn"].values).any()  # padded vision keys: NaN written after the wait
    real, calls = engine._dataset, []

    def copying(data, coords, attrs):
        calls.append(1)
        return real({k: (d, np.array(v, copy=True)) for k, (d, v) in data.items()}, coords, attrs)

    monkeypatch.setattr(engine, "_dataset", copying)
    got = capture(vlm, batch, queries="question", vision=True)
    assert len(calls) == 2  # built again
    assert_same_dataset(got, want)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_configs_of_modules_are_the_distinct_ones_in_first_seen_order(family):
    """``_configs(model, modules)`` (read in C): the model's config with its sub-configs, then each distinct
    config of the modules not among them, in the order first seen; a module without a config falls back to the
    full walk."""
    from vtrlab import testing

    vlm = testing.tiny(family)
    mods = engine.attention_modules(vlm, vision=False) + engine.attention_modules(vlm, vision=True)
    model_cfg = vlm.model.config
    head = [model_cfg, *(getattr(model_cfg, k) for k in model_cfg.sub_configs)]  # (tiny configs: one level)
    want = list(head)
    for m in mods:
        if all(m.config is not c for c in want):
            want.append(m.config)
    assert [id(c) for c in switch._configs(vlm.model, mods)] == [id(c) for c in want]
    no_config = torch.nn.Linear(1, 1)
    assert [id(c) for c in switch._configs(vlm.model, [*mods, no_config])] == [
        id(c) for c in switch._configs(vlm.model)
    ]


def test_an_lm_attention_that_runs_twice_is_refused(monkeypatch):
    """Capture expects one attention call per LM layer and forward; a second (a model that calls a layer's
    attention twice) is named, not silently merged."""
    from vtrlab import testing

    vlm = testing.tiny("llava")
    batch = vlm.prepare([np.zeros((40, 40, 3), np.uint8)], ["What color?"])
    attn = engine.attention_modules(vlm, vision=False)[1]
    real = attn.forward

    def twice(*a, **k):
        real(*a, **k)
        return real(*a, **k)

    monkeypatch.setattr(attn, "forward", twice)
    with pytest.raises(RuntimeError, match="LM layer 1's attention ran 2 times"):
        capture(vlm, batch, queries="last", vision=False)
