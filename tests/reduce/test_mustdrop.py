"""MustDrop against independent references written from its definition (liuting20/MustDrop).

* Tower: an **eager** copy of the vision tower run block by block through HF's own encoder layers; after
  layer 0 the 3x3 windows (python loops over patch pairs, float64 cosine) whose mean pairwise similarity is
  >= the threshold are averaged into one token ([CLS], merged windows by descending similarity, the rest in
  raster order); the key set is the top ceil(0.08 N) of the eager ``self_attn`` weights' [CLS] row at the
  last layer (head mean); features are the second-to-last layer's output through the projector.
* LM: an eager copy of the model on the reduced inputs; at each stage the eager ``output_attentions`` of layer
  K-1 from every prompt token after the image block gives the dual-attention score; tokens (other than the key
  set) with the lowest scores go, in the counts that reach the budget exactly; from layer K on they are hidden
  as keys from every query and positions are recounted (renumbered). Kept sets, scores and logits must agree.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.data.synthetic import make_sample
from vtrlab.reduce import logits
from vtrlab.reduce.keep import reduced_decoder_inputs
from vtrlab.reduce.methods.mustdrop import THRESHOLDS
from vtrlab.reduce.stages.lm import lm_removal, pre_lm
from vtrlab.testing import tiny, tiny_families

ORG_LAYERS = (1, 2, 3, 4)  # the default (3, 7, 11, 15) of a 32-layer LM scaled to the organism's 8 layers


def _budgets(batch, keep):
    return [keep if isinstance(keep, int) else int(round(keep * lay.n_image_tokens)) for lay in batch.layouts]


def _images(seed, n=2):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def organism():
    vlm = vl.load("organism")
    samples = [make_sample(0, i, fam) for i, fam in enumerate(["color", "count"])]
    batch = vlm.prepare([s.image for s in samples], [s.question for s in samples])
    eager = copy.deepcopy(vlm.model)
    eager.set_attn_implementation("eager")
    return vlm, batch, eager


@pytest.fixture(scope="module")
def llava():
    vlm = tiny("llava")
    batch = vlm.prepare(_images(3), ["what color is the thing?", "how many are there?"])
    eager = copy.deepcopy(vlm.model)
    eager.set_attn_implementation("eager")
    return vlm, batch, eager


# ----------------------------------------------------------------------------------------------- tower
def _raster_to_layout(lay) -> np.ndarray:
    """Layout index of each raster patch (row * side + col) of a single-crop layout."""
    img = lay.kind == "image"
    side = int(lay.col[img].max()) + 1
    out = np.empty(lay.n_image_tokens, dtype=np.int64)
    out[lay.row[img] * side + lay.col[img]] = np.arange(lay.n_image_tokens)
    return out


def _ref_tower(vlm, eager, pixel, n_keep, threshold=0.8, window=3, key_rate=0.08, cap=True):
    """(representative raster patches in the code's order, merged windows (raster members), key-set
    positions in that order, projected features in that order)."""
    tower = vlm.adapter.vision_tower(eager)
    vm = getattr(tower, "vision_model", tower)
    layers = vm.encoder.layers
    n_layers = len(layers)
    cfg = int(eager.config.vision_feature_layer)  # indexes hidden_states: 0 = embeddings, k = output of layer k-1
    feat_layer = n_layers + cfg if cfg < 0 else cfg - 1
    with torch.no_grad():
        h = vm.embeddings(pixel.to(next(vm.parameters()).dtype))
        if getattr(vm, "pre_layrnorm", None) is not None:
            h = vm.pre_layrnorm(h)
        V = h.shape[1] - 1
        side = math.isqrt(V)
        order = list(range(V))
        windows = []
        feats = cls = None
        for li in range(n_layers):
            if li == n_layers - 1:
                _, w = layers[li].self_attn(layers[li].layer_norm1(h), attention_mask=None)
                cls = w[0, :, 0, 1:].double().mean(0)
            h = layers[li](h, None)
            h = h[0] if isinstance(h, tuple) else h
            if li == 0:
                x = h[0, 1:].double()
                cands = []
                for a in range(side // window):
                    for b in range(side // window):
                        mem = [(a * window + u) * side + b * window + v for u in range(window) for v in range(window)]
                        tot = 0.0
                        for p in mem:
                            for q in mem:
                                if p != q:
                                    tot += float(x[p] @ x[q] / (x[p].norm() * x[q].norm()))
                        cands.append((tot / (len(mem) * (len(mem) - 1)), mem))
                chosen = [c for c in cands if c[0] >= threshold]
                chosen = sorted(chosen, key=lambda c: -c[0])  # python's sort is stable
                if cap:
                    chosen = chosen[: (V - n_keep) // (window * window - 1)]
                windows = [c[1] for c in chosen]
                merged = {p for mem in windows for p in mem}
                order = [mem[-1] for mem in windows] + [p for p in range(V) if p not in merged]
                rows = [h[0, 0]] + [h[0, 1:][mem].mean(0) for mem in windows]
                rows += [h[0, 1 + p] for p in range(V) if p not in merged]
                h = torch.stack(rows)[None]
            if li == feat_layer:
                feats = h[0, 1:]
        n_key = math.ceil(key_rate * len(order))
        if cap:
            n_key = min(n_key, n_keep)
        key = sorted(range(len(order)), key=lambda j: -float(cls[j]))[:n_key]
        proj = vlm.adapter.projector(eager)(feats)
    return np.array(order), windows, sorted(key), proj


def _check_tower(vlm, batch, eager, keep, **params):
    method = vl.reduce.get("mustdrop", **params)
    pre = pre_lm(vlm, batch, method, keep)
    crops = vlm.adapter.vision_crops(vlm.model, batch.inputs)
    red = reduced_decoder_inputs(vlm, batch, pre.keep, embeds=pre.embeds, positions="renumbered")
    n_merged = []
    for i, lay in enumerate(batch.layouts):
        n = _budgets(batch, keep)[i]
        thr = params.get("sim_threshold", 0.8)
        order, windows, key, proj = _ref_tower(vlm, eager, crops[i : i + 1], n, threshold=thr)
        lay_of = _raster_to_layout(lay)
        rep = lay_of[order]
        want = np.zeros(lay.n_image_tokens, bool)
        want[rep] = True
        np.testing.assert_array_equal(pre.keep[i], want)
        prot = np.zeros(lay.n_image_tokens, bool)
        prot[rep[key]] = True
        np.testing.assert_array_equal(pre.info["protected"][i], prot)
        # bookkeeping: each merged window points at its last patch (the code's dst), others at nothing
        group = np.full(lay.n_image_tokens, -1)
        for mem in windows:
            group[lay_of[mem]] = lay_of[mem[-1]]
        np.testing.assert_array_equal(pre.group[i], group)
        assert int(pre.keep[i].sum()) + sum(len(m) - 1 for m in windows) == lay.n_image_tokens
        # the LM receives the code's sequence: kept slots (layout order) hold the tokens in the code's order
        src = red.source_positions[i].numpy()
        slot_cols = np.searchsorted(src, lay.image_positions[np.sort(rep)])
        torch.testing.assert_close(red.inputs_embeds[i, slot_cols].double(), proj.double(), rtol=1e-4, atol=1e-5)
        n_merged.append(len(windows))
    return pre, n_merged


def test_tower_stage_matches_eager_reference_organism(organism):
    vlm, batch, eager = organism
    _, merged = _check_tower(vlm, batch, eager, 0.25)
    assert min(merged) > 0, "the organism's uniform backgrounds should merge some windows at 0.8"
    _, capped = _check_tower(vlm, batch, eager, 0.5)  # (256 - 128) // 8 = 16 windows at most
    assert max(capped) <= 16


@pytest.mark.parametrize("threshold", [-1.0, 0.5])
def test_tower_stage_matches_eager_reference_tiny(llava, threshold):
    vlm, batch, eager = llava
    _check_tower(vlm, batch, eager, 6, layers=(1,), sim_threshold=threshold)


# ----------------------------------------------------------------------------------------------- LM
def _masked_forward(vlm, eager, red, starts, blocked, attentions=False):
    """Eager forward of ``red``: from layer ``starts[j]`` on, the columns ``blocked[j][i]`` (cumulative) are
    hidden as keys from every query and positions recounted over the unblocked real columns."""
    lm = vlm.adapter.language_model(eager)
    layers = vlm.adapter.lm_layers(eager)
    real = red.attention_mask.bool()
    handles = []

    def make(j):
        def hook(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            B, L = h.shape[:2]
            blk = torch.zeros(B, L, dtype=torch.bool)
            for i, cols in enumerate(blocked[j]):
                blk[i, cols] = True
            causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
            allowed = causal & (real & ~blk)[:, None, None, :]
            allowed = allowed | torch.eye(L, dtype=torch.bool)[None, None]
            mask = torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
            pos = ((real & ~blk).long().cumsum(-1) - 1).clamp_min(0)
            return args, dict(kwargs, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos))

        return hook

    for j in range(len(blocked)):
        end = starts[j + 1] if j + 1 < len(blocked) else len(layers)
        for li in range(starts[j], end):
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


def _check_lm(vlm, batch, eager, keep, layers, setting="128", **params):
    g, ind = THRESHOLDS[setting]
    ds = vl.reduce.apply(vlm, batch, "mustdrop", keep=keep, layers=layers, setting=setting, **params)
    assert list(ds.stage_layer.values) == [-1, *layers] and ds.attrs["positions"] == "renumbered"
    pre = pre_lm(vlm, batch, vl.reduce.get("mustdrop", layers=layers, setting=setting, **params), keep)
    red = reduced_decoder_inputs(vlm, batch, pre.keep, embeds=pre.embeds, positions="renumbered")
    src = red.source_positions.numpy()
    real = red.attention_mask.bool().numpy()
    budgets = _budgets(batch, keep)
    tokens, alive, text = [], [], []
    for i, lay in enumerate(batch.layouts):
        slots = np.flatnonzero(pre.keep[i])
        cols = np.searchsorted(src[i], lay.image_positions[slots])
        tokens.append((cols, pre.info["content"][i][slots]))  # column -> layout token it holds
        alive.append(np.ones(len(cols), bool))
        text.append(np.flatnonzero((np.arange(src.shape[1]) > cols.max()) & real[i]))
    blocked = []
    for j, k in enumerate(layers):
        out = _masked_forward(vlm, eager, red, layers, blocked, attentions=True)
        att = out.attentions[k - 1].double().mean(1)  # (B, L, L) head mean, layer K-1
        stage_blocked = []
        for i, lay in enumerate(batch.layouts):
            cols, tok = tokens[i]
            n_in = len(cols)
            a = att[i][text[i]][:, cols[alive[i]]].numpy()  # text rows -> image tokens still present
            col_sum = a.sum(0)
            score = np.maximum(col_sum / (col_sum.sum() * g), a.max(0) / ind)
            np.testing.assert_allclose(ds.score.values[i, 1 + j, tok[alive[i]]], score, rtol=1e-4, atol=1e-6)
            n = budgets[i]
            n_stage = n if j == len(layers) - 1 else int(round(n_in * (n / n_in) ** ((j + 1) / len(layers))))
            prot = pre.info["protected"][i][tok[alive[i]]]
            idx = np.flatnonzero(alive[i])
            others = idx[~prot][np.argsort(-score[~prot], kind="stable")]
            new = np.zeros_like(alive[i])
            new[idx[prot]] = True
            new[others[: n_stage - int(prot.sum())]] = True
            kept = np.zeros(lay.n_image_tokens, bool)
            kept[tok[new]] = True
            np.testing.assert_array_equal(ds.kept.values[i, 1 + j, : lay.n_image_tokens], kept)
            assert int(kept.sum()) == n_stage
            alive[i] = new
            stage_blocked.append(cols[~new])
        blocked.append(stage_blocked)
    assert ds.budget.values.tolist() == budgets
    ref = _masked_forward(vlm, eager, red, layers, blocked).logits.float()
    got = logits(vlm, batch, keep=keep, method="mustdrop", layers=layers, setting=setting, **params)
    for i in range(len(batch)):
        for j, s in enumerate(got.source_positions[i].tolist()):
            if s >= 0:
                col = int(np.flatnonzero(src[i] == s)[0])
                torch.testing.assert_close(got.logits[i, j], ref[i, col], rtol=1e-4, atol=1e-4)
    assert torch.equal(got.last.argmax(-1), ref[:, -1].argmax(-1))
    return ds


@pytest.mark.parametrize("keep", [0.1, 40])
def test_lm_stages_match_eager_reference_organism(organism, keep):
    vlm, batch, eager = organism
    ds = _check_lm(vlm, batch, eager, keep, ORG_LAYERS)
    final = ds.kept.values[:, -1]
    assert (final | ~ds.group.values.astype(bool)).any()
    # the key set (protected at the LM input) survives every stage
    pre = pre_lm(vlm, batch, vl.reduce.get("mustdrop", layers=ORG_LAYERS), keep)
    for i in range(len(batch)):
        assert final[i][pre.info["protected"][i]].all()


def test_lm_stage_matches_eager_reference_tiny(llava):
    vlm, batch, eager = llava
    _check_lm(vlm, batch, eager, 5, (1,), setting="64", sim_threshold=-1.0)


# ----------------------------------------------------------------------------------------------- budgets, modes
def test_exact_budgets_and_answers(organism):
    vlm, batch, _ = organism
    n_img = [lay.n_image_tokens for lay in batch.layouts]
    for keep in (0.05, 0.75, 20):
        ds = vl.reduce.apply(vlm, batch, "mustdrop", keep=keep, layers=ORG_LAYERS)
        want = [keep if isinstance(keep, int) else int(round(keep * n)) for n in n_img]
        assert ds.budget.values.tolist() == want
        assert (ds.kept.values.sum(-1)[:, 1:] >= np.array(want)[:, None]).all()
        g = ds.group.values
        for i in range(len(batch)):  # merges point at kept tokens of the LM input; a partition into windows
            assert ds.kept.values[i, 0][g[i][g[i] >= 0]].all()
            sizes = np.bincount(g[i][g[i] >= 0])
            assert set(sizes[sizes > 0].tolist()) <= {9}
    out = vl.answer(vlm, batch, method="mustdrop", keep=0.25, layers=ORG_LAYERS, max_new_tokens=3)
    first = logits(vlm, batch, keep=0.25, method="mustdrop", layers=ORG_LAYERS).last.argmax(-1)
    ids = vl.reduce.generate_ids(vlm, batch, 0.25, max_new_tokens=1, method="mustdrop", layers=ORG_LAYERS)
    assert [t[0] for t in ids] == first.tolist() and len(out) == len(batch)


def test_keep_all_is_the_model(organism):
    """keep=1.0: no window may merge and nothing is dropped, so the LM sees the model's own features (from the
    model's projector layer: the organism feeds it the last vision layer, LLaVA-1.5 the second-to-last)."""
    vlm, batch, _ = organism
    got = logits(vlm, batch, keep=1.0, method="mustdrop", layers=ORG_LAYERS).last
    torch.testing.assert_close(got, logits(vlm, batch, keep=None).last, rtol=1e-4, atol=1e-4)


def test_adaptive_is_the_code_thresholds(organism):
    """adaptive=True: the thresholds alone decide (the code); with thresholds that drop nothing the LM
    keeps every token that entered it, whatever keep says."""
    vlm, batch, _ = organism
    ds = vl.reduce.apply(vlm, batch, "mustdrop", keep=0.1, layers=ORG_LAYERS, adaptive=True, global_thr=0.0)
    np.testing.assert_array_equal(ds.kept.values[:, -1], ds.kept.values[:, 0])
    strict = vl.reduce.apply(
        vlm, batch, "mustdrop", keep=0.1, layers=ORG_LAYERS, adaptive=True, global_thr=1.0, individual_thr=1.0
    )  # every token is a candidate: only the key set survives
    pre = pre_lm(vlm, batch, vl.reduce.get("mustdrop", layers=ORG_LAYERS, adaptive=True), 0.1)
    for i in range(len(batch)):
        np.testing.assert_array_equal(strict.kept.values[i, -1], pre.info["protected"][i])
        n_in = int(pre.keep[i].sum())
        assert pre.info["protected"][i].sum() == math.ceil(0.08 * n_in)


def test_needs_its_pre_stage_and_refuses_bad_params(organism):
    vlm, batch, _ = organism
    m = vl.reduce.get("mustdrop", layers=ORG_LAYERS)
    red = reduced_decoder_inputs(vlm, batch, None)
    with pytest.raises(ValueError, match="mustdrop.*before the LM"):
        with lm_removal(vlm, batch, m, 0.25, red.source_positions):
            pass
    with pytest.raises(ValueError, match="setting='32'.*64, 128, 192"):
        vl.reduce.apply(vlm, batch, "mustdrop", keep=0.25, layers=ORG_LAYERS, setting="32")
    with pytest.raises(ValueError, match="layers"):
        vl.reduce.apply(vlm, batch, "mustdrop", keep=0.25)  # (3, 7, 11, 15) do not fit 8 layers


@pytest.mark.parametrize("family", [f for f in tiny_families() if f != "llava"])
def test_not_applicable_elsewhere(family):
    """Families without a LLaVA-1.5-style single CLIP crop with [CLS] raise NotApplicable, naming why."""
    vlm = tiny(family)
    batch = vlm.prepare(_images(5, 1), ["what color?"])
    with pytest.raises(vl.reduce.NotApplicable, match=f"mustdrop.*{family}"):
        vl.reduce.apply(vlm, batch, "mustdrop", keep=0.5, layers=(1,))
