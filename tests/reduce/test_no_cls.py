"""The no-[CLS] substitutes of VisPruner and VisionZip (SigLIP towers, Qwen's ViT), against eager references.

Substitute (LightCompress's Qwen2.5-VL ports, VisPruner issue #1): the mean attention each patch
receives at the last vision layer (head mean), averaged over the patches an LM token covers; VisPruner
deduplicates on the projector outputs, VisionZip merges its contextual tokens there with pooled head-mean
keys as the metric. References: eager tower ``output_attentions`` / the layer's own ``k_proj`` on eager
``output_hidden_states``, the eager model's decoder inputs, and VisionZip's merge re-written here in
float64 from its definition. PruMerge has no honest substitute (its signal is the [CLS] query's own
attention and its budget the outliers of that one row): it raises NotApplicable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.reduce import scoring
from vtrlab.reduce.apply import select
from vtrlab.reduce.registry import NotApplicable, get
from vtrlab.testing import tiny, tiny_families

EAGER_FAMILIES = ["gemma3", "idefics3", "llava_onevision"]


def _images(seed):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
    ]


_CACHE: dict = {}


def _setup(family):
    """Tiny model, eager copy, batch, and the eager last vision layer's input / attention weights / output
    (hooks on the eager copy's own modules, one forward), and its decoder inputs."""
    if family not in _CACHE:
        vlm = tiny(family, seed=0)
        eager = tiny(family, seed=0, attn_implementation="eager")
        batch = vlm.prepare(_images(3), ["what is in the picture ?", "color ?"])
        layer = eager.vision_layers[-1]
        attn = eager.adapter.vision_attention(layer)
        got = {}

        def grab_input(_m, a, kw):
            got.setdefault("input", a[0] if a else kw["hidden_states"])

        def grab_weights(_m, _a, o):
            got.setdefault("weights", o[1])

        def grab_output(_m, _a, o):
            got.setdefault("output", o[0] if isinstance(o, tuple) else o)

        hooks = [
            layer.register_forward_pre_hook(grab_input, with_kwargs=True),
            attn.register_forward_hook(grab_weights),
            layer.register_forward_hook(grab_output),
        ]
        try:
            with torch.no_grad():
                dec = eager.adapter.decoder_inputs(eager.model, batch.inputs)
        finally:
            for h in hooks:
                h.remove()
        assert got["weights"] is not None and got["weights"].dim() == 4
        _CACHE[family] = (vlm, eager, batch, got, dec)
    return _CACHE[family]


def _token_patches(lay):
    img = lay.kind == "image"
    index = {k: j for j, k in enumerate(zip(lay.image[img], lay.tile[img], lay.row[img], lay.col[img]))}
    out = [[] for _ in range(lay.n_image_tokens)]
    vis = lay.vision
    for r in vis[(vis["kind"] == "patch") & (vis["row"] >= 0)].itertuples():
        j = index.get((r.image, r.tile, r.row, r.col))
        if j is not None:
            out[j].append((int(r.crop), int(r.vpos)))
    return out


def _received(got, lay):
    """Per token: mean over its patches of the head-mean attention each patch receives (eager)."""
    per_patch = got["weights"].double().mean(2).mean(1)  # (crops, S): mean over queries, heads
    return np.array([np.mean([float(per_patch[c, v]) for c, v in ps]) for ps in _token_patches(lay)])


def _pooled_keys(eager, got, lay, heads):
    mod = eager.vision_layers[-1]
    with torch.no_grad():
        k = mod.self_attn.k_proj(mod.layer_norm1(got["input"])).double()
    k = k.reshape(*k.shape[:2], heads, -1).mean(2)
    return torch.stack([torch.stack([k[c, v] for c, v in ps]).mean(0) for ps in _token_patches(lay)])


@pytest.mark.parametrize("family", EAGER_FAMILIES)
def test_vispruner_no_cls_matches_eager(family):
    vlm, eager, batch, got, dec = _setup(family)
    ds = vl.reduce.apply(vlm, batch, "vispruner", keep=0.5)
    for i, lay in enumerate(batch.layouts):
        k = int(round(0.5 * lay.n_image_tokens))
        s = _received(got, lay)
        np.testing.assert_allclose(ds.score.values[i, 0, : lay.n_image_tokens], s, rtol=1e-4, atol=1e-8)
        if family == "llava_onevision":  # LLaVA tower, 1:1: duplicates on the layer's patch features
            feats = torch.stack([got["output"][c, v] for ((c, v),) in _token_patches(lay)]).double()
            assert ds.attrs["positions"] == "renumbered"
        else:  # tokens merge patches: duplicates on the projector outputs
            feats = dec["inputs_embeds"][i, torch.as_tensor(lay.image_positions)].double()
            assert ds.attrs["positions"] == "kept"
        want = np.zeros(lay.n_image_tokens, bool)
        want[scoring.vispruner_select(torch.as_tensor(s), feats, k).numpy()] = True
        np.testing.assert_array_equal(ds.kept.values[i, 0, : lay.n_image_tokens], want)


def _visionzip_ref(attn, emb, keys, n):
    """VisionZip without [CLS], float64, from its definition (LightCompress's Qwen2.5-VL port)."""
    C = int(round(n * 10 / 64))
    D = n - C
    V = len(attn)
    dom = sorted(sorted(range(V), key=lambda j: (-attn[j], j))[:D])
    rest = [j for j in range(V) if j not in dom]
    R = len(rest)
    targets = [rest[t] for t in range(0, R, max(1, R // C))[:C]] if C else []
    others = [j for j in rest if j not in targets]
    kn = keys / keys.norm(dim=-1, keepdim=True)
    assigned = {t: [] for t in targets}
    for j in others:
        sims = [float(kn[j] @ kn[t]) for t in targets]
        assigned[targets[int(np.argmax(sims))]].append(j)
    tokens = {j: emb[j] for j in dom}
    for t, members in assigned.items():
        tokens[t] = emb[t] + (emb[members].mean(0) if members else 0)
    kept = sorted(tokens)
    return kept, torch.stack([tokens[j] for j in kept])


@pytest.mark.parametrize("family", EAGER_FAMILIES)
def test_visionzip_no_cls_matches_eager(family):
    vlm, eager, batch, got, dec = _setup(family)
    heads = eager.model.config.vision_config.num_attention_heads
    sel = select(vlm, batch, get("visionzip"), 0.5)
    for i, lay in enumerate(batch.layouts):
        budget = int(round(0.5 * lay.n_image_tokens))
        s = _received(got, lay)
        keys = _pooled_keys(eager, got, lay, heads)
        emb = dec["inputs_embeds"][i, torch.as_tensor(lay.image_positions)].double()
        kept, tokens = _visionzip_ref(s, emb, keys, budget)
        want = np.zeros(lay.n_image_tokens, bool)
        want[kept] = True
        np.testing.assert_array_equal(sel.keep[i], want)
        assert int(sel.keep[i].sum()) == budget  # no [CLS] slot: the budget is all image tokens
        torch.testing.assert_close(sel.embeds[i].double(), tokens, rtol=1e-4, atol=1e-5)
        g = sel.group[i]
        assert (g[sel.keep[i]] == np.flatnonzero(sel.keep[i])).all() and (g >= 0).all()


@pytest.mark.parametrize("family", [f for f in tiny_families() if f not in ("llava", "llava_next")])
def test_substitutes_run_with_exact_budgets_and_kept_positions(family):
    vlm = tiny(family, seed=0)
    batch = vlm.prepare(_images(4), ["what is in the picture ?", "color ?"])
    for name in ("vispruner", "visionzip"):
        ds = vl.reduce.apply(vlm, batch, name, keep=0.5)
        want = [int(round(0.5 * lay.n_image_tokens)) for lay in batch.layouts]
        assert ds.budget.values.tolist() == want
        assert np.isfinite(ds.score.values[0, 0, : batch.layouts[0].n_image_tokens]).all()
        ans = vl.answer(vlm, batch, method=name, keep=0.5, max_new_tokens=2)
        assert len(ans) == len(batch)


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_prumerge_has_no_substitute(name):
    vlm = tiny("qwen2_vl", seed=0)
    batch = vlm.prepare(_images(4)[:1], ["what ?"])
    with pytest.raises(NotApplicable, match=f"'{name}'.*'qwen2_vl'.*no \\[CLS\\]"):
        vl.reduce.apply(vlm, batch, name, keep=0.5)
