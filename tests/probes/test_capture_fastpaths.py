"""The session-5 fast paths of capture, each against the computation it replaces (float64 references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_capture_rows import _inputs, _Module, _ref_probs

from vtrlab.probes import attention as A
from vtrlab.probes import engine


def test_last_row_plan_adds_no_bias_and_equals_reference():
    """Causal, no mask, every row the last position: the bias is all zeros, so none is built or added."""
    q, k = _inputs(3)
    B, H, N, D = q.shape
    last = A.RowPlan.build(np.full((B, 1), N - 1), "cpu")
    assert last.bias(None, True, N) is None
    other = A.RowPlan.build(np.array([[N - 1], [N - 2]]), "cpu")  # one row that must not see the last key
    assert other.bias(None, True, N) is not None
    ref = _ref_probs(q, k, None, 0.3, True)
    for plan in (last, other):
        got = A.row_probabilities(_Module(), q, k, None, 0.3, True, plan.rows, plan=plan)
        for b in range(B):
            r = int(plan.rows_host[b, 0])
            torch.testing.assert_close(got[b, :, 0].double(), ref[b, :, r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["causal", "additive"])
def test_probabilities_written_into_a_given_buffer(mask_kind):
    q, k = _inputs(4)
    B, H, N, D = q.shape
    mask = None
    if mask_kind == "additive":
        allowed = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
        allowed[1, :, :, :2] = False
        allowed[1, :, :2, 0] = True
        mask = torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)
    rows = np.array([[N - 1, 4], [7, -1]])
    plan = A.RowPlan.build(rows, "cpu")
    out = torch.full((B, H, 2, N), 7.0)
    got = A.row_probabilities(_Module(), q, k, mask, 0.3, mask is None, plan.rows, plan=plan, out=out)
    assert got.data_ptr() == out.data_ptr()
    fresh = A.row_probabilities(_Module(), q, k, mask, 0.3, mask is None, plan.rows, plan=plan)
    torch.testing.assert_close(out, fresh, equal_nan=True)
    assert torch.isnan(out[1, :, 1]).all()  # the padded row


def test_to_device_copies_values_and_dtype():
    arr = np.array([[3, -1], [0, 5]], dtype=np.int64)
    t = A.to_device(arr, "cpu")
    assert t.dtype == torch.int64 and t.tolist() == arr.tolist()
    plan = A.RowPlan.build(arr, torch.device("cpu"))
    assert plan.padded and plan.rows_host.tolist() == arr.tolist()


def test_vision_gather_then_labels_equal_a_host_gather():
    """The split vision table (device gather at launch, labels at build) against numpy fancy indexing."""
    import pandas as pd

    class L:
        def __init__(self, n):
            self.vision = pd.DataFrame(
                {
                    "kind": ["cls"] + ["patch"] * (n - 1),
                    "crop": [0] * n,
                    "vpos": np.arange(n),
                    "image": [0] * n,
                    "tile": [0] * n,
                    "row": np.arange(n) // 2,
                    "col": np.arange(n) % 2,
                }
            )

    layouts = [L(5), L(3)]
    g = torch.Generator().manual_seed(0)
    probs = {i: torch.rand(2, 3, 5, generator=g) for i in (0, 2)}  # (crops, H, S)
    for head_mean in (False, True):
        values, coords = engine._vision_labels(*engine._vision_gather(layouts, probs, [0, 2], head_mean, np.float32))
        for b, n in enumerate((5, 3)):
            ref = np.stack([probs[i][0].numpy()[:, :n] for i in (0, 2)])  # (L, H, n): every sample reads crop 0
            ref = ref.mean(1) if head_mean else ref
            np.testing.assert_allclose(values[b, ..., :n], ref, rtol=1e-6)
            assert np.isnan(values[b, ..., n:]).all()
        assert coords["vision_key_kind"][1][1].tolist() == ["cls", "patch", "patch", "pad", "pad"]
        assert coords["vision_key_row"][1][1].tolist() == [0, 0, 1, -1, -1]
        old = engine._vision_table(layouts, probs, [0, 2], head_mean=head_mean)
        np.testing.assert_array_equal(old[0], values)


# --- session 7: the vision [CLS] table without an index or a second stack, the Datasets' shared indexes ---------


def _batch(vlm, n: int, seed: int = 0):
    """``n`` (at most 2) differently sized images with prompts of different lengths (tiny_cases' images)."""
    from tiny_cases import _images

    return vlm.prepare(_images(seed)[:n], ["What is it?", "Describe the picture"][:n])


def test_identity_gather_is_exactly_each_samples_own_sequence():
    B, V = 3, 4
    index = np.stack([np.repeat(np.arange(B)[:, None], V, 1), np.tile(np.arange(V), (B, 1))])
    valid = np.ones((B, V), dtype=bool)
    assert engine._identity_gather(index, valid, B, V, packed=False)
    for changed in ("crop", "vpos", "valid", "short", "packed"):
        idx, ok, n_seq, S, packed = index.copy(), valid.copy(), B, V, False
        if changed == "crop":
            idx[0, 1, 2] = 0  # sample 1 reads sample 0's sequence at one token
        elif changed == "vpos":
            idx[1, 2] = idx[1, 2][::-1]  # sample 2's tokens in another order
        elif changed == "valid":
            ok[0, -1] = False  # a sample with fewer tokens (NaN padding)
        elif changed == "short":
            S = V + 1  # the tables list fewer tokens than the encoder ran
        else:
            packed = True
        assert not engine._identity_gather(idx, ok, n_seq, S, packed), changed


@pytest.mark.parametrize(
    "family, head_mean, options",
    [
        ("llava", False, {}),
        ("llava", True, {}),
        ("llava", False, {"vision_layers": [1], "dtype": "float16"}),
        ("llava_next", False, {}),
        ("llava", False, {"vision_layers": [1]}),
        ("llava_next", False, {}),
        ("llava_next", True, {"vision_layers": [0]}),
    ],
)
def test_vision_table_fast_paths_equal_the_indexed_per_layer_gather(monkeypatch, family, head_mean, options):
    """LLaVA-1.5 (one crop per image) sends its one flush's block straight to the host (float32, every head), or
    takes the identity view of the flush's own stack; LLaVA-NeXT (five crops) the index. Forcing the general
    path (per-layer stack, index gather) gives the same Dataset, bit for bit."""
    from vtrlab import testing
    from vtrlab.probes import grouped

    vlm = testing.tiny(family)
    batch = _batch(vlm, 2)
    seen = {"identity": [], "stacked": [], "own": []}
    identity, stacked, own = engine._identity_gather, grouped.SiteLists.stacked, engine._own_sequences

    def spy_own(*a):
        seen["own"].append(own(*a))
        return seen["own"][-1]

    monkeypatch.setattr(engine, "_own_sequences", spy_own)

    def spy_identity(*a):
        seen["identity"].append(identity(*a))
        return seen["identity"][-1]

    def spy_stacked(self, layers):
        out = stacked(self, layers)
        seen["stacked"].append(out is not None)
        return out

    monkeypatch.setattr(engine, "_identity_gather", spy_identity)
    monkeypatch.setattr(grouped.SiteLists, "stacked", spy_stacked)
    fast = engine.capture(vlm, batch, queries="last", vision=True, head_mean=head_mean, **options)
    assert fast.sizes["vision_layer"] == len(options.get("vision_layers", vlm.vision_layers))
    direct_sink = not head_mean and options.get("dtype", "float32") == "float32"  # else SiteLists
    if direct_sink and family == "llava":
        assert seen == {"identity": [], "stacked": [], "own": [True]}  # straight to the host
    else:
        assert seen["own"] == ([False] if direct_sink else [])
        assert seen["identity"] == [family == "llava"] and seen["stacked"] == [True]
    monkeypatch.setattr(engine, "_own_sequences", lambda *a: False)
    monkeypatch.setattr(engine, "_identity_gather", lambda *a: False)
    monkeypatch.setattr(grouped.SiteLists, "stacked", lambda self, layers: None)
    slow = engine.capture(vlm, batch, queries="last", vision=True, head_mean=head_mean, **options)
    assert fast.identical(slow)
    # and against the vision rows computed one layer at a time, outside any group (float64 reference elsewhere)
    monkeypatch.setattr(grouped, "GROUP_MAX_BYTES", 1)
    alone = engine.capture(vlm, batch, queries="last", vision=True, head_mean=head_mean, **options)
    tol = 1e-3 if options.get("dtype") == "float16" else 1e-5
    np.testing.assert_allclose(fast.vision_attn.values, alone.vision_attn.values, rtol=tol, atol=tol / 100)


def test_cls_sink_falls_back_to_every_sites_rows_after_a_second_flush():
    """The direct block is the Dataset's values only while it is the one flush; a second flush (a layer run
    twice, or groups split by the byte limit) gives every site its rows, the first block's included."""
    from vtrlab.probes.attention import Site

    tables = [{"vpos": np.arange(5), "crop": np.full(5, b)} for b in range(2)]
    probs = torch.rand(3, 2, 4, 1, 5)
    sites = [Site("vision", i) for i in (0, 1, 2)]
    one = engine._ClsSink([0, 1, 2], tables)
    one.put(sites, probs, False)
    assert one.host is not None and all(not s.probs for s in sites)
    torch.testing.assert_close(one.host, probs[:, :, :, 0].permute(1, 0, 2, 3))
    sites = [Site("vision", i) for i in (0, 1, 2)]
    two = engine._ClsSink([0, 1, 2], tables)
    two.put(sites, probs, False)
    two.put(sites[:1], probs[:1], False)  # layer 0 again
    assert two.host is None and two.stacked([0, 1, 2]) is None
    assert [len(s.probs) for s in sites] == [2, 1, 1]
    for g, s in enumerate(sites):
        torch.testing.assert_close(s.probs[0], probs[g, :, :, 0])
    # tables that do not list each sample's own sequence in order: the per-site rows from the start
    shuffled = [{"vpos": np.arange(5)[::-1].copy(), "crop": np.full(5, b)} for b in range(2)]
    sites = [Site("vision", i) for i in (0, 1, 2)]
    other = engine._ClsSink([0, 1, 2], shuffled)
    other.put(sites, probs, False)
    assert other.host is None and all(len(s.probs) == 1 for s in sites)
    assert not engine._own_sequences(tables, 3, 5) and not engine._own_sequences(tables, 2, 6)


def test_stacked_only_when_one_flush_delivered_exactly_the_layers_once():
    from vtrlab.probes.attention import Site
    from vtrlab.probes.grouped import SiteLists

    sink = SiteLists()
    sites = [Site("vision", i) for i in (0, 1, 2)]
    probs = torch.rand(3, 2, 4, 1, 5)
    sink.put(sites, probs, False)
    torch.testing.assert_close(sink.stacked([0, 1, 2]), torch.stack([s.probs[0] for s in sites]))
    assert sink.stacked([0, 2]) is None and sink.stacked([2, 1, 0]) is None
    sites[1].probs.append(sites[1].probs[0])  # a layer that ran twice (a second image pass)
    assert sink.stacked([0, 1, 2]) is None
    sink2 = SiteLists()
    sink2.put(sites[:1], probs[:1], False)
    sink2.put(sites[1:], probs[1:], False)
    assert sink2.stacked([0, 1, 2]) is None  # two flushes: the caller stacks


def test_datasets_share_indexes_but_never_variables():
    """The cached dimension indexes are reused between captures; each Dataset's variables stay its own."""
    from vtrlab import testing

    vlm = testing.tiny("llava")
    batch = _batch(vlm, 2)
    a = engine.capture(vlm, batch, queries="last", vision=True)
    b = engine.capture(vlm, batch, queries="last", vision=True)
    assert a.identical(xr_dataset_of(a)) and b.identical(xr_dataset_of(b))
    assert a.xindexes["key"] is b.xindexes["key"]
    assert a.variables["key"] is not b.variables["key"]
    a["key"].attrs["units"] = "position"
    assert "units" not in b["key"].attrs
    other = engine.capture(vlm, _batch(vlm, 1), queries="last", vision=True)  # other sizes: other indexes
    assert other.sizes["sample"] == 1 and list(other["sample"].values) == [0]


def xr_dataset_of(ds):
    """``ds`` rebuilt by xarray's public constructor from its values (the reference of ``engine._direct``)."""
    import xarray as xr

    data = {k: (v.dims, v.values) for k, v in ds.data_vars.items()}
    coords = {k: ds[k].values for k in ds.dims if k in ds.coords}
    return xr.Dataset(data, coords=coords, attrs=ds.attrs)


def test_index_cache_is_bounded_and_skips_non_numeric_coordinates():
    from xarray.indexes import PandasIndex

    engine._INDEXES.clear()
    for n in range(engine._INDEXES_MAX + 10):
        engine._index(PandasIndex, "key", np.arange(n + 1))
    assert len(engine._INDEXES) == engine._INDEXES_MAX
    words = np.array(["a", "b"])
    assert engine._index(PandasIndex, "w", words)[0] is not engine._index(PandasIndex, "w", words)[0]
    ints = np.arange(3)
    index, adapter = engine._index(PandasIndex, "k", ints)
    assert engine._index(PandasIndex, "k", np.arange(3)) == (index, adapter)
    assert engine._index(PandasIndex, "j", ints)[0] is not index
    assert list(np.asarray(adapter)) == [0, 1, 2]


def test_shared_coordinate_values_cannot_be_written_through():
    """A Dataset's dimension coordinate shares its values with other captures' (the cached index): writing into
    them must fail rather than change the other Datasets."""
    from vtrlab import testing

    vlm = testing.tiny("llava")
    batch = _batch(vlm, 1)
    a = engine.capture(vlm, batch, queries="last", vision=False)
    b = engine.capture(vlm, batch, queries="last", vision=False)
    before = b["key"].values.copy()
    with pytest.raises((ValueError, TypeError)):
        a["key"].values[0] = 99
    with pytest.raises((ValueError, TypeError)):
        a.variables["key"].values[0] = 99
    assert (b["key"].values == before).all()


def test_attention_modules_follow_a_replaced_module_and_equal_the_adapters_lookup():
    """The remembered child names never return a stale module: one replaced after a capture is the one probed."""
    from vtrlab import testing

    vlm = testing.tiny("llava")
    for vision in (False, True):
        layers = vlm.vision_layers if vision else vlm.lm_layers
        lookup = vlm.adapter.vision_attention if vision else vlm.adapter.lm_attention
        assert engine.attention_modules(vlm, vision) == [lookup(m) for m in layers]
        assert engine.attention_modules(vlm, vision) == [lookup(m) for m in layers]  # from the memo
    batch = _batch(vlm, 1)
    before = engine.capture(vlm, batch, queries="last", vision=False)
    layer = vlm.lm_layers[1]
    old = layer.self_attn
    new = type(old)(old.config, old.layer_idx)
    new.load_state_dict(old.state_dict())
    new.to(next(old.parameters()).dtype)
    layer.self_attn = new
    try:
        assert engine.attention_modules(vlm, False)[1] is new
        after = engine.capture(vlm, batch, queries="last", vision=False)  # raises if `new` ran unprobed
        np.testing.assert_allclose(after.lm_attn.values, before.lm_attn.values, rtol=1e-5, atol=1e-7)
    finally:
        layer.self_attn = old


def test_attention_modules_without_a_direct_child_are_looked_up_every_call():
    """An adapter whose attention module is not a direct child of its layer: no memo, the adapter's lookup."""
    from vtrlab import testing

    vlm = testing.tiny("llava")

    class Nested(type(vlm.adapter)):
        def lm_attention(self, layer):
            return layer.mlp.act_fn if hasattr(layer.mlp, "act_fn") else layer.mlp

    nested = type(vlm)(vlm.model, vlm.processor, Nested(), vlm.name)
    engine._ATTENTION_NAMES.clear()
    for _ in range(2):
        got = engine.attention_modules(nested, False)
        assert got == [nested.adapter.lm_attention(m) for m in nested.lm_layers]
        assert (id(nested.lm_layers), False) not in engine._ATTENTION_NAMES
    # the same layer list under the stock adapter afterwards: its own lookup, not the other adapter's names
    assert engine.attention_modules(vlm, False) == [m.self_attn for m in vlm.lm_layers]


def test_columns_equal_pandas_to_numpy():
    import pandas as pd

    frame = pd.DataFrame(
        {
            "crop": np.array([0, 0, 1]),
            "kind": pd.array(["cls", "patch", "patch"], dtype="string"),
            "vpos": np.array([0, 1, 2]),
            "x0": np.array([0.5, np.nan, 2.0]),
        }
    )
    got = engine._columns(frame, ["kind", "crop", "x0"])
    for name in ("kind", "crop", "x0"):
        want = frame[name].to_numpy()
        assert got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want)
    dup = pd.DataFrame([[1, 2]], columns=["a", "a"])  # not unique: the public path
    dup["b"] = [3]
    np.testing.assert_array_equal(engine._columns(dup, ["b"])["b"], [3])


def test_only_plain_holding_sites_take_the_short_path():
    """Session.holds has a module's site only when all it does is hold rows for a group; anything else (a
    knockout, saliency rows, a callback, a second site) goes through the full path."""
    from vtrlab.probes.grouped import LayerGroup, SiteLists

    group = LayerGroup(SiteLists(), 0, "cpu")
    plain = A.Site("vision", 0, vision_mode="cls", group=group)
    assert A._only_holds([plain]) is plain
    assert A._only_holds([A.Site("vision", 0, vision_mode="cls")]) is None  # no group: computed per layer
    assert A._only_holds([A.Site("lm", 0, saliency_rows=torch.zeros(1, 1, dtype=torch.long), group=group)]) is None
    assert A._only_holds([A.Site("lm", 0, on_call=lambda *a: None, group=group)]) is None
    assert A._only_holds([plain, A.Site("vision", 0, knockout=object())]) is None
    m1, m2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with A.session({id(m1): plain}) as outer:
        assert outer.holds == {id(m1): plain}
        other = A.Site("vision", 0, knockout=object())
        with A.session({id(m1): other, id(m2): other}) as inner:
            assert inner.holds == {}  # m1 now has two sites; m2's only site knocks out
        assert A.current_session() is outer


def test_a_site_makes_its_segments_and_saliency_only_when_filled():
    """Capture makes a site per probed layer per call: the containers it never fills are not made (each one is an
    allocation the garbage collector counts), and filling them still works (the vision mean path's segments)."""
    site = A.Site("vision", 0, vision_mode="mean")
    assert site.segments == () and site.saliency is None and site.probs == []
    assert A.Site("lm", 0).probs is not site.probs
    m = _Module()
    q, k = _inputs(2)
    for _ in range(2):  # a packed encoder's two calls: their (offset, length) segments
        A._record_rows(site, m, q, k, None, None, False)
    assert site.segments == [(0, k.shape[2]), (k.shape[2], k.shape[2])]
