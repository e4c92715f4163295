"""Oracle tests of the projector-stage methods on tiny models: every signal is recomputed from an
**eager** copy of the model (``output_attentions`` / ``output_hidden_states`` of the vision tower,
keys and queries from the layer's own modules), fed to the selection rules (themselves checked
against float64 references in test_vision_scoring.py), and the kept sets, scores and merged
embeddings must equal what ``vl.reduce.apply`` / ``select`` produce through capture and hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.reduce import scoring
from vtrlab.reduce.apply import select
from vtrlab.reduce.registry import NotApplicable, get
from vtrlab.testing import tiny


def _images(seed, n=2):
    rng = np.random.default_rng(seed)
    sizes = [(56, 84), (64, 64), (84, 56)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


_CACHE: dict = {}


def _setup(family):
    if family not in _CACHE:
        vlm = tiny(family, seed=0)
        eager = tiny(family, seed=0, attn_implementation="eager")
        batch = vlm.prepare(_images(1), ["what is in the picture ?", "color ?"])
        tower = eager.adapter.vision_tower(eager.model)
        crops = eager.adapter.vision_crops(eager.model, batch.inputs)
        with torch.no_grad():
            out = tower(crops, output_attentions=True, output_hidden_states=True)
        _CACHE[family] = (vlm, eager, batch, out)
    return _CACHE[family]


def _token_patches(lay):
    """Per layout image token, the list of (crop, vpos) patches it covers (from the vision table)."""
    img = lay.kind == "image"
    index = {k: j for j, k in enumerate(zip(lay.image[img], lay.tile[img], lay.row[img], lay.col[img]))}
    out = [[] for _ in range(lay.n_image_tokens)]
    vis = lay.vision
    for r in vis[(vis["kind"] == "patch") & (vis["row"] >= 0)].itertuples():
        j = index.get((r.image, r.tile, r.row, r.col))
        if j is not None:
            out[j].append((int(r.crop), int(r.vpos)))
    return out


def _eager_scores(family, layer_idx, agg="mean"):
    """Per sample per image token: [CLS] (or mean-received) attention of an eager vision layer."""
    vlm, eager, batch, out = _setup(family)
    att = out.attentions[layer_idx].double()  # (crops, H, S, S)
    per_patch = att[:, :, 0, :] if vlm.has_cls else att.mean(2)  # (crops, H, S)
    per_patch = per_patch.mean(1) if agg == "mean" else per_patch.sum(1)
    res = []
    for lay in batch.layouts:
        res.append(np.array([np.mean([float(per_patch[c, v]) for c, v in ps]) for ps in _token_patches(lay)]))
    return res


def _ref_top(scores, k):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    m = np.zeros(len(scores), bool)
    m[order[:k]] = True
    return m


def _kept(ds):
    return [ds.kept.values[i, -1, : int(ds.valid.values[i].sum())] for i in range(ds.sizes["sample"])]


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_fastervlm_and_vtc_cls_match_eager(family):
    vlm, eager, batch, out = _setup(family)
    n = len(vlm.vision_layers)
    ds = vl.reduce.apply(vlm, batch, "fastervlm", keep=0.25)
    ref = _eager_scores(family, n - 2)
    for i, lay in enumerate(batch.layouts):
        np.testing.assert_allclose(ds.score.values[i, 0, : lay.n_image_tokens], ref[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(_kept(ds)[i], _ref_top(ref[i], int(round(0.25 * lay.n_image_tokens))))
    ds = vl.reduce.apply(vlm, batch, "vtc_cls", keep=0.5)
    per = [_eager_scores(family, layer) for layer in range(0, n - 1)]
    for i, lay in enumerate(batch.layouts):
        s = np.sum([p[i] for p in per], axis=0)
        np.testing.assert_array_equal(_kept(ds)[i], _ref_top(s, int(round(0.5 * lay.n_image_tokens))))
    assert ds.attrs["positions"] == "renumbered"


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl"])
def test_divprune_matches_eager_projector_outputs(family):
    vlm, eager, batch, _ = _setup(family) if family != "qwen2_vl" else (tiny(family), None, None, None)
    if batch is None:
        batch = vlm.prepare(_images(1), ["what is in the picture ?", "color ?"])
        eager = tiny(family, seed=0, attn_implementation="eager")
    ds = vl.reduce.apply(vlm, batch, "divprune", keep=0.3)
    dec = eager.adapter.decoder_inputs(eager.model, batch.inputs)  # the eager model's own merge
    for i, lay in enumerate(batch.layouts):
        feats = dec["inputs_embeds"][i, torch.as_tensor(lay.image_positions)].double()
        k = int(round(0.3 * lay.n_image_tokens))
        want = np.zeros(lay.n_image_tokens, bool)
        want[scoring.divprune_select(feats, k).numpy()] = True
        np.testing.assert_array_equal(_kept(ds)[i], want)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_vispruner_matches_eager(family):
    vlm, eager, batch, out = _setup(family)
    n = len(vlm.vision_layers)
    ds = vl.reduce.apply(vlm, batch, "vispruner", keep=7)
    ref = _eager_scores(family, n - 2)
    for i, lay in enumerate(batch.layouts):
        cv = [ps[0] for ps in _token_patches(lay)]  # 1:1 towers: one (crop, vpos) per token
        feats = torch.stack([out.hidden_states[-2][c, v] for c, v in cv]).double()
        want = np.zeros(lay.n_image_tokens, bool)
        want[scoring.vispruner_select(torch.as_tensor(ref[i]), feats, 7).numpy()] = True
        np.testing.assert_array_equal(_kept(ds)[i], want)


def _eager_proj(eager, layer, name, hidden_in):
    mod = eager.adapter.vision_layers(eager.model)[layer]
    with torch.no_grad():
        return getattr(mod.self_attn, name)(mod.layer_norm1(hidden_in))


def test_visionzip_matches_eager_and_conserves_tokens():
    vlm, eager, batch, out = _setup("llava")
    n = len(vlm.vision_layers)
    sel = select(vlm, batch, get("visionzip"), 9)
    heads = eager.model.config.vision_config.num_attention_heads
    for i, lay in enumerate(batch.layouts):
        attn = out.attentions[-2][i, :, 0, 1:].double()
        hidden = out.hidden_states[-2][i].double()  # output of layer n-2, [CLS] first
        keys = _eager_proj(eager, n - 2, "k_proj", out.hidden_states[n - 2][i]).double()
        keys = keys.reshape(keys.shape[0], heads, -1).mean(1)
        res = scoring.visionzip_merge(attn, hidden, keys, *scoring.visionzip_split(9))
        src = res.sources.numpy()
        want = np.zeros(lay.n_image_tokens, bool)
        want[src[src >= 0]] = True
        np.testing.assert_array_equal(sel.keep[i], want)
        with torch.no_grad():
            proj = eager.adapter.projector(eager.model)(res.embeds.float())
        torch.testing.assert_close(
            sel.embeds[i].float(), proj[torch.as_tensor(np.flatnonzero(src >= 0))], rtol=1e-4, atol=1e-5
        )
        assert sel.info["extra"][i][0] == "start"
        torch.testing.assert_close(sel.info["extra"][i][1].float(), proj[:1], rtol=1e-4, atol=1e-5)
        # bookkeeping: 1 [CLS] + kept patches = budget; every patch kept or merged into a kept target
        assert 1 + int(sel.keep[i].sum()) == 9
        assert (sel.group[i] >= 0).all() and sel.keep[i][sel.group[i]].all()


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_prumerge_matches_eager(name):
    vlm, eager, batch, out = _setup("llava")
    n = len(vlm.vision_layers)
    method = get(name, adaptive=False)
    sel = select(vlm, batch, method, 6)
    for i, lay in enumerate(batch.layouts):
        x_in = out.hidden_states[n - 1][i]
        q = _eager_proj(eager, n - 1, "q_proj", x_in).double()
        k = _eager_proj(eager, n - 1, "k_proj", x_in).double()
        attn = scoring.prumerge_cls_attention(q[0], k)
        np.testing.assert_allclose(sel.scores[i], attn.numpy(), rtol=1e-5)
        picked = method.picked(attn, 6)
        res = scoring.prumerge_merge(attn, k[1:], out.hidden_states[-2][i, 1:].double(), picked, 32)
        src = res.sources.numpy()
        want = np.zeros(lay.n_image_tokens, bool)
        want[src[src >= 0]] = True
        np.testing.assert_array_equal(sel.keep[i], want)
        assert int(sel.keep[i].sum()) == 5 and sel.info["extra"][i][0] == "end"
        assert sel.info["extra"][i][1].shape[0] == 1
        with torch.no_grad():
            proj = eager.adapter.projector(eager.model)(res.embeds.float())
        torch.testing.assert_close(sel.embeds[i].float(), proj[:-1], rtol=1e-4, atol=1e-5)


def test_hired_matches_eager():
    vlm, eager, batch, out = _setup("llava_next")
    n = len(vlm.vision_layers)
    ds = vl.reduce.apply(vlm, batch, "hired", keep=0.25)
    for i, lay in enumerate(batch.layouts):
        crops = sorted(lay.vision["crop"].unique())
        a0 = out.attentions[0][crops, :, 0, 1:].double()
        a22 = out.attentions[n - 2][crops, :, 0, 1:].double()
        m = scoring.hired_select(
            a0,
            a22,
            (len(crops) - 1, 1),
            budget_rate=int(round(0.25 * lay.n_image_tokens)) / lay.n_image_tokens,
            alpha=0.5,
        )
        want = np.array([bool(m[crops.index(ps[0][0]), ps[0][1] - 1]) for ps in _token_patches(lay)])
        np.testing.assert_array_equal(_kept(ds)[i], want)


@pytest.mark.parametrize(
    "name,family,why",
    [
        ("prumerge", "llava_onevision", "no \\[CLS\\]"),
        ("hired", "llava", "anyres"),
        ("prumerge_plus", "qwen2_vl", "no \\[CLS\\]"),
        ("flowcut", "llava_onevision", "no \\[CLS\\]"),
    ],
)
def test_not_applicable(name, family, why):
    vlm = tiny(family)
    batch = vlm.prepare(_images(2, 1), ["what ?"])
    with pytest.raises(NotApplicable, match=f"'{name}'.*'{family}'.*{why}"):
        vl.reduce.apply(vlm, batch, name, keep=0.5)


def test_bad_params():
    with pytest.raises(ValueError, match="has no parameter 'layer'; accepted: vision_layer"):
        get("fastervlm", layer=3)
    with pytest.raises(TypeError, match="important_ratio='x'"):
        get("vispruner", important_ratio="x")


def test_selector_keeps_top_logits(tmp_path):
    from vtrlab.recon import Selector, SelectorConfig

    vlm, _, batch, _ = _setup("llava")
    torch.manual_seed(0)
    sel = Selector(SelectorConfig(feature_dim=32, d_model=16, n_heads=2, selector_layers=1, reconstructor_layers=1))
    sel.eval().save(tmp_path / "sel")
    ds = vl.reduce.apply(vlm, batch, "selector", keep=0.5, path=str(tmp_path / "sel"))
    want = sel.select(vlm, batch, ratio=0.5)
    for i in range(len(batch)):
        np.testing.assert_array_equal(_kept(ds)[i], want[i])
    with pytest.raises(NotApplicable, match="trained for the organism"):
        vl.reduce.apply(vlm, batch, "selector", keep=0.5)


def test_cdpruner_with_attached_clip_text_tower():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vlm, eager, batch, out = _setup("llava")
    with pytest.raises(NotApplicable, match="'cdpruner'.*'llava'.*CLIP text tower"):
        vl.reduce.apply(vlm, batch, "cdpruner", keep=6)
    tok = vlm.processor.tokenizer
    torch.manual_seed(0)
    text = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            projection_dim=16,
            eos_token_id=tok.eos_token_id or 2,
        )
    ).eval()
    proj = torch.nn.Linear(32, 16, bias=False)

    def clip_tok(text, return_tensors):
        return tok(text, return_tensors=return_tensors)

    vlm.clip_text = (text, clip_tok, proj)
    try:
        ds = vl.reduce.apply(vlm, batch, "cdpruner", keep=6)
    finally:
        del vlm.clip_text
    dec = eager.adapter.decoder_inputs(eager.model, batch.inputs)
    post = eager.adapter.vision_tower(eager.model).post_layernorm
    for i, lay in enumerate(batch.layouts):
        with torch.no_grad():
            img = proj(post(out.hidden_states[-2][i, 1:])).double()
            ids = tok(batch.prompts[i], return_tensors="pt")["input_ids"]
            pad = (-ids.shape[1]) % 8
            ids = torch.cat([ids, ids.new_zeros(1, pad)], 1).reshape(-1, 8)
            mask = (torch.arange(ids.numel()) < ids.numel() - pad).reshape(-1, 8).long()
            txt = text(input_ids=ids, attention_mask=mask).text_embeds.double()
        rel = scoring.cdpruner_relevance(img, txt)
        feats = dec["inputs_embeds"][i, torch.as_tensor(lay.image_positions)].double()
        want = np.zeros(lay.n_image_tokens, bool)
        want[scoring.cdpruner_select(feats, rel, 6).numpy()] = True
        np.testing.assert_array_equal(_kept(ds)[i], want)


@pytest.mark.parametrize("name,budget", [("visionzip", 9), ("prumerge", 6)])
def test_merged_methods_feed_the_code_sequence_to_the_lm(name, budget):
    """End to end: the LM input is the official code's sequence — text, then the method's tokens in
    its order ([CLS] first for VisionZip, the extra token last for PruMerge), then text, positions
    0..L-1 — and the logits equal a plain forward of that sequence."""
    vlm = tiny("llava", seed=0)
    batch = vlm.prepare(_images(4, 1), ["what is in the picture ?"])
    params = {"adaptive": False} if name == "prumerge" else {}
    sel = select(vlm, batch, get(name, **params), budget)
    where, extra = sel.info["extra"][0]
    lay = batch.layouts[0]
    dec = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)
    emb = dec["inputs_embeds"][0]
    first, last = int(lay.positions.min()), int(lay.positions.max())
    tokens = [sel.embeds[0], extra] if where == "end" else [extra, sel.embeds[0]]
    seq = torch.cat([emb[:first], *tokens, emb[last + 1 :]])[None]
    assert seq.shape[1] == emb.shape[0] - lay.n_image_tokens + budget
    with torch.no_grad():
        want = vlm.model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]).logits[0, -1].float()
    got = vl.reduce.logits(vlm, batch, method=name, keep=budget, **params)
    torch.testing.assert_close(got.last[0], want, rtol=1e-4, atol=1e-4)
    assert (got.source_positions[0] == -2).sum() == 1  # the inserted token is no position of the batch


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3"])
def test_attention_rankers_run_on_every_family(family):
    """Families without an eager tower oracle here (packed / pooled towers): the substitute signal
    (mean attention received, pooled over each token's patches) is finite and budgets are exact."""
    vlm = tiny(family)
    batch = vlm.prepare(_images(5), ["what is in the picture ?", "color ?"])
    for name in ("fastervlm", "vtc_cls"):
        ds = vl.reduce.apply(vlm, batch, name, keep=0.5)
        for i, lay in enumerate(batch.layouts):
            assert int(_kept(ds)[i].sum()) == int(round(0.5 * lay.n_image_tokens))
            assert np.isfinite(ds.score.values[i, 0, : lay.n_image_tokens]).all()
