"""In-LM removal at layer K (vtrlab.reduce.stages.lm) and FastV, on tiny models of every family.

Oracles, built independently of the mechanism:
* removal: the unchanged model's forward in which, from layer K on, the removed image tokens are
  hidden as keys from every query (a pre-hook edits the mask each layer gets; positions unchanged)
  — the logits of every surviving column must match, and greedy decoding (reference: no cache,
  the full sequence re-run each step with the same masking) must give the same tokens;
* FastV: the kept set is the top-k of the head-mean attention of the last prompt token at layer
  K-1, read from HF eager ``output_attentions`` (float32) of an eager copy of the tiny model.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.reduce import generate_ids, logits
from vtrlab.reduce.keep import reduced_decoder_inputs
from vtrlab.reduce.stages.lm import LMMethod
from vtrlab.testing import tiny, tiny_families

FAMILIES = tiny_families()


def _images(seed):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    vlm = tiny(request.param, seed=0)
    batch = vlm.prepare(_images(0), ["what is in the picture ?", "color ?"])
    return vlm, batch


class FixedDrop(LMMethod):
    """Test method: at layer 1 keep the image tokens with the highest seeded random score."""

    name = "fixed_drop"
    positions = "kept"
    defaults = {"seed": 0}

    def lm_layers(self, vlm):
        return [1]

    def lm_score(self, probe, stage):
        return [
            np.random.default_rng([self.params["seed"], i]).random(self._n[i])[t]
            for i, t in enumerate(probe.image_tokens)
        ]


def _method(batch, seed=0):
    m = FixedDrop(seed=seed)
    m._n = [lay.n_image_tokens for lay in batch.layouts]
    return m


def _removed(batch, keep_masks):
    return [lay.image_positions[~k] for lay, k in zip(batch.layouts, keep_masks)]


def _masked_forward(vlm, embeds, attn, pos, extras, blocked_cols, layer):
    """Reference: the model's forward where key columns ``blocked_cols[i]`` are hidden from every
    query at decoder layers >= ``layer`` (the model's own mask otherwise)."""
    handles = []

    def hook(_m, args, kwargs):
        mask = kwargs.get("attention_mask")
        h = args[0] if args else kwargs["hidden_states"]
        B, L = h.shape[:2]
        N = L if mask is None else mask.shape[-1]
        if mask is None:
            mask = torch.ones(L, N, dtype=torch.bool).tril(N - L)[None, None].expand(B, 1, L, N).clone()
        else:
            mask = mask.expand(B, *mask.shape[1:]).clone()
        for i, cols in enumerate(blocked_cols):
            if mask.dtype == torch.bool:
                mask[i, :, :, cols] = False
            else:
                mask[i, :, :, cols] = torch.finfo(mask.dtype).min
        kwargs = dict(kwargs, attention_mask=mask)
        return args, kwargs

    for k, mod in enumerate(vlm.lm_layers):
        if k >= layer:
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return vlm.model(
                inputs_embeds=embeds, attention_mask=attn, position_ids=pos, use_cache=False, **extras
            ).logits.float()
    finally:
        for h in handles:
            h.remove()


def test_removal_equals_masking_logits(setup):
    vlm, batch = setup
    m = _method(batch)
    ds = vl.reduce.apply(vlm, batch, m, keep=0.5)
    keep = [ds.kept.values[i, 0, : lay.n_image_tokens] for i, lay in enumerate(batch.layouts)]
    assert [int(k.sum()) for k in keep] == [int(round(0.5 * lay.n_image_tokens)) for lay in batch.layouts]
    got = logits(vlm, batch, keep=0.5, method=m)
    red = reduced_decoder_inputs(vlm, batch, None)
    src = red.source_positions
    removed = _removed(batch, keep)
    blocked = [np.flatnonzero(np.isin(src[i].numpy(), removed[i])) for i in range(len(batch))]
    ref = _masked_forward(vlm, red.inputs_embeds, red.attention_mask, red.position_ids, red.per_token, blocked, 1)
    # every surviving real column of the reduced run is a column of the full run
    n_checked = 0
    for i in range(len(batch)):
        for j, s in enumerate(got.source_positions[i].tolist()):
            if s < 0:
                continue
            col = int((src[i] == s).nonzero()[0, 0])
            torch.testing.assert_close(got.logits[i, j], ref[i, col], rtol=1e-4, atol=1e-4)
            n_checked += 1
    assert n_checked == sum(int((s >= 0).sum()) - len(r) for s, r in zip(src, removed))
    # the removed columns are really gone (not masked): the run is shorter
    assert got.logits.shape[1] < red.inputs_embeds.shape[1]


def test_removal_decoding_equals_masking(setup):
    vlm, batch = setup
    m = _method(batch, seed=1)
    n_new = 4
    got = generate_ids(vlm, batch, keep=0.5, method=m, max_new_tokens=n_new)
    ds = vl.reduce.apply(vlm, batch, m, keep=0.5)
    keep = [ds.kept.values[i, 0, : lay.n_image_tokens] for i, lay in enumerate(batch.layouts)]
    red = reduced_decoder_inputs(vlm, batch, None)
    src = red.source_positions
    removed = _removed(batch, keep)
    blocked = [np.flatnonzero(np.isin(src[i].numpy(), removed[i])) for i in range(len(batch))]
    embeds, attn, pos = red.inputs_embeds, red.attention_mask, red.position_ids
    extras = dict(red.per_token)
    emb_layer = vlm.model.get_input_embeddings()
    next_pos = red.next_position
    tokens = [[] for _ in range(len(batch))]
    for step in range(n_new):
        out = _masked_forward(vlm, embeds, attn, pos, extras, blocked, 1)
        tok = out[:, -1].argmax(-1)
        for i in range(len(batch)):
            tokens[i].append(int(tok[i]))
        embeds = torch.cat([embeds, emb_layer(tok)[:, None]], 1)
        attn = torch.cat([attn, attn.new_ones(len(batch), 1)], 1)
        pos = torch.cat([pos, next_pos + step], -1)
        extras = {k: torch.cat([v, v.new_zeros(v.shape[0], 1)], 1) for k, v in extras.items()}
    eos = vlm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i in range(len(batch)):
        ref = tokens[i]
        cut = next((t for t, x in enumerate(ref) if x in eos), len(ref))
        assert got[i] == ref[:cut]


def _eager_attention_rows(family, batch, layer):
    """(B, H, N) eager softmax rows of the last prompt token at LM ``layer`` (float32)."""
    vlm_e = tiny(family, seed=0, attn_implementation="eager")
    dec = vlm_e.adapter.decoder_inputs(vlm_e.model, batch.inputs)
    pos = dec["position_ids"]
    if pos.dim() == 2:
        pos = (batch.inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = vlm_e.model(**dict(batch.inputs), position_ids=pos, output_attentions=True, use_cache=False)
    return out.attentions[layer][:, :, -1].float()


def test_fastv_matches_eager_reference(setup):
    vlm, batch = setup
    ds = vl.reduce.apply(vlm, batch, "fastv", keep=0.5, layer=1)
    assert ds.attrs["positions"] == "kept" and list(ds.stage_layer.values) == [1]
    att = _eager_attention_rows(vlm.family, batch, 0).mean(1)  # layer K-1 = 0, head mean
    for i, lay in enumerate(batch.layouts):
        n = lay.n_image_tokens
        s = att[i, torch.as_tensor(lay.image_positions)].double().numpy()
        k = int(round(0.5 * n))
        ref = np.zeros(n, bool)
        ref[np.argsort(-s, kind="stable")[:k]] = True
        np.testing.assert_allclose(ds.score.values[i, 0, :n], s, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(ds.kept.values[i, 0, :n], ref)


def test_fastv_errors(setup):
    vlm, batch = setup
    with pytest.raises(ValueError, match="the LM has 2 decoder layers"):
        vl.reduce.apply(vlm, batch, "fastv", keep=0.5, layer=5)
    with pytest.raises(ValueError, match="must be >= 1"):
        vl.reduce.apply(vlm, batch, "fastv", keep=0.5, layer=0)


def _dart_reference(family, batch, layer, budgets, p_img=4, p_txt=4):
    """DART from its definition on an eager copy: keys of layer K-1 from the model's own KV cache
    (post-RoPE), hidden states entering layer K from ``output_hidden_states`` through the final norm."""
    vlm_e = tiny(family, seed=0, attn_implementation="eager")
    dec = vlm_e.adapter.decoder_inputs(vlm_e.model, batch.inputs)
    pos = dec["position_ids"]
    if pos.dim() == 2:
        pos = (batch.inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = vlm_e.model(**dict(batch.inputs), position_ids=pos, use_cache=True, output_hidden_states=True)
        cache = out.past_key_values
        keys = cache.layers[layer - 1].keys if hasattr(cache, "layers") else cache.key_cache[layer - 1]
        keys = keys.permute(0, 2, 1, 3).flatten(2).double()  # (B, L, kv*hd)
        normed = vlm_e.adapter.language_model(vlm_e.model).norm(out.hidden_states[layer]).double()
    kept = []
    for i, lay in enumerate(batch.layouts):
        img = lay.image_positions
        real = np.flatnonzero(batch.inputs["attention_mask"][i].numpy())
        txt = real[real > img.max()]
        l1 = keys[i].abs().sum(-1).numpy()
        piv_img = [int(img[j]) for j in np.argsort(-l1[img], kind="stable")[:p_img]]
        piv_txt = [int(txt[j]) for j in np.argsort(-l1[txt], kind="stable")[:p_txt]]
        chosen = list(piv_img)
        rest = [int(c) for c in img if int(c) not in chosen]
        extra = budgets[i] - len(piv_img)
        pivots = piv_img + piv_txt
        for j, p in enumerate(pivots):
            take = extra // len(pivots) + (1 if j < extra % len(pivots) else 0)
            sims = [float(torch.nn.functional.cosine_similarity(normed[i, p], normed[i, c], dim=0)) for c in rest]
            picked = [rest[t] for t in np.argsort(sims, kind="stable")[:take]]
            chosen += picked
            rest = [c for c in rest if c not in picked]
        kept.append(np.isin(img, chosen))
    return kept


@pytest.mark.parametrize("keep", [0.5, 12])
def test_dart_matches_eager_reference(setup, keep):
    vlm, batch = setup
    if min(lay.n_image_tokens for lay in batch.layouts) < 12:
        keep = 0.5 if keep == 12 else keep
    budgets = [keep if isinstance(keep, int) else int(round(keep * lay.n_image_tokens)) for lay in batch.layouts]
    if min(budgets) < 4:
        with pytest.raises(ValueError, match="below pivot_image=4"):
            vl.reduce.apply(vlm, batch, "dart", keep=keep, layer=1)
        return
    ds = vl.reduce.apply(vlm, batch, "dart", keep=keep, layer=1)
    ref = _dart_reference(vlm.family, batch, 1, budgets)
    for i, lay in enumerate(batch.layouts):
        np.testing.assert_array_equal(ds.kept.values[i, 0, : lay.n_image_tokens], ref[i])
        assert int(ds.budget[i]) == budgets[i]


def test_sparsevlm_matches_eager_reference(setup):
    """Raters from the LM input embeddings (softmax over text after the image, mean over image tokens,
    above the mean); score = eager attention of layer K-1 from the raters, head mean then rater mean."""
    vlm, batch = setup
    ds = vl.reduce.apply(vlm, batch, "sparsevlm", keep=0.5, layers=(1,))
    vlm_e = tiny(vlm.family, seed=0, attn_implementation="eager")
    dec = vlm_e.adapter.decoder_inputs(vlm_e.model, batch.inputs)
    pos = dec["position_ids"]
    if pos.dim() == 2:
        pos = (batch.inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        att = (
            vlm_e.model(**dict(batch.inputs), position_ids=pos, output_attentions=True, use_cache=False)
            .attentions[0]
            .double()
        )
    emb = dec["inputs_embeds"].float()  # the rater rule is a comparison: float32, as the code computes it
    for i, lay in enumerate(batch.layouts):
        img = lay.image_positions
        real = np.flatnonzero(batch.inputs["attention_mask"][i].numpy())
        txt = real[real > img.max()]
        r = torch.softmax(emb[i, img] @ emb[i, txt].T, -1).mean(0)
        above = (r > r.mean()).numpy()
        raters = txt[above] if above.any() else txt
        s = att[i][:, raters][:, :, img].mean(0).mean(0).numpy()
        n = lay.n_image_tokens
        k = int(round(0.5 * n))
        ref = np.zeros(n, bool)
        ref[np.argsort(-s, kind="stable")[:k]] = True
        np.testing.assert_allclose(ds.score.values[i, 0, :n], s, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(ds.kept.values[i, 0, :n], ref)
