"""SparseVLM v1.5 recycling (``recycle=True``) on the organism, against a literal re-run of the code's loop.

Oracle: an eager copy of the organism's LM run layer by layer on ONE sample at a time, the sequence
rebuilt at each pruning layer exactly as ``modelling_sparse_llama.py`` does — prefix, kept image
tokens (layout order), the merged cluster tokens appended, the text — with positions ``arange``
(renumbered) and a plain causal mask; scores from the eager attention probabilities of the raters at
the pruning layer (head mean, rater mean). The DPC-KNN merge is checked separately against a numpy
transcription of ``utils.py::cluster_and_merge`` (without its 1e-6 random noise).
"""

import copy

import numpy as np
import pytest
import torch

import vtrlab as vl
from vtrlab.data.synthetic import make_sample
from vtrlab.reduce import logits
from vtrlab.reduce.methods.sparsevlm import SCHEDULES, cluster_and_merge

STAGES = (1, 3, 5)  # stage layers K; the code prunes after layers K - 1 = 0, 2, 4


def _np_cluster(x, k):
    n, C = x.shape
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / np.sqrt(C)
    near = np.sort(dist, axis=-1, kind="stable")[:, :k]
    density = np.exp(-(near**2).mean(-1))
    mask = (density[None, :] > density[:, None]).astype(float)
    d = (dist * mask + dist.max() * (1 - mask)).min(-1)
    score = d * density
    centres = np.argsort(-score, kind="stable")[:k]
    assign = dist[centres].argmin(0)
    assign[centres] = np.arange(k)
    weight = 1.0 / (np.bincount(assign, minlength=k)[assign] + 1e-6)
    merged = np.zeros((k, C))
    for i in range(n):
        merged[assign[i]] += x[i] * weight[i]
    return centres, merged


@pytest.mark.parametrize("n,k", [(7, 1), (23, 3), (40, 5)])
def test_cluster_and_merge_matches_numpy(n, k):
    x = torch.as_tensor(np.random.default_rng(n).normal(size=(n, 6)))
    centres, merged, members = cluster_and_merge(x, k)
    rc, rm = _np_cluster(x.numpy(), k)
    np.testing.assert_array_equal(centres, rc)
    np.testing.assert_allclose(merged.numpy(), rm, rtol=1e-10, atol=1e-12)
    assert sorted(np.concatenate(members).tolist()) == list(range(n))


def _reference(vlm, eager, batch, i, schedule):
    """(kept bool per stage over layout tokens, last-token logits) of sample i, the code's loop."""
    lm = vlm.adapter.language_model(eager)
    layers = vlm.adapter.lm_layers(eager)
    lay = batch.layouts[i]
    dec = vlm.adapter.decoder_inputs(eager, batch.inputs)
    real = np.flatnonzero(batch.inputs["attention_mask"][i].numpy())
    emb = dec["inputs_embeds"][i, real].double()
    img = np.searchsorted(real, lay.image_positions)
    v0, v1 = int(img[0]), int(img[-1]) + 1
    assert np.array_equal(img, np.arange(v0, v1))
    # raters on the input embeddings (float32, as the code)
    v, t = emb[v0:v1].float(), emb[v1:].float()
    r = torch.softmax(v @ t.T, dim=-1).mean(0)
    raters = np.flatnonzero((r > r.mean()).numpy())  # indices into the text after the image
    hidden = emb[None].to(eager.dtype)
    slots = list(range(lay.n_image_tokens))  # layout slot each present image token stands for
    kept_stages = []
    weights = {}
    for li, layer in enumerate(layers):
        L = hidden.shape[1]
        pos = torch.arange(L)[None]
        mask = torch.full((1, 1, L, L), torch.finfo(hidden.dtype).min).triu(1)
        attn = layer.self_attn
        h = attn.register_forward_hook(lambda _m, _a, o: weights.__setitem__("w", o[1]))
        with torch.no_grad():
            out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=lm.rotary_emb(hidden, pos))
        h.remove()
        hidden = out[0] if isinstance(out, tuple) else out
        if li + 1 in STAGES:
            j = STAGES.index(li + 1)
            nv = len(slots)
            w = weights["w"][0].double().mean(0)  # (L, L) head mean
            rel = w[torch.as_tensor(v0 + nv + raters)][:, v0 : v0 + nv].mean(0).numpy()
            k = min(schedule[j], nv - 1)
            keep = np.sort(np.argsort(-rel, kind="stable")[:k])
            dropped = np.setdiff1d(np.arange(nv), keep)
            sel = dropped[np.argsort(-rel[dropped], kind="stable")[: int(len(dropped) * 0.3) + 1]]
            centres, merged, _ = cluster_and_merge(hidden[0, v0 + sel].double(), int(len(sel) / 10) + 1)
            new_img = torch.cat([hidden[0, v0 + keep], merged.to(hidden.dtype)])
            hidden = torch.cat([hidden[:, :v0], new_img[None], hidden[:, v0 + nv :]], 1)
            slots = [slots[s] for s in keep] + [slots[s] for s in sel[centres]]
            kept = np.zeros(lay.n_image_tokens, bool)
            kept[slots] = True
            kept_stages.append(kept)
    with torch.no_grad():
        last = eager.lm_head(lm.norm(hidden[:, -1:]))[0, -1] if hasattr(eager, "lm_head") else None
    return kept_stages, last


def test_recycling_matches_the_codes_loop():
    vlm = vl.load("organism")
    samples = [make_sample(0, i, fam) for i, fam in enumerate(["color", "count"])]
    batch = vlm.prepare([s.image for s in samples], [s.question for s in samples])
    eager = copy.deepcopy(vlm.model)
    eager.set_attn_implementation("eager")
    keep = 32
    params = {"layers": STAGES, "recycle": True}
    ds = vl.reduce.apply(vlm, batch, "sparsevlm", keep=keep, **params)
    assert ds.attrs["positions"] == "renumbered"
    m = vl.reduce.get("sparsevlm", **params)
    m._layers = list(STAGES)
    got = logits(vlm, batch, keep=keep, method="sparsevlm", **params)
    for i, lay in enumerate(batch.layouts):
        schedule = m.lm_schedule(lay.n_image_tokens, keep)
        kept, last = _reference(vlm, eager, batch, i, schedule)
        for j in range(len(STAGES)):
            np.testing.assert_array_equal(ds.kept.values[i, j, : lay.n_image_tokens], kept[j])
        g = ds.group.values[i, : lay.n_image_tokens]
        assert (g >= 0).any()  # merged tokens: members point to a centre slot kept at some stage
        assert ds.kept.values[i].any(0)[g[g >= 0]].all()
        torch.testing.assert_close(got.last[i].float(), last.float(), rtol=1e-4, atol=1e-4)
    assert SCHEDULES["128"] == (303, 110, 36)
