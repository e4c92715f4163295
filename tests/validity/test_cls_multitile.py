"""The vision [CLS] signal on multi-tile layouts (LLaVA-NeXT anyres): every crop's own [CLS] attention lands on
the LM image tokens of its view, equal to HF eager attention mapped by the layout's labels, and notebook 01's
causal section (signals, controls, deletion curves, model randomization) runs with it on the photo set."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from vtrlab.analysis import controls as ctl
from vtrlab.analysis import deletion as dl
from vtrlab.analysis import randomization as rz
from vtrlab.analysis import signals as sg
from vtrlab.data.groundtruth import relevant_tokens


@pytest.fixture(scope="module")
def next_and_photos():
    from vtrlab.data.sources import load_data
    from vtrlab.testing import tiny

    vlm = tiny("llava_next", seed=1)
    samples = load_data("photos", n_samples=3, seed=0)
    sub = [s for s in samples if s.has_ground_truth][:2]
    assert len(sub) == 2
    return vlm, sub


def _eager_cls_rows(vlm, batch, layer: int) -> torch.Tensor:
    """HF eager attention of vision layer ``layer``: per tower crop, the [CLS] row, mean over heads (crops, S)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    store: list[torch.Tensor] = []
    target = vlm.adapter.vision_attention(vlm.vision_layers[layer])

    def fn(module, query, key, value, attention_mask, **kwargs):
        out, weights = sys.modules[type(module).__module__].eager_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )
        if module is target:
            store.append(weights.detach())
        return out, weights

    AttentionInterface.register("vtrlab_test_cls_eager", fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register("vtrlab_test_cls_eager", eager_mask)
    vlm.model.set_attn_implementation("vtrlab_test_cls_eager")
    try:
        with torch.no_grad():
            vlm.model(**dict(batch.inputs), use_cache=False)
    finally:
        vlm.model.set_attn_implementation("sdpa")
    w = torch.cat(store)  # (crops, H, S, S)
    return w[:, :, 0].double().mean(1)  # [CLS] is vpos 0 of every crop


def test_cls_signal_of_every_crop_equals_hf_eager_on_its_view(next_and_photos):
    vlm, sub = next_and_photos
    batch = vlm.prepare([s.image for s in sub], [s.question for s in sub])
    layer = len(vlm.vision_layers) - 1
    got = sg.compute(vlm, batch, ["cls_attn"], vision_layers=[layer])[f"cls_attn.{layer}"]
    ref = _eager_cls_rows(vlm, batch, layer)
    for b, lay in enumerate(batch.layouts):
        img = lay.kind == "image"
        assert len(set(lay.tile[img].tolist())) > 1, "the photo must give a multi-tile layout"
        vis = lay.vision_table()
        patches = vis[(vis["kind"] == "patch") & (vis["row"] >= 0)]
        assert patches["crop"].nunique() > 2, "base view and at least two high-resolution crops"
        # reference: each LM token's mean over the patches that carry its (image, tile, row, col) labels
        want = np.zeros(lay.n_image_tokens)
        for j, key in enumerate(zip(lay.image[img], lay.tile[img], lay.row[img], lay.col[img])):
            m = patches[(patches[["image", "tile", "row", "col"]].to_numpy() == np.array(key)).all(1)]
            assert len(m), f"token {key} covers no patch"
            want[j] = (
                ref[m["crop"].to_numpy(np.int64, copy=True), m["vpos"].to_numpy(np.int64, copy=True)].mean().item()
            )
        assert got[b].shape == (lay.n_image_tokens,)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-7)
        # every crop's own [CLS] distribution: tile-1 tokens are not read from the base view's [CLS]
        base = lay.tile[img] == 0
        assert not np.allclose(got[b][~base][: base.sum()], got[b][base][: (~base).sum()])


def test_a_token_without_patch_is_refused(next_and_photos):
    vlm, sub = next_and_photos
    batch = vlm.prepare([sub[0].image], [sub[0].question])
    lay = batch.layouts[0]
    vis = lay.vision_table()
    patches = vis[(vis["kind"] == "patch") & (vis["crop"] != vis["crop"].max())].assign(score=1.0)
    with pytest.raises(ValueError, match=r"image tokens \(views \(image, tile\) \[\(0, 1\)\]\) cover no vision patch"):
        sg.patch_scores_on_tokens(patches, lay)


def test_notebook_01_causal_section_runs_with_cls_on_llava_next(next_and_photos):
    """Notebook 01's section (g) with its default signals on multi-tile layouts (the GPU grid used to skip it)."""
    vlm, sub = next_and_photos
    kinds = ["lm_attn", "cls_attn", "ground_truth", "random"]
    opts = dict(layers=[0, len(vlm.lm_layers) - 1], vision_layers=[len(vlm.vision_layers) - 1], seed=0)
    sigs = sg.compute_over(vlm, sub, kinds, batch_size=2, **opts)
    cls = [k for k in sigs if k.startswith("cls_attn.")]
    assert cls == [f"cls_attn.{len(vlm.vision_layers) - 1}"]
    cb = vlm.prepare([s.image for s in sub], [s.question for s in sub])
    for k in cls:
        for s, lay in zip(sigs[k], cb.layouts):
            assert s.shape == (lay.n_image_tokens,) and np.isfinite(s).all() and s.min() > 0
    rel = [relevant_tokens(lay, s) for lay, s in zip(cb.layouts, sub)]
    obj = [ctl.object_tokens(lay, s) for lay, s in zip(cb.layouts, sub)]
    fams = [s.family for s in sub]
    sc = ctl.signal_controls_ci(ctl.signal_controls(sigs, rel, obj, fams))
    assert set(cls) <= set(sc["signal"])
    curves = dl.deletion_curves(vlm, sub, {k: sigs[k] for k in cls}, fractions=[0.0, 0.5], batch_size=2, seed=0)
    assert set(cls) <= set(curves["signal"])
    rt = rz.randomization_check(
        vlm, cb, sg.signal_fn(["cls_attn"], records=sub, **opts), relevance=rel, objects=obj, families=fams, seed=0
    )
    assert set(cls) <= set(rt["signal"])
