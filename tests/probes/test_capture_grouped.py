"""Rows of several layers computed in one batched flush (vtrlab.probes.grouped): float64 references on
fresh random inputs, every way a group is split, and capture's results grouped vs layer by layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vtrlab.probes import engine
from vtrlab.probes import grouped as G


def _ref_rows(q, k, mask, scale, causal, rows):
    """Float64 softmax(QKᵀ·s + mask) of the full N×N (K repeated per query head), then the rows picked."""
    q, k = q.double(), k.double()
    k = k.expand(q.shape[0], *k.shape[1:]).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * scale
    N = s.shape[-1]
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    elif causal:
        s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(s, -1)
    out = torch.full((q.shape[0], q.shape[1], rows.shape[1], N), float("nan"), dtype=torch.float64)
    for b in range(rows.shape[0]):
        for i, r in enumerate(rows[b].tolist()):
            if r >= 0:
                out[b, :, i] = p[b, :, r]
    return out


class _Collect:
    """A sink that keeps every delivered (site, probs) slice; optionally a destination to softmax into."""

    def __init__(self, dest=None):
        self.got, self.sizes, self.dest = {}, [], dest

    def target(self, sites):
        return None if self.dest is None else self.dest[: len(sites)]

    def put(self, sites, probs, written):
        self.sizes.append(len(sites))
        for g, s in enumerate(sites):
            self.got.setdefault(s, []).append(probs[g].clone())


def _layers(seed, L, B=2, H=4, Hkv=2, N=17, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, H, N, D, generator=g, dtype=dtype), torch.randn(B, Hkv, N, D, generator=g, dtype=dtype))
        for _ in range(L)
    ]


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize(
    "rows_kind",
    ["last-span", "question-span", "gathered", "padded"],  # view path, view path, gather, gather + NaN
)
@pytest.mark.parametrize("mask_kind", ["none-causal", "bool", "additive", "bidirectional"])
@pytest.mark.parametrize("max_bytes", [None, 1, "few"])  # one group; every layer alone; groups of a few
def test_grouped_rows_equal_float64_reference(seed, rows_kind, mask_kind, max_bytes):
    L, B, N = 5, 2, 17
    layers = _layers(seed, L, B=B, N=N)
    rows = {
        "last-span": np.array([[N - 1], [N - 1]]),
        "question-span": np.array([[9, 10, 11], [9, 10, 11]]),
        "gathered": np.array([[N - 1, 3, 8], [N - 1, 12, 4]]),
        "padded": np.array([[N - 1, 6], [N - 1, -1]]),
    }[rows_kind]
    allowed = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    allowed[1, :, :, :2] = False  # left padding of sample 1
    allowed[1, :, :2, 0] = True
    mask, causal = {
        "none-causal": (None, True),
        "bool": (allowed, False),
        "additive": (torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min), False),
        "bidirectional": (None, False),
    }[mask_kind]
    sink = _Collect()
    if max_bytes == "few":  # two or three layers' worth of what a held call costs
        max_bytes = int(2.5 * G.LayerGroup(sink, rows, "cpu")._work_out(*layers[0])[1])
    group = G.LayerGroup(sink, rows, "cpu", max_bytes=max_bytes)
    sites = [object() for _ in range(L)]
    for site, (q, k) in zip(sites, layers):
        group.add(site, q, k, mask, 0.29, causal)
    group.flush()
    assert sum(sink.sizes) == L and not group.pending
    if max_bytes == 1:
        assert sink.sizes == [1] * L  # every layer alone: the per-layer computation
    elif max_bytes is None:
        assert sink.sizes == [L]  # every layer in one batched computation
    else:
        assert len(sink.sizes) > 1 and max(sink.sizes) > 1
    rows_t = torch.as_tensor(rows)
    for site, (q, k) in zip(sites, layers):
        (got,) = sink.got[site]
        torch.testing.assert_close(
            got.double(), _ref_rows(q, k, mask, 0.29, causal, rows_t), atol=1e-6, rtol=1e-5, equal_nan=True
        )


def test_calls_of_another_signature_are_computed_apart():
    """Layers alternating two masks (Gemma-3's sliding and global layers) or two shapes are computed apart at
    the flush, each signature's calls together under their own mask; each site's rows equal the reference."""
    L, B, N = 6, 2, 15
    layers = _layers(3, L, B=B, N=N)
    full = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    sliding = full & ~torch.ones(N, N, dtype=torch.bool).tril(-4)[None, None]
    masks = [full, full, sliding, sliding, full, None]
    rows = np.array([[N - 1, 5], [N - 1, 9]])
    sink = _Collect()
    group = G.LayerGroup(sink, rows, "cpu")
    sites = [object() for _ in range(L)]
    for site, (q, k), m in zip(sites, layers, masks):
        group.add(site, q, k, m, None, m is None)
    group.flush()
    assert sink.sizes == [3, 2, 1]  # full (layers 0, 1, 4), sliding (2, 3), no mask (5): one computation each
    assert group.flushes == 3
    for site, (q, k), m in zip(sites, layers, masks):
        torch.testing.assert_close(
            sink.got[site][0].double(),
            _ref_rows(q, k, m, q.shape[-1] ** -0.5, m is None, torch.as_tensor(rows)),
            atol=1e-6,
            rtol=1e-5,
        )


@pytest.mark.parametrize("change", ["scale", "dtype", "causal", "mask"])
def test_what_only_the_flush_compares_still_splits_the_computation(change):
    """Inside the forward a held call's shapes are all that is compared; a call of the same shapes but another
    scale, dtype, causality or mask is computed apart at the flush, under its own, and equals the reference."""
    L, B, N = 4, 2, 13
    layers = _layers(4, L, B=B, N=N)
    rows = np.array([[N - 1, 3], [N - 1, 7]])
    allowed = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    other = allowed.clone()
    other[..., :, 1] = False
    calls = []
    for i, (q, k) in enumerate(layers):
        scale, causal, mask = 0.3, False, allowed
        if i == 2:
            if change == "scale":
                scale = 0.7
            elif change == "dtype":
                q, k = q.double(), k.double()
            elif change == "causal":
                mask, causal = None, True
            else:
                mask = other
        calls.append((q, k, mask, scale, causal))
    sink = _Collect()
    group = G.LayerGroup(sink, rows, "cpu")
    sites = [object() for _ in range(L)]
    for site, (q, k, mask, scale, causal) in zip(sites, calls):
        group.add(site, q, k, mask, scale, causal)
    group.flush()
    assert sink.sizes == [3, 1] and group.flushes == 2
    for site, (q, k, mask, scale, causal) in zip(sites, calls):
        ref = _ref_rows(q, k, mask, scale, causal, torch.as_tensor(rows))
        torch.testing.assert_close(sink.got[site][0].double(), ref, atol=1e-6, rtol=1e-5)


def test_held_bytes_stay_bounded_when_the_shapes_change():
    """The byte limit counts each held call at its own shapes' cost, also when shapes change within a group."""
    rows = np.array([[4], [4]])
    small, large = _layers(6, 1, N=9)[0], _layers(7, 1, N=33)[0]
    probe = G.LayerGroup(_Collect(), rows, "cpu")
    cost_small, cost_large = probe._work_out(*small)[1], probe._work_out(*large)[1]
    sink = _Collect()
    group = G.LayerGroup(sink, rows, "cpu", max_bytes=cost_large + cost_small)
    seen = []
    for i, (q, k) in enumerate([small, small, large, small, large, large]):
        group.add(i, q, k, None, 0.5, True)
        seen.append(group._held)
    group.flush()
    assert max(seen) <= cost_large + cost_small
    assert sum(sink.sizes) == 6


def test_bf16_rows_match_the_per_layer_arithmetic():
    """In bfloat16 the scores are rounded to the model's dtype before the float32 softmax, as per layer."""
    from vtrlab.probes import attention as A

    L, N = 4, 21
    layers = _layers(5, L, N=N, dtype=torch.bfloat16)
    rows = np.array([[N - 1, 4], [N - 1, 11]])
    sink = _Collect()
    group = G.LayerGroup(sink, rows, "cpu")
    sites = [object() for _ in range(L)]
    for site, (q, k) in zip(sites, layers):
        group.add(site, q, k, None, 0.25, True)
    group.flush()

    class _M:
        is_causal = True

    for site, (q, k) in zip(sites, layers):
        per_layer = A.row_probabilities(_M(), q, k, None, 0.25, True, torch.as_tensor(rows))
        torch.testing.assert_close(sink.got[site][0], per_layer, atol=2e-3, rtol=0)  # bf16 matmul rounding
        ref = _ref_rows(q, k, None, 0.25, True, torch.as_tensor(rows))
        torch.testing.assert_close(sink.got[site][0].double(), ref, atol=2e-2, rtol=0)


def test_softmax_writes_into_the_sinks_destination():
    L, N = 3, 11
    layers = _layers(1, L, N=N)
    dest = torch.full((L, 2, 4, 1, N), -1.0)
    sink = _Collect(dest)
    group = G.LayerGroup(sink, np.array([[N - 1], [N - 1]]), "cpu")
    for i, (q, k) in enumerate(layers):
        group.add(i, q, k, None, 0.5, True)
    group.flush()
    for i, (q, k) in enumerate(layers):
        torch.testing.assert_close(dest[i].double(), _ref_rows(q, k, None, 0.5, True, torch.tensor([[N - 1]] * 2)))


def test_rows_for_another_batch_size_are_refused():
    group = G.LayerGroup(_Collect(), np.array([[3], [3]]), "cpu")
    q, k = _layers(0, 1, B=3)[0]
    with pytest.raises(ValueError, match="rows were given for 2 sample"):
        group.add(object(), q, k, None, None, True)


def test_buffer_sink_selects_heads_and_writes_layers_out_of_order():
    """Capture's sink: heads selected / averaged before the copy; layers whose slots are not consecutive
    are written one by one."""
    buffer = torch.zeros(3, 2, 2, 1, 5)

    class _Site:
        def __init__(self, layer):
            self.layer, self.probs, self.out = layer, [], None

    sites = [_Site(7), _Site(2)]
    sink = engine._BufferSink(buffer, None, {2: 0, 5: 1, 7: 2}, torch.tensor([3, 0]), False, "cpu")
    assert sink.target(sites) is None
    probs = torch.rand(2, 2, 4, 1, 5)
    sink.put(sites, probs, False)
    torch.testing.assert_close(buffer[2], probs[0][:, [3, 0]])
    torch.testing.assert_close(buffer[0], probs[1][:, [3, 0]])
    assert torch.equal(buffer[1], torch.zeros(2, 2, 1, 5))
    mean = engine._BufferSink(torch.zeros(3, 2, 1, 5), None, {2: 0, 5: 1, 7: 2}, None, True, "cpu")
    mean.put([_Site(5), _Site(7)], probs, False)
    torch.testing.assert_close(mean.buffer[1:], probs.mean(2))
    # a host buffer for rows computed on another device (CUDA, no staging buffer): never softmaxed into
    whole = engine._BufferSink(torch.zeros(3, 2, 4, 1, 5), None, {2: 0, 5: 1, 7: 2}, None, False, "meta")
    assert whole.target([_Site(2), _Site(5)]) is None
    assert engine._BufferSink(whole.buffer, None, whole.slots, None, False, "cpu").target([_Site(2)]) is not None
    # a staging buffer on the rows' device: softmaxed into, and that group's slice copied to the buffer at once
    stage = torch.zeros(3, 2, 4, 1, 5)
    staged = engine._BufferSink(torch.zeros(3, 2, 4, 1, 5), stage, {2: 0, 5: 1, 7: 2}, None, False, "cpu")
    out = staged.target([_Site(5), _Site(7)])
    assert out.data_ptr() == stage[1].data_ptr() and out.shape[0] == 2
    out.copy_(probs)
    staged.put([_Site(5), _Site(7)], out, True)
    torch.testing.assert_close(staged.buffer[1:], probs)
    assert torch.equal(staged.buffer[0], torch.zeros(2, 4, 1, 5))


def test_groups_end_where_their_probabilities_would_pass_max_out_bytes():
    L, N = 6, 13
    layers = _layers(2, L, N=N)
    sink = _Collect()
    per_layer = 2 * 4 * 1 * N * 4  # B x H x R x N float32
    group = G.LayerGroup(sink, np.array([[N - 1], [N - 1]]), "cpu", max_out_bytes=2 * per_layer)
    for i, (q, k) in enumerate(layers):
        group.add(i, q, k, None, 0.5, True)
    group.flush()
    assert sink.sizes == [2, 2, 2]
    for i, (q, k) in enumerate(layers):
        ref = _ref_rows(q, k, None, 0.5, True, torch.tensor([[N - 1]] * 2))
        torch.testing.assert_close(sink.got[i][0].double(), ref)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
@pytest.mark.parametrize("queries", ["last", "question"])
def test_capture_grouped_equals_capture_layer_by_layer(monkeypatch, family, queries):
    """The same capture with every layer alone (a group limit of 1 byte: the per-layer computation) and
    with the layers grouped; also the number of batched computations a capture ran."""
    from vtrlab import testing
    from vtrlab.probes import capture

    vlm = testing.tiny(family)
    imgs = [np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)] * 2
    batch = vlm.prepare(imgs, ["What color is it?", "Where?"])
    flushes = []
    real = G.LayerGroup.flush

    def counting(self):
        n = len(self.pending)
        real(self)
        if n:
            flushes.append(n)

    monkeypatch.setattr(G.LayerGroup, "flush", counting)
    grouped = capture(vlm, batch, queries=queries, vision=True, hidden=True)
    n_grouped = list(flushes)
    flushes.clear()
    monkeypatch.setattr(G, "GROUP_MAX_BYTES", 1)
    alone = capture(vlm, batch, queries=queries, vision=True, hidden=True)
    assert all(n == 1 for n in flushes)
    assert len(n_grouped) < len(flushes)  # fewer flushes than layers (gemma3: its two masks in one flush)
    assert set(grouped.data_vars) == set(alone.data_vars)
    for name in grouped.data_vars:
        a, b = grouped[name].values, alone[name].values
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, equal_nan=True)
        else:
            assert np.array_equal(a, b)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_saliency_grouped_equals_saliency_layer_by_layer(monkeypatch, family):
    """Saliency's rows' probabilities computed in groups after the forward equal those computed per layer."""
    from vtrlab import testing
    from vtrlab.flow import saliency

    vlm = testing.tiny(family)
    imgs = [np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)] * 2
    batch = vlm.prepare(imgs, ["What color is it?", "Where?"])
    grouped = saliency(vlm, batch, queries="question")
    monkeypatch.setattr(G, "GROUP_MAX_BYTES", 1)
    alone = saliency(vlm, batch, queries="question")
    for name in ("attn_grad", "saliency", "target"):
        np.testing.assert_allclose(grouped[name].values, alone[name].values, atol=1e-7, rtol=1e-5, equal_nan=True)


def test_the_last_expected_layer_flushes_its_group_at_once():
    L = 4
    layers = _layers(3, L)
    sink = _Collect()
    sites = [object() for _ in range(L)]
    group = G.LayerGroup(sink, np.array([[16], [16]]), "cpu", last=sites[-1])
    for i, (site, (q, k)) in enumerate(zip(sites, layers)):
        group.add(site, q, k, None, 0.29, True)
        assert sink.sizes == ([] if i < L - 1 else [L])  # nothing computed before the last layer's call
    assert not group.pending
    group.flush()  # the caller's flush after the forward: nothing left
    assert sink.sizes == [L]


@pytest.mark.parametrize("queries", ["last", "question"])
def test_capture_is_the_same_with_the_flush_at_the_last_layer_or_after_the_forward(monkeypatch, queries):
    from tiny_cases import _build

    from vtrlab.probes import engine

    vlm, batch = _build("llava")
    events = []
    add, flush = G.LayerGroup.add, G.LayerGroup.flush

    def noting_add(self, site, *a, **k):
        events.append(site.stream)
        return add(self, site, *a, **k)

    def noting_flush(self):
        if self.pending:
            events.append(f"flush {type(self.sink).__name__}")
        return flush(self)

    monkeypatch.setattr(G.LayerGroup, "add", noting_add)
    monkeypatch.setattr(G.LayerGroup, "flush", noting_flush)
    at_last = engine.capture(vlm, batch, queries=queries, vision=True)
    # the vision rows were computed (and their held queries and keys freed) before the first LM layer was held
    n_vision = len(vlm.vision_layers)
    assert events[: n_vision + 1] == ["vision"] * n_vision + ["flush _ClsSink"]
    assert events[-1] == "flush _BufferSink" and set(events[n_vision + 1 : -1]) == {"lm"}
    monkeypatch.setattr(engine, "FLUSH_AT_LAST_LAYER", False)
    events.clear()
    after = engine.capture(vlm, batch, queries=queries, vision=True)
    assert events[-2:] == ["flush _BufferSink", "flush _ClsSink"]  # both after the forward
    assert at_last.identical(after)


@pytest.mark.parametrize("row, mask_kind", [(0, "none"), (3, "none"), (0, "causal"), (2, "bool")])
def test_one_row_of_every_sequence_needs_no_plan_unless_masked(monkeypatch, row, mask_kind):
    """A group of one row of every sequence (vision [CLS]) with every key allowed builds no RowPlan (building one
    copies the rows to the device inside the forward); a causal or masked call of such a group still does, and
    every result equals the float64 reference."""
    N = 11
    layers = _layers(4, 3, N=N)
    built = []
    real = G.RowPlan.build
    monkeypatch.setattr(G.RowPlan, "build", classmethod(lambda cls, *a, **k: built.append(1) or real(*a, **k)))
    allowed = torch.ones(2, 1, N, N, dtype=torch.bool)
    allowed[1, :, :, :4] = False  # sample 1 may not see keys 0..3
    mask, causal = {"none": (None, False), "causal": (None, True), "bool": (allowed, False)}[mask_kind]
    sink = _Collect()
    group = G.LayerGroup(sink, row, "cpu")
    for i, (q, k) in enumerate(layers):
        group.add(i, q, k, mask, 0.3, causal)
    group.flush()
    assert (len(built) == 0) == (mask_kind == "none")
    for i, (q, k) in enumerate(layers):
        ref = _ref_rows(q, k, mask, 0.3, causal, torch.tensor([[row]] * 2))
        torch.testing.assert_close(sink.got[i][0].double(), ref, atol=1e-6, rtol=1e-5)
