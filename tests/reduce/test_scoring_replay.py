"""What benchmarks/reduce.py relies on to time a method's scoring alone, and the host-side rewrites behind it.

* ``ReductionContext(vlm, batch, signals=ctx.tower_signals())``: a method's selection on a context that holds
  only the tower's raw outputs gives exactly the selection of a fresh run (keep, scores, merged embeddings),
  and runs no tower forward;
* ``_vision.replay_signals``: the instrumented forward alone records the same attention and tensors;
* ``one_to_one`` (array matching) equals the per-row dict lookup it replaced (written again here);
* FlowCut on a tower too shallow for its layer choice is NotApplicable, naming method, family and why.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vtrlab.models.base import KIND_IMAGE
from vtrlab.reduce.apply import select_in_context
from vtrlab.reduce.context import ReductionContext, budgets
from vtrlab.reduce.methods._vision import one_to_one, replay_signals
from vtrlab.reduce.registry import NotApplicable, get, prepare
from vtrlab.testing import tiny

_CACHE: dict = {}


def _setup(family):
    if family not in _CACHE:
        vlm = tiny(family)
        rng = np.random.default_rng(3)
        imgs = [Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(2)]
        _CACHE[family] = (vlm, vlm.prepare(imgs, ["what is it ?", "colour"]))
    return _CACHE[family]


def _old_one_to_one(lay):
    """The per-row loop ``one_to_one`` used to run (reference)."""
    img = lay.kind == KIND_IMAGE
    index = {
        tuple(int(v) for v in k): j
        for j, k in enumerate(zip(lay.image[img], lay.tile[img], lay.row[img], lay.col[img]))
    }
    vis = lay.vision
    patches = vis[(vis["kind"] == "patch") & (vis["row"] >= 0)]
    crop = np.full(lay.n_image_tokens, -1)
    vpos = np.full(lay.n_image_tokens, -1)
    for r in patches.itertuples():
        j = index.get((int(r.image), int(r.tile), int(r.row), int(r.col)))
        if j is None:
            continue
        assert crop[j] < 0
        crop[j], vpos[j] = int(r.crop), int(r.vpos)
    return crop, vpos


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_one_to_one_matches_the_row_loop(family):
    vlm, batch = _setup(family)
    for lay in batch.layouts:
        crop, vpos = one_to_one(lay, vlm.family, "x")
        ref_crop, ref_vpos = _old_one_to_one(lay)
        np.testing.assert_array_equal(crop, ref_crop)
        np.testing.assert_array_equal(vpos, ref_vpos)
        assert (crop >= 0).all()


def _count_tower_calls(vlm):
    calls = []
    handle = vlm.vision_layers[0].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    "family,name", [("llava", "visionzip"), ("llava", "fastervlm"), ("llava", "prumerge"), ("llava_next", "visionzip")]
)
def test_selection_on_replayed_signals_is_the_selection(family, name):
    vlm, batch = _setup(family)
    method = get(name)
    keep = 0.5
    sel, ctx = select_in_context(vlm, batch, method, keep)
    signals = ctx.tower_signals()
    assert "decoder_inputs" in signals and "vision_requests" in signals
    prepare(method, vlm)
    calls, handle = _count_tower_calls(vlm)
    try:
        again = method.select(ReductionContext(vlm, batch, signals=signals), budgets(batch, keep))
    finally:
        handle.remove()
    assert calls == []  # the tower did not run again
    for i in range(len(batch)):
        np.testing.assert_array_equal(again.keep[i], sel.keep[i])
        np.testing.assert_array_equal(again.scores[i], sel.scores[i])
        if sel.embeds[i] is not None:
            torch.testing.assert_close(again.embeds[i], sel.embeds[i], rtol=0, atol=0)

    # the instrumented forward alone records the same signals
    fresh = ReductionContext(vlm, batch)
    replay_signals(fresh, signals["vision_requests"])
    got = fresh.tower_signals()
    for key in ("vision_probs_by_layer", "tower_tensors"):
        assert set(got.get(key, {})) == set(signals.get(key, {}))
        for k, v in signals.get(key, {}).items():
            torch.testing.assert_close(got[key][k], v, rtol=0, atol=0)


def test_signals_refuse_derived_entries():
    vlm, batch = _setup("llava")
    with pytest.raises(ValueError, match=r"signals= holds \['token_attention'\]; accepted keys: decoder_inputs"):
        ReductionContext(vlm, batch, signals={"token_attention": {}})


def test_flowcut_on_too_shallow_a_tower_is_not_applicable():
    vlm, _ = _setup("llava_next")  # 2 vision layers: the feature layer (-2) is layer 0, no block before it
    with pytest.raises(NotApplicable, match=r"'flowcut' is not applicable to family 'llava_next'.*too few tower"):
        prepare(get("flowcut"), vlm)
    prepare(get("flowcut", feature_layer=-1), vlm)  # layer 1: one block to prune in


def _prumerge_loop(cls_attn, keys, feats, picked, n_neighbors):
    """The per-kept-token loop ``prumerge_merge`` used to run (reference)."""
    from vtrlab.reduce.scoring import mask_of, rank_desc

    compl = torch.nonzero(~mask_of(picked, cls_attn.shape[0])).flatten()
    kn = torch.nn.functional.normalize(keys, p=2, dim=-1)
    out = torch.empty(picked.numel(), feats.shape[1], dtype=feats.dtype)
    for i in range(picked.numel()):
        others = torch.cat([picked[:i], picked[i + 1 :], compl])
        nb = others[rank_desc(kn[others] @ kn[picked[i]])[: min(n_neighbors, others.numel())]]
        out[i] = feats[picked[i]] + (feats[nb] * cls_attn[nb, None]).sum(0)
    return out


@pytest.mark.parametrize("n_neighbors", [3, 32, 100])
def test_prumerge_merge_all_at_once_is_the_loop(n_neighbors):
    from vtrlab.reduce.scoring import prumerge_merge

    g = torch.Generator().manual_seed(n_neighbors)
    V, C, D = 40, 8, 12
    keys = torch.randn(V, C, generator=g, dtype=torch.float64)
    keys[7] = keys[3]  # exact ties in the similarities: the earlier candidate wins in both
    keys[20] = keys[3]
    a = torch.rand(V, generator=g, dtype=torch.float64)
    x = torch.randn(V, D, generator=g, dtype=torch.float64)
    picked = torch.tensor([5, 3, 31, 7, 0, 22])
    res = prumerge_merge(a, keys, x, picked, n_neighbors)
    torch.testing.assert_close(res.embeds[:-1], _prumerge_loop(a, keys, x, picked, n_neighbors), rtol=1e-12, atol=1e-12)
    assert res.sources.tolist() == [*picked.tolist(), -1]
    one = prumerge_merge(a, keys, x, picked[:1], n_neighbors)
    torch.testing.assert_close(one.embeds[:-1], _prumerge_loop(a, keys, x, picked[:1], n_neighbors))
