"""The row computation inside vtrlab's attention function, on fresh random inputs, against float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vtrlab.probes import attention as A


class _Module:
    is_causal = True


def _ref_probs(q, k, mask, scale, causal, softcap=None):
    """Full float64 softmax(QKᵀ·s + mask) with K repeated per query head (N×N on purpose)."""
    q, k = q.double(), k.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    elif causal:
        N = s.shape[-1]
        s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(s, -1)


def _inputs(seed, B=2, H=4, Hkv=2, N=23, D=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mask_kind", ["none-causal", "none-bidirectional", "bool", "additive", "broadcast"])
def test_rows_equal_float64_reference(seed, mask_kind):
    q, k = _inputs(seed)
    B, H, N, D = q.shape
    scale = 0.37
    causal = mask_kind == "none-causal"
    mask = None
    if mask_kind in ("bool", "additive", "broadcast"):
        allowed = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
        allowed[1, :, :, :3] = False  # left padding of sample 1
        allowed[1, :, :3, 0] = True  # keep pad rows finite (as HF does)
        mask = allowed
        if mask_kind == "additive":
            mask = torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)
        if mask_kind == "broadcast":
            mask = allowed[:1]
    rows = torch.tensor([[N - 1, 5, 9], [N - 1, 12, -1]])
    got = A.row_probabilities(_Module(), q, k, mask, scale, causal, rows)
    ref = _ref_probs(q, k, mask if mask is None or mask.shape[0] == B else mask.expand(B, -1, -1, -1), scale, causal)
    for b in range(B):
        for i, r in enumerate(rows[b].tolist()):
            if r < 0:
                assert torch.isnan(got[b, :, i]).all()
            else:
                torch.testing.assert_close(got[b, :, i].double(), ref[b, :, r], atol=1e-6, rtol=1e-5)


def test_softcap_and_mean_over_queries_in_chunks(monkeypatch):
    q, k = _inputs(3, N=37)
    monkeypatch.setattr(A, "_MEAN_CHUNK", 8)  # several chunks, the last one partial
    got = A._mean_over_queries(_Module(), q, k, None, 0.5, False, softcap=2.0)
    ref = _ref_probs(q, k, None, 0.5, False, softcap=2.0).mean(2)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_knockout_mask_blocks_exactly_the_edges(mask_kind):
    q, k = _inputs(4, N=10)
    B, _, N, _ = q.shape
    allowed = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    base = {
        "none": None,
        "bool": allowed,
        "additive": torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min),
    }[mask_kind]
    ko = A.Knockout(queries=torch.zeros(B, N, dtype=torch.bool), keys=torch.zeros(B, N, dtype=torch.bool))
    ko.queries[:, [6, 9]] = True
    ko.keys[:, 2:5] = True
    new = A.knockout_mask(ko.blocked(q, k), base, q, k, causal=True)
    kept = new if new.dtype == torch.bool else new > torch.finfo(new.dtype).min / 2
    want = allowed.clone()
    want[:, :, 6, 2:5] = want[:, :, 9, 2:5] = False
    assert torch.equal(kept.expand_as(want), want)
    ko.keys[:, :] = True
    with pytest.raises(ValueError, match="no key to attend to"):
        A.knockout_mask(ko.blocked(q, k), base, q, k, causal=True)


def test_only_requested_rows_are_materialised(monkeypatch):
    """queries='last' computes (G, B, H, 1, N) per group of layers: never a full N×N probability matrix."""
    from vtrlab import testing
    from vtrlab.probes import capture, engine

    shapes = []
    real = engine._BufferSink.put

    def spy(self, sites, probs, written):
        shapes.append((len(sites), tuple(probs.shape)))
        return real(self, sites, probs, written)

    monkeypatch.setattr(engine._BufferSink, "put", spy)
    vlm = testing.tiny("llava")
    batch = vlm.prepare([np.zeros((40, 56, 3), np.uint8), np.zeros((64, 48, 3), np.uint8)], ["What color?", "Where?"])
    capture(vlm, batch, queries="last", vision=False)
    assert sum(g for g, _ in shapes) == len(vlm.lm_layers)
    assert all(s[0] == g and s[3] == 1 for g, s in shapes)


def test_one_plan_shared_by_layers_with_different_masks():
    """A RowPlan caches each mask's rows once per mask object: layers that alternate two masks (Gemma-3's
    sliding and global layers), causal layers without a mask, and padding known on the host all stay
    equal to the float64 reference."""
    q, k = _inputs(5, N=19)
    B, H, N, D = q.shape
    full = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    sliding = full & ~torch.ones(N, N, dtype=torch.bool).tril(-4)[None, None]  # window of 4
    rows_np = np.array([[N - 1, 7], [N - 2, -1]])
    plan = A.RowPlan.build(rows_np, "cpu")
    assert plan.padded
    rows = plan.rows
    for mask, causal in [(full, False), (sliding, False), (full, False), (None, True), (sliding, False)]:
        got = A.row_probabilities(_Module(), q, k, mask, 0.3, causal, rows, plan=plan)
        ref = _ref_probs(q, k, mask, 0.3, causal)
        for b in range(B):
            for i, r in enumerate(rows_np[b].tolist()):
                if r < 0:
                    assert torch.isnan(got[b, :, i]).all()
                else:
                    torch.testing.assert_close(got[b, :, i].double(), ref[b, :, r], atol=1e-6, rtol=1e-5)
    assert len(plan._bias) == 3  # full, sliding, causal: one gather each
    dense = A.RowPlan.build(np.array([[N - 1], [4]]), "cpu")
    assert not dense.padded and dense.invalid is None
    got = A.row_probabilities(_Module(), q, k, sliding, 0.3, False, dense.rows, plan=dense)
    ref = _ref_probs(q, k, sliding, 0.3, False)
    torch.testing.assert_close(
        got[:, :, 0].double(), torch.stack([ref[0, :, N - 1], ref[1, :, 4]]), atol=1e-6, rtol=1e-5
    )
