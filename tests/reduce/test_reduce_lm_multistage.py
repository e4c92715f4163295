"""Multi-stage in-LM pruning with renumbered positions (PyramidDrop) on the organism (6 LM layers).

Oracle, independent of the mechanism: an **eager** copy of the model run on the full sequence,
where from each stage layer on the removed tokens are hidden as keys from every query and the
rotary embeddings are recomputed at positions recounted over the surviving real tokens. Stage by
stage, the reference ranks the surviving image tokens by the eager ``output_attentions`` row of
the last prompt token at the stage layer (head mean) and keeps the top ones; the mechanism's kept
sets must equal it and its logits (surviving columns) must equal the reference's.
"""

import copy

import numpy as np
import pytest
import torch

import vtrlab as vl
from vtrlab.data.synthetic import make_sample
from vtrlab.reduce import logits
from vtrlab.reduce.keep import reduced_decoder_inputs

LAYERS = (1, 3, 5)


@pytest.fixture(scope="module")
def organism():
    vlm = vl.load("organism")
    samples = [make_sample(0, i, fam) for i, fam in enumerate(["color", "count"])]
    batch = vlm.prepare([s.image for s in samples], [s.question for s in samples])
    eager = copy.deepcopy(vlm.model)
    eager.set_attn_implementation("eager")
    return vlm, batch, eager


def _reference(vlm, eager, red, blocked_per_stage, attentions=False, renumber=True):
    """Eager forward: from LAYERS[j] on, columns blocked_per_stage[j] (cumulative) are hidden as keys and
    positions are recounted over the unblocked real columns."""
    lm = vlm.adapter.language_model(eager)
    layers = vlm.adapter.lm_layers(eager)
    real = red.attention_mask.bool()
    handles = []

    def make(j):
        def hook(_m, args, kwargs):
            h = args[0]
            B, L = h.shape[:2]
            blocked = torch.zeros(B, L, dtype=torch.bool)
            for i, cols in enumerate(blocked_per_stage[j]):
                blocked[i, cols] = True
            causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
            allowed = causal & (real & ~blocked)[:, None, None, :]
            allowed = allowed | torch.eye(L, dtype=torch.bool)[None, None]  # pad rows keep a key
            mask = torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
            if not renumber:
                return args, dict(kwargs, attention_mask=mask)
            pos = ((real & ~blocked).long().cumsum(-1) - 1).clamp_min(0)
            return args, dict(kwargs, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos))

        return hook

    for j, k in enumerate(LAYERS):
        if j < len(blocked_per_stage):
            for li in range(k, LAYERS[j + 1] if j + 1 < len(blocked_per_stage) else len(layers)):
                handles.append(layers[li].register_forward_pre_hook(make(j), with_kwargs=True))
    try:
        with torch.no_grad():
            return eager(
                inputs_embeds=red.inputs_embeds,
                attention_mask=red.attention_mask,
                position_ids=red.position_ids,
                use_cache=False,
                output_attentions=attentions,
            )
    finally:
        for h in handles:
            h.remove()


def test_pyramiddrop_matches_eager_reference(organism):
    vlm, batch, eager = organism
    keep = 0.125
    ds = vl.reduce.apply(vlm, batch, "pyramiddrop", keep=keep, layers=LAYERS)
    assert ds.attrs["positions"] == "renumbered" and list(ds.stage_layer.values) == list(LAYERS)
    red = reduced_decoder_inputs(vlm, batch, None)
    src = red.source_positions.numpy()
    n_img = [lay.n_image_tokens for lay in batch.layouts]
    alive = [np.ones(n, bool) for n in n_img]
    blocked: list[list[np.ndarray]] = []
    for j, k in enumerate(LAYERS):
        out = _reference(vlm, eager, red, blocked, attentions=True)
        row = out.attentions[k][:, :, -1].mean(1).double()  # (B, L) last prompt token, head mean
        stage_blocked = []
        for i, lay in enumerate(batch.layouts):
            cols = np.searchsorted(src[i], lay.image_positions)  # image columns in the run
            s = row[i, cols].detach().numpy()
            last = j == len(LAYERS) - 1
            n_keep = int(round(keep * n_img[i])) if last else int(round(n_img[i] * keep ** ((j + 1) / len(LAYERS))))
            cand = np.flatnonzero(alive[i])
            order = cand[np.argsort(-s[cand], kind="stable")]
            new_alive = np.zeros(n_img[i], bool)
            new_alive[order[:n_keep]] = True
            np.testing.assert_allclose(ds.score.values[i, j, cand], s[cand], rtol=1e-4, atol=1e-7)
            np.testing.assert_array_equal(ds.kept.values[i, j, : n_img[i]], new_alive)
            alive[i] = new_alive
            stage_blocked.append(cols[~new_alive])
        blocked.append(stage_blocked)
    ref = _reference(vlm, eager, red, blocked).logits.float()
    got = logits(vlm, batch, keep=keep, method="pyramiddrop", layers=LAYERS)
    for i in range(len(batch)):
        for j, s in enumerate(got.source_positions[i].tolist()):
            if s >= 0:
                col = int(np.flatnonzero(src[i] == s)[0])
                torch.testing.assert_close(got.logits[i, j], ref[i, col], rtol=1e-4, atol=1e-4)
    assert torch.equal(got.last.argmax(-1), ref[:, -1].argmax(-1))


def test_pyramiddrop_decodes_and_is_not_applicable_on_mrope(organism):
    vlm, batch, _ = organism
    out = vl.answer(vlm, batch, method="pyramiddrop", keep=0.125, layers=LAYERS, max_new_tokens=4)
    assert len(out) == len(batch)
    from vtrlab.testing import tiny

    q = tiny("qwen2_vl")
    qb = q.prepare([batch.images[0][0]], ["color ?"])
    with pytest.raises(vl.reduce.NotApplicable, match="pyramiddrop.*qwen2_vl.*mRoPE"):
        vl.reduce.apply(q, qb, "pyramiddrop", keep=0.5, layers=(1,))


def _no_rope_row(vlm, eager, red, blocked_cols, layer):
    """Reference FEATHER score: eager forward (removed keys masked from ``layer``'s predecessors'
    stages), the input of ``layer`` captured, then softmax(q_last·Kᵀ/√d) without RoPE in float64."""
    layers = vlm.adapter.lm_layers(eager)
    got = {}

    def grab(_m, args, kwargs):
        got["h"] = args[0]

    h = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _reference(vlm, eager, red, blocked_cols, renumber=False)
    finally:
        h.remove()
    lay = layers[layer]
    att = lay.self_attn
    with torch.no_grad():
        x = lay.input_layernorm(got["h"]).double()
    B, L, _ = x.shape
    hd = att.head_dim
    q = x[:, -1:] @ att.q_proj.weight.double().T + (att.q_proj.bias.double() if att.q_proj.bias is not None else 0)
    k = x @ att.k_proj.weight.double().T + (att.k_proj.bias.double() if att.k_proj.bias is not None else 0)
    q = q.view(B, 1, -1, hd).transpose(1, 2)
    n_kv = att.k_proj.out_features // hd
    k = k.view(B, L, n_kv, hd).transpose(1, 2).repeat_interleave(q.shape[1] // n_kv, 1)
    s = (q @ k.transpose(-1, -2))[:, :, 0] / hd**0.5
    real = red.attention_mask.bool().clone()
    if blocked_cols:
        for i, cols in enumerate(blocked_cols[-1]):
            real[i, cols] = False
    s = s.masked_fill(~real[:, None], float("-inf"))
    return torch.softmax(s, -1).mean(1)  # (B, L)


def test_feather_matches_float64_reference(organism):
    from vtrlab.reduce.methods.feather import grid_tokens

    vlm, batch, eager = organism
    layers = (LAYERS[0], LAYERS[1])
    keep, first = 0.09, 0.3
    ds = vl.reduce.apply(vlm, batch, "feather", keep=keep, layers=layers)
    red = reduced_decoder_inputs(vlm, batch, None)
    src = red.source_positions.numpy()
    alive = [np.ones(lay.n_image_tokens, bool) for lay in batch.layouts]
    blocked = []
    for j, k in enumerate(layers):
        row = _no_rope_row(vlm, eager, red, blocked, k)
        stage_blocked = []
        for i, lay in enumerate(batch.layouts):
            n = lay.n_image_tokens
            cols = np.searchsorted(src[i], lay.image_positions)
            s = row[i, cols].detach().numpy()
            budget = int(round(first * n)) if j == 0 else int(round(keep * n))
            cand = np.flatnonzero(alive[i])
            pri = np.where(grid_tokens(lay, 3), np.inf, s) if j == 0 else s
            order = cand[np.argsort(-pri[cand], kind="stable")]
            new = np.zeros(n, bool)
            new[order[:budget]] = True
            np.testing.assert_allclose(ds.score.values[i, j, cand], s[cand], rtol=1e-4, atol=1e-7)
            np.testing.assert_array_equal(ds.kept.values[i, j, :n], new)
            alive[i] = new
            stage_blocked.append(cols[~new])
        blocked.append(stage_blocked)
