"""The host-side paths of knockout and saliency (benchmarks/profile_flow.py) against float64 references.

An unpadded one-sample batch runs without a model mask: a short one runs each cut layer as one sdpa under the
full cut mask (CutMask, built once per forward), a longer one as a row splice whose cut mask is computed on the
host; either way an additive mask in the query's dtype, rows aligned to 8 elements, and the emptied-row check
made on the host (no device sync); the batch
check accepts the bound input_ids tensor without comparing tokens; saliency forms A ⊙ (dO·Vᵀ) for stacked
layers (in chunks); the probes switch only the configs their attention modules read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.flow import knocked_out, knockout, saliency
from vtrlab.probes import attention as att
from vtrlab.probes.switch import _configs, attention_switched

from .test_flow import _families, _float64_inputs, _ref_attention, _run_reference, _tiny64
from .test_knockout_splice import _blocked, knocked_with_and_without_grad


def _single64(family: str):
    """The family's tiny float64 model and a one-sample batch (no padding)."""
    from tiny_cases import _images

    vlm, _ = _tiny64(family)
    return vlm, _float64_inputs(vlm.prepare(_images(0)[:1], ["What color is the circle?"]))


@pytest.fixture(scope="module", params=_families())
def single64(request):
    return _single64(request.param)


@pytest.fixture(params=["full", "splice"])
def built(request, monkeypatch):
    """The cut plans (CutMask / RowSplice) built during the test, with the plan the test asks for: ``full`` (the
    default threshold: a tiny unpadded forward runs under the full cut mask) or ``splice`` (threshold 0)."""
    if request.param == "splice":
        monkeypatch.setattr(att, "_FULL_MASK_MAX_ELEMENTS", 0)
    out = []
    for cls in (att.RowSplice, att.CutMask):
        build = cls.__dict__["build"].__func__

        def spy(cls_, *args, _build=build, **kwargs):
            plan = _build(cls_, *args, **kwargs)
            out.append(plan)
            return plan

        monkeypatch.setattr(cls, "build", classmethod(spy))
    return request.param, out


@pytest.fixture
def sdpa_calls(monkeypatch):
    """How many times the stock sdpa function runs (the attention function looks it up on every call)."""
    calls = []
    stock = att._stock_sdpa()

    def counted(module, *args, **kwargs):
        calls.append(id(module))
        return stock(module, *args, **kwargs)

    monkeypatch.setattr(att, "_STOCK_SDPA", counted)
    return calls


@pytest.mark.parametrize("queries", ["last", "question"])
def test_unpadded_knockout_equals_float64_reference(single64, built, sdpa_calls, queries):
    vlm, batch = single64
    kind, built = built
    layers = [0, len(vlm.lm_layers) - 1]
    rows_of = (lambda L: [L.last_position]) if queries == "last" else (lambda L: L.question_positions)
    blocked = _blocked(vlm, batch, layers, rows_of, lambda L: L.image_positions)
    ref = _run_reference(vlm, batch, _ref_attention(blocked))
    plain = _run_reference(vlm, batch, _ref_attention({}))
    del sdpa_calls[:]
    with knocked_out(vlm, batch, keys="image", queries=queries, layers=layers), torch.no_grad():
        got = vlm.model(**batch.inputs, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    assert (got[0, -1] - plain[0, -1]).abs().max() > 1e-6
    assert 1 <= len(built) <= len(layers)  # one plan per forward and mask (gemma3: sliding and global)
    if vlm.family == "llava":  # causal, no model mask: one additive mask, rows aligned to 8
        assert len(built) == 1
        plan = built[0]
        assert type(plan) is (att.CutMask if kind == "full" else att.RowSplice)
        mask, N = plan.mask, batch.inputs["input_ids"].shape[1]
        assert mask.shape[-2:] == ((N, N) if kind == "full" else (len(rows_of(batch.layouts[0])), N))
        assert mask.dtype == torch.float64 and mask.stride(-2) % 8 == 0 and mask.stride(-1) == 1
        assert torch.isinf(mask).any() and set(mask.unique().tolist()) <= {0.0, float("-inf")}
        # the full cut mask runs one sdpa a cut layer (every row), the splice two (the plain call, the cut rows)
        cut = [id(vlm.adapter.lm_attention(vlm.lm_layers[i])) for i in layers]
        assert [sdpa_calls.count(m) for m in cut] == [1 if kind == "full" else 2] * len(layers)


def test_unpadded_nested_knockouts_unite_their_edges(single64):
    vlm, batch = single64
    n = len(vlm.lm_layers)
    blocked = _blocked(vlm, batch, [0, n - 1], lambda L: L.question_positions, lambda L: L.image_positions[::2])
    blocked = _blocked(vlm, batch, [n - 1], lambda L: [L.last_position], lambda L: L.image_positions, blocked)
    ref = _run_reference(vlm, batch, _ref_attention(blocked))
    L = batch.layouts[0]
    with knocked_out(vlm, batch, keys=L.image_positions[::2].tolist(), queries="question", layers=[0, n - 1]):
        with knocked_out(vlm, batch, keys="image", queries="last", layers=[n - 1]), torch.no_grad():
            got = vlm.model(**batch.inputs, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_unpadded_knockout_refuses_emptied_rows_on_the_host(single64):
    vlm, batch = single64
    L = batch.layouts[0]
    impls = [(c, c._attn_implementation) for c in _configs(vlm.model)]
    for keys, queries in (("all", "last"), (list(range(int(L.question_positions[0]) + 1)), "question")):
        with pytest.raises(ValueError, match=r"leaves query row \d+ \(sample 0\) with no key to attend to"):
            with knocked_out(vlm, batch, keys=keys, queries=queries, layers=[0]), torch.no_grad():
                vlm.model(**batch.inputs, use_cache=False)
    assert all(c._attn_implementation == impl for c, impl in impls)
    # a row keeping one key is fine: every key before the last position but the first
    keep_first = list(range(1, L.last_position))
    with knocked_out(vlm, batch, keys=keep_first, queries="last", layers=[0]), torch.no_grad():
        assert torch.isfinite(vlm.model(**batch.inputs, use_cache=False).logits).all()


def test_host_emptied_row_check_matches_the_device_one():
    """RowSplice's host check (no model mask) refuses exactly the rows the device check refuses."""
    rng = np.random.default_rng(0)
    N = 12
    refusals = 0
    for causal in (True, False):
        for _ in range(60):
            q = rng.random((1, N)) < 0.3
            q[:, -1] = True
            k = rng.random((1, N)) < rng.choice([0.5, 0.9, 1.0])
            ko = att.Knockout(torch.as_tensor(q), torch.as_tensor(k), queries_host=q, keys_host=k)
            query = torch.zeros(1, 1, N, 4)
            outcomes = []
            for check in ("device", "host"):
                try:
                    if check == "device":
                        att.knockout_mask(ko.blocked(query, query), None, query, query, causal)
                    else:
                        att.RowSplice._host_mask([ko], np.flatnonzero(q[0])[None], causal, N)
                    outcomes.append(None)
                except ValueError as e:
                    outcomes.append(str(e))
            assert outcomes[0] == outcomes[1]  # the same refusal, naming the same (first) row
            refusals += outcomes[0] is not None
    assert 0 < refusals < 120


@pytest.mark.parametrize("n_knockouts", [1, 2, 3])
def test_full_mask_emptied_row_check_matches_the_device_one(n_knockouts):
    """CutMask's host check (O(knockouts x N) a sample) refuses exactly what the device check of the united cut
    mask refuses, naming the same first row, for several samples and nested knockouts."""
    rng = np.random.default_rng(n_knockouts)
    B, N = 3, 12
    refusals = 0
    for causal in (True, False):
        for _ in range(60):
            kos = []
            for _ in range(n_knockouts):
                q = rng.random((B, N)) < 0.3
                k = rng.random((B, N)) < rng.choice([0.5, 0.9, 1.0])
                kos.append(att.Knockout(torch.as_tensor(q), torch.as_tensor(k), queries_host=q, keys_host=k))
            query = torch.zeros(B, 1, N, 4)
            outcomes = []
            for check in ("device", "host"):
                try:
                    if check == "device":
                        blocked = kos[0].blocked(query, query)
                        for ko in kos[1:]:
                            blocked = blocked | ko.blocked(query, query)
                        att.knockout_mask(blocked, None, query, query, causal)
                    else:
                        att.CutMask.check_rows_keep_a_key(kos, causal)
                    outcomes.append(None)
                except ValueError as e:
                    outcomes.append(str(e))
            assert outcomes[0] == outcomes[1]  # the same refusal, naming the same first (sample, row)
            refusals += outcomes[0] is not None
    assert 0 < refusals < 120


def test_full_cut_mask_is_built_once_a_forward_and_equals_the_device_mask():
    """CutMask.build's additive mask equals knockout_mask's bool one (0 where allowed, -inf where not)."""
    rng = np.random.default_rng(1)
    B, N = 2, 11
    for causal in (True, False):
        q = rng.random((B, N)) < 0.4
        k = rng.random((B, N)) < 0.4
        k[:, 0] = False  # every row keeps key 0
        ko = att.Knockout(torch.as_tensor(q), torch.as_tensor(k), queries_host=q, keys_host=k)
        query = torch.zeros(B, 1, N, 4, dtype=torch.float64)
        want = att.knockout_mask(ko.blocked(query, query), None, query, query, causal)  # (B, 1, N, N) bool
        got = att.CutMask.build([ko], causal, B, N, "cpu", torch.float64).mask
        assert got.shape == (B, 1, N, N) and got.dtype == torch.float64 and got.stride(-2) == 16
        torch.testing.assert_close(got, torch.zeros_like(got).masked_fill(~want, float("-inf")), atol=0, rtol=0)


def test_full_mask_knockout_under_autograd_equals_no_grad(single64):
    """The full cut mask (CutMask) under autograd: gradients flow and the values equal the no-grad forward's."""
    vlm, batch = single64
    got, plain, grad = knocked_with_and_without_grad(vlm, batch, layers=[0])
    assert grad > 0
    torch.testing.assert_close(got, plain, atol=1e-12, rtol=1e-12)


def test_batch_check_by_reference_and_by_tokens(single64):
    vlm, batch = single64
    ids = batch.inputs["input_ids"]
    with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]), torch.no_grad():
        want = vlm.model(**batch.inputs, use_cache=False).logits
        # a copy with the same tokens is compared and accepted
        got = vlm.model(**{**batch.inputs, "input_ids": ids.clone()}, use_cache=False).logits
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        other = ids.clone()
        other[0, -1] = (other[0, -1] + 1) % 100
        with pytest.raises(ValueError, match="built for another batch"):
            vlm.model(**{**batch.inputs, "input_ids": other}, use_cache=False)
    binding = att.Binding.of(1, ids.shape[1], ids)
    assert binding.input_ids is ids and binding.ids_version == ids._version
    binding.check_ids(ids, "a knockout")  # the bound tensor: no compare
    saved = ids.clone()
    try:
        ids[0, -1] = (ids[0, -1] + 1) % 100  # modified in place after binding: refused, however it is run
        for run in (ids, saved):
            with pytest.raises(ValueError, match="modified in place since"):
                binding.check_ids(run, "a knockout")
    finally:
        ids.copy_(saved)
    with torch.inference_mode():
        frozen = saved.clone()
    copied = att.Binding.of(1, ids.shape[1], frozen)  # an inference tensor has no version: a copy is kept
    assert copied.ids_version is None and copied.input_ids is not frozen
    copied.check_ids(saved, "a knockout")


def test_unpadded_saliency_equals_float64_autograd(single64):
    vlm, batch = single64
    ds = saliency(vlm, batch, queries="question", layers="all")
    kept = {id(vlm.adapter.lm_attention(layer)): [] for layer in vlm.lm_layers}
    logits = _run_reference(vlm, batch, _ref_attention({}, kept), grad=True)
    logp = torch.log_softmax(logits[0, batch.layouts[0].last_position], -1)
    assert int(logp.argmax()) == int(ds.target.values[0])
    logp[int(ds.target.values[0])].backward()
    vlm.model.zero_grad(set_to_none=True)
    q = torch.as_tensor(batch.layouts[0].question_positions)
    for li, layer in enumerate(vlm.lm_layers):
        (p,) = kept[id(vlm.adapter.lm_attention(layer))]
        ref = (p * p.grad).detach()[0][:, q]
        np.testing.assert_allclose(ds.attn_grad.values[0, li], ref.numpy(), atol=1e-6, rtol=1e-5)


def test_saliency_in_chunks_of_layers_equals_one_stack(single64, monkeypatch):
    vlm, batch = single64
    import sys

    sal = sys.modules["vtrlab.flow.saliency"]
    want = saliency(vlm, batch, queries="question")
    monkeypatch.setattr(sal, "_STACK_BYTES", 1)  # one layer per chunk
    got = saliency(vlm, batch, queries="question")
    np.testing.assert_allclose(got.attn_grad.values, want.attn_grad.values, rtol=1e-12, atol=1e-15)
    # and the batched product equals the per-layer definition
    rng = torch.Generator().manual_seed(0)
    B, H, Hkv, R, N, D, L = 2, 4, 2, 3, 7, 5, 3
    probs = [torch.rand(B, H, R, N, generator=rng, dtype=torch.float64) for _ in range(L)]
    d_outs = [torch.randn(B, N, H, D, generator=rng, dtype=torch.float64) for _ in range(L)]
    values = [torch.randn(B, Hkv, N, D, generator=rng, dtype=torch.float64) for _ in range(L)]
    rows = torch.as_tensor([[1, 4, 6], [2, 5, -1]])
    ag = sal._attention_times_grad_layers(probs, d_outs, values, rows)
    for i in range(L):
        torch.testing.assert_close(ag[i], sal.attention_times_grad(probs[i], d_outs[i], values[i], rows))


def test_probes_switch_only_the_configs_their_modules_read(single64):
    vlm, batch = single64
    attn = [vlm.adapter.lm_attention(vlm.lm_layers[0])]
    every = _configs(vlm.model)
    some = _configs(vlm.model, attn)
    assert {id(c) for c in some} <= {id(c) for c in every}
    assert id(attn[0].config) in {id(c) for c in some} and id(vlm.model.config) in {id(c) for c in some}
    before = [(c, c._attn_implementation) for c in every]
    with attention_switched(vlm.model, attn):
        assert attn[0].config._attn_implementation == att.ATTN_NAME
    assert all(c._attn_implementation == impl for c, impl in before)
    # a module without a config of its own: the full walk
    assert len(_configs(vlm.model, [torch.nn.Linear(2, 2)])) == len(every)
    # the verbs give what they gave with every config switched
    ds = knockout(vlm, batch, keys="image", queries="last", layers=[0])
    with attention_switched(vlm.model):
        full = knockout(vlm, batch, keys="image", queries="last", layers=[0])
    np.testing.assert_array_equal(ds.logprobs.values, full.logprobs.values)
