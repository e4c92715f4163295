"""Probes compose and know what they apply to.

* capture / saliency / a second knockout inside ``knocked_out`` see the cut (oracle: the module's own
  HF eager attention with the same edges blocked in its mask — no vtrlab attention code involved);
* a knockout bound to one batch maps the keep-mask path through the kept columns (oracle: the
  knocked-out full sequence with the dropped tokens hidden as keys at unchanged positions) and
  refuses another batch, another length, a cached decode step and appended tokens;
* ``decoder_inputs`` are checked against the batch.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.flow import knocked_out, knockout
from vtrlab.probes import capture
from vtrlab.probes.attention import Site, current_session, session
from vtrlab.probes.switch import _configs
from vtrlab.reduce import answer, decoder_inputs, logits
from vtrlab.testing import tiny

TOL = 1e-5


def _images(seed, n=2):
    rng = np.random.default_rng(seed)
    sizes = ((56, 56), (56, 84), (48, 64))
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module", params=["llava", "gemma3"])
def setup(request):
    vlm = tiny(request.param, seed=0)
    batch = vlm.prepare(_images(0), ["what is in the picture ?", "color ?"])
    return vlm, batch


def _blocked(vlm, batch, cuts):
    """id(attention module) -> (B, N, N) bool edges to remove, from (keys, queries, layers) names."""
    N = batch.inputs["input_ids"].shape[1]
    pick = {
        "image": lambda L: L.image_positions,
        "question": lambda L: L.question_positions,
        "last": lambda L: [L.last_position],
        "all": lambda L: L.valid_positions,
    }
    out = {}
    for keys, queries, layers in cuts:
        for i in layers:
            key_ = id(vlm.adapter.lm_attention(vlm.lm_layers[i]))
            m = out.setdefault(key_, torch.zeros(len(batch), N, N, dtype=torch.bool))
            for b, L in enumerate(batch.layouts):
                q = torch.as_tensor(np.asarray(pick[queries](L)), dtype=torch.long)
                k = torch.as_tensor(np.asarray(pick[keys](L)), dtype=torch.long)
                m[b, q[:, None], k[None, :]] = True
    return out


def _eager_with_cuts(vlm, batch, blocked):
    """HF eager attention of each module (its own ``eager_attention_forward``) with ``blocked`` edges
    set to the mask's minimum; returns (logits, {id(module): weights})."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    weights = {}

    def fn(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        b = blocked.get(id(module))
        if b is not None:
            B, _, Q, N = query.shape[0], None, query.shape[2], key.shape[2]
            base = attention_mask if attention_mask is not None else torch.zeros(B, 1, Q, N, dtype=query.dtype)
            base = base.expand(B, 1, Q, N) if base.shape[0] == 1 else base
            attention_mask = base.masked_fill(b[:, None, :Q, :N], torch.finfo(query.dtype).min)
        out, w = eager(module, query, key, value, attention_mask, **kwargs)
        weights[id(module)] = w.detach()
        return out, w

    AttentionInterface.register("vtrlab_test_cut", fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register("vtrlab_test_cut", eager_mask)
    impls = [(c, c._attn_implementation) for c in _configs(vlm.model)]
    vlm.model.set_attn_implementation("vtrlab_test_cut")
    try:
        with torch.no_grad():
            return vlm.model(**batch.inputs, use_cache=False).logits, weights
    finally:
        vlm.model.set_attn_implementation("sdpa")
        assert all(c._attn_implementation == i for c, i in impls)


def _check_rows(vlm, batch, ds, weights):
    for b in range(len(batch)):
        for qi, p in enumerate(ds.query_position.values[b]):
            if np.isnan(p):
                continue
            for li, layer in enumerate(ds.layer.values):
                ref = weights[id(vlm.adapter.lm_attention(vlm.lm_layers[layer]))][b, :, int(p)].numpy()
                np.testing.assert_allclose(ds.lm_attn.values[b, li, :, qi], ref, atol=TOL, rtol=0)


def test_capture_inside_knocked_out_equals_eager_with_the_cut(setup):
    vlm, batch = setup
    cut = ("image", "last", [0])
    _, ref_w = _eager_with_cuts(vlm, batch, _blocked(vlm, batch, [cut]))
    _, plain_w = _eager_with_cuts(vlm, batch, {})
    seen = []
    hook = vlm.model.register_forward_hook(lambda m, a, out: seen.append(out.logits.detach().clone()))
    try:
        with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
            ds = capture(vlm, batch, queries="all", vision=False)
            with torch.no_grad():
                plain_cut = vlm.model(**batch.inputs, use_cache=False).logits
    finally:
        hook.remove()
    _check_rows(vlm, batch, ds, ref_w)
    # the cut is visible: the last row at layer 0 gives the image nothing (it did without the cut)
    attn0 = plain_w[id(vlm.adapter.lm_attention(vlm.lm_layers[0]))]
    for b, L in enumerate(batch.layouts):
        qi = list(ds.query_position.values[b]).index(L.last_position)
        assert ds.lm_attn.values[b, 0, :, qi][:, L.image_positions].sum() == 0
        assert attn0[b, :, L.last_position][:, L.image_positions].sum() > 1e-3
    # capture never changes the outputs: its forward's logits equal a knocked-out plain forward
    assert torch.equal(seen[0], plain_cut)
    assert current_session() is None


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_capture_inside_a_full_mask_knockout_sees_the_cut(family, monkeypatch):
    """An unpadded one-sample batch runs its cut layers as one sdpa under the full cut mask (CutMask): a capture
    inside sees that mask (oracle: HF eager with the edges blocked), and the outputs are a knocked forward's."""
    from vtrlab.probes import attention as att

    vlm = tiny(family, seed=0)
    batch = vlm.prepare(_images(3, n=1), ["what is in the picture ?"])
    built = []
    real = att.CutMask.__dict__["build"].__func__
    monkeypatch.setattr(
        att.CutMask, "build", classmethod(lambda c, *a, **k: built.append(real(c, *a, **k)) or built[-1])
    )
    layers = [0, len(vlm.lm_layers) - 1]
    _, ref_w = _eager_with_cuts(vlm, batch, _blocked(vlm, batch, [("image", "question", layers)]))
    with knocked_out(vlm, batch, keys="image", queries="question", layers=layers):
        ds = capture(vlm, batch, queries="all", vision=False)
    assert len(built) >= 1 and all(type(b) is att.CutMask for b in built)
    _check_rows(vlm, batch, ds, ref_w)
    L = batch.layouts[0]
    rows = [list(ds.query_position.values[0]).index(q) for q in L.question_positions]
    assert ds.lm_attn.values[0, 0][:, rows][:, :, L.image_positions].sum() == 0
    assert current_session() is None


def test_nested_knockouts_unite_and_restore(setup):
    vlm, batch = setup
    outer, inner = ("image", "last", [0]), ("question", "last", [0, len(vlm.lm_layers) - 1])
    ref_both, w_both = _eager_with_cuts(vlm, batch, _blocked(vlm, batch, [outer, inner]))
    ref_outer, _ = _eager_with_cuts(vlm, batch, _blocked(vlm, batch, [outer]))
    last = torch.as_tensor([L.last_position for L in batch.layouts])
    rows = torch.arange(len(batch))
    with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
        with knocked_out(vlm, batch, keys="question", queries="last", layers=[0, -1]):
            with torch.no_grad():
                both = vlm.model(**batch.inputs, use_cache=False).logits
            ds = capture(vlm, batch, queries="last", vision=False)
        with torch.no_grad():
            after_inner = vlm.model(**batch.inputs, use_cache=False).logits
    torch.testing.assert_close(both[rows, last], ref_both[rows, last], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after_inner[rows, last], ref_outer[rows, last], atol=1e-4, rtol=1e-4)
    _check_rows(vlm, batch, ds, w_both)
    assert current_session() is None
    # knockout (the verb) inside knocked_out: "clean" is the outer cut, "cut" both
    with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
        ko = knockout(vlm, batch, keys="question", queries="last", layers=[0, -1])
    np.testing.assert_allclose(ko.logprobs.values, torch.log_softmax(ref_both[rows, last], -1).numpy(), atol=1e-4)
    want_clean = torch.log_softmax(ref_outer[rows, last], -1).numpy()
    np.testing.assert_allclose(ko.logprobs_clean.values, want_clean, atol=1e-4)


def test_two_recorders_on_one_module_are_refused():
    a = Site("lm", 0, rows=torch.zeros(1, 1, dtype=torch.long), probe="capture")
    b = Site("lm", 0, saliency_rows=torch.zeros(1, 1, dtype=torch.long), probe="saliency")
    with session({1: a}):
        with pytest.raises(ValueError, match="saliency inside capture on the same attention module"):
            with session({1: b}):
                pass
        assert current_session().sites == {1: [a]}
    assert current_session() is None


def test_knockout_refuses_another_batch_or_length(setup):
    vlm, batch = setup
    longer = vlm.prepare(_images(1), ["what is in the picture , and where ?", "color ?"])
    other = vlm.prepare(_images(2), ["what is in the picture ?", "color ?"])  # same shape, other pixels/tokens
    with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
        with pytest.raises(ValueError, match=r"built for a batch of 2 sample\(s\) x \d+ positions.*input_ids of shape"):
            vlm.model(**longer.inputs)
        with pytest.raises(ValueError, match=r"built for a batch of 2 sample\(s\) x \d+ positions"):
            capture(vlm, longer, vision=False)
        with pytest.raises(ValueError, match="runs on 1 sample"):  # no input_ids to check: shapes are
            vlm.model(inputs_embeds=vlm.model.get_input_embeddings()(batch.inputs["input_ids"][:1]))
        if not torch.equal(other.inputs["input_ids"], batch.inputs["input_ids"]):
            with pytest.raises(ValueError, match="built for another batch"):
                vlm.model(**other.inputs)
    assert current_session() is None


def test_keep_mask_path_maps_the_knockout(setup):
    """reduce.logits(keep=...) inside knocked_out == the knocked-out full sequence with the dropped
    tokens hidden as keys at unchanged positions (the keep path's own oracle, see test_answer_keep)."""
    from tiny_cases import reference_logits as _reference_logits

    vlm, batch = setup
    rng = np.random.default_rng(5)
    keep = [rng.random(L.n_image_tokens) < 0.5 for L in batch.layouts]
    am = batch.inputs["attention_mask"].clone()
    for i, (L, k) in enumerate(zip(batch.layouts, keep)):
        am[i, torch.as_tensor(L.image_positions[~k])] = 0
    with knocked_out(vlm, batch, keys="image", queries="last", layers="all"):
        got = logits(vlm, batch, keep).last
        ref = _reference_logits(vlm, batch, attention_mask=am)[:, -1]
        one = answer(vlm, batch, keep=keep, max_new_tokens=1)  # the prefill only: mapped, no decode step
    plain = logits(vlm, batch, keep).last
    assert (got - ref).abs().max().item() < 1e-4
    assert (got - plain).abs().max().item() > 1e-4  # not a silent no-op
    tok = getattr(vlm.processor, "tokenizer", vlm.processor)
    assert one == [tok.decode([int(t)], skip_special_tokens=True).strip() for t in got.argmax(-1)]


def test_knockout_refuses_decode_steps_and_appended_tokens(setup):
    vlm, batch = setup
    with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
        with pytest.raises(ValueError, match="cannot apply to a cached decode step"):
            answer(vlm, batch, max_new_tokens=4)
        with pytest.raises(ValueError, match="cannot apply to tokens appended after the prompt"):
            logits(vlm, batch, append=[[1], [1]])
        with pytest.raises(ValueError, match="cannot apply to a cached decode step"):
            vlm.model.generate(**batch.inputs, max_new_tokens=3, do_sample=False)
    assert current_session() is None


def test_decoder_inputs_are_checked_against_the_batch(setup):
    vlm, batch = setup
    one = vlm.prepare(_images(0, 1), ["what is in the picture ?"])
    other = vlm.prepare(_images(2), ["what is in the picture ?", "color ?"])
    dec = decoder_inputs(vlm, batch)
    assert answer(vlm, batch, decoder_inputs=dec, max_new_tokens=2) == answer(vlm, batch, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"hold 2 sample\(s\) x \d+ positions, but the batch has 1 x"):
        answer(vlm, one, decoder_inputs=dec)
    if tuple(other.inputs["input_ids"].shape) == tuple(batch.inputs["input_ids"].shape):
        with pytest.raises(ValueError, match="built for another batch"):
            answer(vlm, other, decoder_inputs=dec)
    raw = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)
    with pytest.raises(ValueError, match="no batch fingerprint"):
        logits(vlm, batch, decoder_inputs=raw)


def test_public_family_of_verbs():
    import inspect

    for verb in (vl.capture, vl.saliency, vl.knockout, vl.knocked_out):
        params = inspect.signature(verb).parameters
        assert list(params)[:2] == ["vlm", "batch"]
        assert all(p.kind is p.KEYWORD_ONLY for n, p in params.items() if n not in ("vlm", "batch"))
        assert "queries" in params and "layers" in params and "rows" not in params
    assert "keys" in inspect.signature(vl.knockout).parameters


def test_a_new_recorder_kind_plugs_in_and_sees_the_cut(setup):
    """A site with ``on_call`` (how rollout-like recorders plug in) gets the final mask of each call."""
    from vtrlab.probes import attention_switched

    vlm, batch = setup
    got = []
    attn0 = vlm.adapter.lm_attention(vlm.lm_layers[0])
    site = Site("lm", 0, probe="recorder", on_call=lambda s, m, q, k, v, mask, *rest: got.append(mask))
    with knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
        with attention_switched(vlm.model), session({id(attn0): site}), torch.no_grad():
            vlm.model(**batch.inputs, use_cache=False)
    (mask,) = got
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    for b, L in enumerate(batch.layouts):
        assert not allowed[b, :, L.last_position, L.image_positions].any()
        assert allowed[b, :, L.last_position, L.last_position].all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keys": [1.7]}, r"keys: 1.7 is not an integer position"),
        ({"queries": [True]}, r"queries: True is not an integer position"),
        ({"layers": True}, r"layers=True is not accepted"),
        ({"layers": [0.0]}, r"layers: 0.0 is not an index"),
        ({"keys": "pixels"}, r"keys='pixels' is not accepted; use one of \('last', 'question', 'text', 'all', 'image'"),
        ({"queries": "image_block"}, r"queries='image_block' is not accepted"),
    ],
)
def test_knockout_selectors_are_strict(setup, kwargs, match):
    vlm, batch = setup
    with pytest.raises(ValueError, match=match):
        knockout(vlm, batch, **kwargs)
    with pytest.raises(ValueError, match=match):
        with knocked_out(vlm, batch, **kwargs):
            pass
    assert current_session() is None
