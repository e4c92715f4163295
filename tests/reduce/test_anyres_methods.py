"""Anyres (LLaVA-NeXT / LLaVA-OneVision: a base view + tiles, each its own vision sequence) variants of
VisionZip, PruMerge, ToMe and FlowCut, checked per crop against independent references.

Every reference is written here from the method's definition, in float64 Python/numpy, on signals
of an **eager** copy of the tiny model (``output_attentions`` / ``output_hidden_states`` of the vision
tower; keys and queries from the layer's own modules; ToMe and FlowCut re-run block by block with
explicit loops). The crops and the patches that reach the LM come from the layout's vision table;
the budget is split over the crops in proportion to their image tokens (largest remainder, written
again here). Checked: kept / merged sets per crop, merged embeddings, the exact sequence the LM
receives (newline tokens kept, [CLS] / extra tokens where the docstrings say), bookkeeping (every
patch accounted for exactly once) and exact budgets.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from vtrlab.reduce.apply import select
from vtrlab.reduce.keep import reduced_decoder_inputs
from vtrlab.reduce.registry import get
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
        crops = eager.adapter.vision_crops(eager.model, batch.inputs)
        with torch.no_grad():
            out = eager.adapter.vision_tower(eager.model)(crops, output_attentions=True, output_hidden_states=True)
        _CACHE[family] = (vlm, eager, batch, out, crops)
    return _CACHE[family]


def _crops(lay):
    """{crop: [(layout token index, vpos), ...] in vpos order} from the vision table and the layout."""
    img = lay.kind == "image"
    index = {k: j for j, k in enumerate(zip(lay.image[img], lay.tile[img], lay.row[img], lay.col[img]))}
    out: dict[int, list] = {}
    vis = lay.vision
    for r in vis[(vis["kind"] == "patch") & (vis["row"] >= 0)].itertuples():
        j = index.get((r.image, r.tile, r.row, r.col))
        if j is not None:
            out.setdefault(int(r.crop), []).append((j, int(r.vpos)))
    return {c: sorted(v, key=lambda t: t[1]) for c, v in sorted(out.items())}


def _split(n, sizes):
    """Largest remainder with exact fractions (ties: the earlier crop)."""
    total = sum(sizes)
    quota = [Fraction(n * s, total) for s in sizes]
    base = [q.numerator // q.denominator for q in quota]
    rest = sorted(range(len(sizes)), key=lambda j: (-(quota[j] - base[j]), j))[: n - sum(base)]
    return [b + (j in rest) for j, b in enumerate(base)]


def _top(scores, k):
    return sorted(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k])


def _proj(eager, feats):
    with torch.no_grad():
        return eager.adapter.projector(eager.model)(torch.as_tensor(np.asarray(feats), dtype=torch.float32))


def _layer_in(eager, layer, hidden_in, name):
    mod = eager.adapter.vision_layers(eager.model)[layer]
    with torch.no_grad():
        return getattr(mod.self_attn, name)(mod.layer_norm1(hidden_in)).double().numpy()


def _lm_sequence(vlm, batch, i, slot_embeds, before=None, after=None):
    """What the LM must receive for sample i (renumbered positions): the model's own decoder inputs
    with the image tokens in ``slot_embeds`` ({token: embedding}) replaced and the others removed,
    ``before[t]`` / ``after[t]`` (lists of embeddings) inserted before / after image token t."""
    dec = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)
    lay = batch.layouts[i]
    tok_at = {int(p): t for t, p in enumerate(lay.image_positions)}
    rows = []
    for p in np.flatnonzero(dec["attention_mask"][i].cpu().numpy()):
        t = tok_at.get(int(p))
        rows += list((before or {}).get(t, []))
        if t is None:
            rows.append(dec["inputs_embeds"][i, p])
        elif t in slot_embeds:
            rows.append(torch.as_tensor(slot_embeds[t]))
        rows += list((after or {}).get(t, []))
    return torch.stack([r.float() for r in rows])


def _received(vlm, batch, sel, positions="renumbered"):
    red = reduced_decoder_inputs(
        vlm, batch, sel.keep, embeds=sel.embeds, positions=positions, extra=sel.info.get("extra")
    )
    return [red.inputs_embeds[i][red.attention_mask[i].bool()].float() for i in range(len(batch))]


def test_layout_is_one_to_one_on_anyres():
    """The premise of every anyres path: on llava_next / llava_onevision each LM image token is one
    vision patch of one crop; the image block's other tokens are newlines; the patches without a
    token are exactly the ones the layout marks unpadded (row -1)."""
    for family in ("llava_next", "llava_onevision"):
        _, _, batch, _, _ = _setup(family)
        for lay in batch.layouts:
            crops = _crops(lay)
            toks = [j for v in crops.values() for j, _ in v]
            assert sorted(toks) == list(range(lay.n_image_tokens))  # a partition of the image tokens
            assert len(crops) > 1
            block = (lay.positions >= lay.image_positions.min()) & (lay.positions <= lay.image_positions.max())
            assert set(lay.kind[block]) <= {"image", "newline"}
            vis = lay.vision
            n_patch = int((vis["kind"] == "patch").sum())
            assert n_patch - lay.n_image_tokens == int(((vis["kind"] == "patch") & (vis["row"] < 0)).sum())
    # the first llava_next sample is padded: some tiles lose patches to unpadding
    _, _, batch, _, _ = _setup("llava_next")
    assert any(len(v) < 16 for v in _crops(batch.layouts[0]).values())


# ---------------------------------------------------------------------------------------------
# VisionZip


def _visionzip_ref(attn, hidden, keys, n_c):
    """One crop: attn (P,) summed [CLS] attention of the LM patches; hidden / keys (1+P, ·), [CLS] first.
    Returns (outputs in LM order as (patch index or -1, feature)), group {patch: patch it went into}."""
    C = int(round(n_c * 10 / 64))
    dom = _top(list(attn), n_c - C - 1)
    out = [(-1, hidden[0])] + [(j, hidden[1 + j]) for j in dom]
    group = {j: j for j in dom}
    rest = [j for j in range(len(attn)) if j not in dom]
    if C:
        step = max(1, len(rest) // C)
        targets = list(range(0, len(rest), step))[:C]
        kn = keys[1:] / np.linalg.norm(keys[1:], axis=1, keepdims=True)
        assigned = {t: [] for t in targets}
        for r in range(len(rest)):
            if r in targets:
                continue
            sims = [kn[rest[r]] @ kn[rest[t]] for t in targets]
            assigned[targets[int(np.argmax(sims))]].append(rest[r])
        for t in targets:
            a = assigned[t]
            feat = hidden[1 + rest[t]] + (np.mean([hidden[1 + j] for j in a], 0) if a else 0.0)
            out.append((rest[t], feat))
            group[rest[t]] = rest[t]
            group.update({j: rest[t] for j in a})
    return out, group


@pytest.mark.parametrize("keep", [0.25, 0.5, 23])
def test_visionzip_per_crop_matches_eager(keep):
    vlm, eager, batch, out, _ = _setup("llava_next")
    sel = select(vlm, batch, get("visionzip"), keep)
    heads = eager.model.config.vision_config.num_attention_heads
    got = _received(vlm, batch, sel)
    for i, lay in enumerate(batch.layouts):
        n = keep if isinstance(keep, int) else int(round(keep * lay.n_image_tokens))
        crops = _crops(lay)
        want_keep = np.zeros(lay.n_image_tokens, bool)
        want_group = np.full(lay.n_image_tokens, -1)
        slots, before, after = {}, {}, {}
        n_lm = 0
        tile_cls = []
        for (c, tv), n_c in zip(crops.items(), _split(n, [len(v) for v in crops.values()])):
            toks = [t for t, _ in tv]
            vpos = [v for _, v in tv]
            a = out.attentions[0][c, :, 0].double().numpy().sum(0)[vpos]  # vision layer -2 = layer 0
            np.testing.assert_allclose(sel.scores[i][toks], a, rtol=1e-4, atol=1e-7)
            if n_c == 0:
                continue
            h = out.hidden_states[1][c].double().numpy()[[0] + vpos]
            k = _layer_in(eager, 0, out.hidden_states[0][c], "k_proj")[[0] + vpos]
            k = k.reshape(k.shape[0], heads, -1).mean(1)
            outs, group = _visionzip_ref(a, h, k, n_c)
            n_lm += len(outs)
            proj = _proj(eager, [f for _, f in outs])
            for j, t in group.items():
                want_group[toks[j]] = toks[t]
            kept = [toks[j] for j, _ in outs if j >= 0]
            want_keep[kept] = True
            if c == min(crops):  # base view: its run of slots in the method's order, its [CLS] before it
                for s, e in zip(sorted(kept), proj[1:]):
                    slots[s] = e
                before.setdefault(min(toks), []).append(proj[0])
            else:  # grid: own slots, [CLS] after the grid
                for (j, _), e in zip(outs, proj):
                    if j >= 0:
                        slots[toks[j]] = e
                tile_cls.append(proj[0])
        last = int(np.argmax(lay.image_positions))
        after[last] = tile_cls
        np.testing.assert_array_equal(sel.keep[i], want_keep)
        np.testing.assert_array_equal(sel.group[i], want_group)
        assert n_lm == n  # exact budget: LM tokens = kept patches + one [CLS] per crop
        assert int(sel.keep[i].sum()) + sum(e.shape[0] for _, e in sel.info["extra"][i]) == n
        # bookkeeping: a merge goes into a kept token of the same crop; with contextual tokens every
        # patch of the crop is accounted for (kept, or merged into a contextual token)
        crop_of = {t: c for c, tv in crops.items() for t, _ in tv}
        g = sel.group[i]
        assert all(sel.keep[i][g[t]] and crop_of[int(g[t])] == crop_of[t] for t in np.flatnonzero(g >= 0))
        for (c, tv), n_c in zip(crops.items(), _split(n, [len(v) for v in crops.values()])):
            if round(n_c * 10 / 64) > 0:
                assert (g[[t for t, _ in tv]] >= 0).all()
        torch.testing.assert_close(got[i], _lm_sequence(vlm, batch, i, slots, before, after), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# PruMerge


def _prumerge_ref(q, k, x, vpos, n_c, n_nb):
    """One crop (adaptive=False): q, k (1+S, C) over the crop's whole sequence, x (1+S, D) features;
    candidates = the LM patches ``vpos``. Returns (picked patch indices in LM order, merged features
    of the picked, the extra token, the attention of the LM patches)."""
    logits = k @ q[0] / np.sqrt(q.shape[1])
    p = np.exp(logits - logits.max())
    a = (p / p.sum())[vpos]
    kk, xx = k[vpos], x[vpos]
    picked = sorted(range(len(vpos)), key=lambda j: (-a[j], j))[: n_c - 1]
    kn = kk / np.linalg.norm(kk, axis=1, keepdims=True)
    feats = []
    for i, j in enumerate(picked):
        others = picked[:i] + picked[i + 1 :] + [m for m in range(len(vpos)) if m not in picked]
        sims = [kn[o] @ kn[j] for o in others]
        nb = [others[m] for m in sorted(range(len(others)), key=lambda m: (-sims[m], m))[:n_nb]]
        feats.append(xx[j] + sum(a[m] * xx[m] for m in nb))
    extra = sum(a[m] * xx[m] for m in range(len(vpos)) if m not in picked)
    return picked, feats, extra, a


@pytest.mark.parametrize("keep", [0.3, 20])
def test_prumerge_per_crop_matches_eager(keep):
    vlm, eager, batch, out, _ = _setup("llava_next")
    sel = select(vlm, batch, get("prumerge", adaptive=False, n_neighbors=4), keep)
    got = _received(vlm, batch, sel)
    for i, lay in enumerate(batch.layouts):
        n = keep if isinstance(keep, int) else int(round(keep * lay.n_image_tokens))
        crops = _crops(lay)
        want_keep = np.zeros(lay.n_image_tokens, bool)
        slots, before, after = {}, {}, {}
        n_lm, tile_extra = 0, []
        for (c, tv), n_c in zip(crops.items(), _split(n, [len(v) for v in crops.values()])):
            toks = [t for t, _ in tv]
            vpos = [v for _, v in tv]
            q = _layer_in(eager, 1, out.hidden_states[1][c], "q_proj")  # vision layer -1 = layer 1
            k = _layer_in(eager, 1, out.hidden_states[1][c], "k_proj")
            x = out.hidden_states[1][c].double().numpy()  # feature layer -2 = layer 0's output
            picked, feats, extra, a = _prumerge_ref(q, k, x, vpos, max(n_c, 1), 4)
            np.testing.assert_allclose(sel.scores[i][toks], a, rtol=1e-4, atol=1e-7)
            if n_c == 0:
                continue
            n_lm += len(picked) + 1
            proj = _proj(eager, feats + [extra])
            kept = [toks[j] for j in picked]
            want_keep[kept] = True
            if c == min(crops):  # base view: method order in its slots, the extra token after its run
                for s, e in zip(sorted(kept), proj[:-1]):
                    slots[s] = e
                after.setdefault(max(toks, key=lambda t: lay.image_positions[t]), []).append(proj[-1])
            else:
                for j, e in zip(picked, proj[:-1]):
                    slots[toks[j]] = e
                tile_extra.append(proj[-1])
        after.setdefault(int(np.argmax(lay.image_positions)), []).extend(tile_extra)
        np.testing.assert_array_equal(sel.keep[i], want_keep)
        assert n_lm == n
        kept_idx = np.flatnonzero(want_keep)
        np.testing.assert_array_equal(sel.group[i][kept_idx], kept_idx)
        torch.testing.assert_close(got[i], _lm_sequence(vlm, batch, i, slots, before, after), rtol=1e-4, atol=1e-5)


def test_prumerge_adaptive_keeps_each_crops_outliers():
    vlm, eager, batch, out, _ = _setup("llava_next")
    sel = select(vlm, batch, get("prumerge"), 0.5)  # adaptive: the budget is ignored
    for i, lay in enumerate(batch.layouts):
        crops = _crops(lay)
        want = np.zeros(lay.n_image_tokens, bool)
        for c, tv in crops.items():
            q = _layer_in(eager, 1, out.hidden_states[1][c], "q_proj")
            k = _layer_in(eager, 1, out.hidden_states[1][c], "k_proj")
            logits = k @ q[0] / np.sqrt(q.shape[1])
            a = (np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())[[v for _, v in tv]]
            q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
            n_out = int((a > q3 + 1.5 * (q3 - q1)).sum())
            want[[tv[j][0] for j in _top(list(a), n_out)]] = True
        np.testing.assert_array_equal(sel.keep[i], want)
        assert len(sel.info["extra"][i]) >= 1 and sum(e.shape[0] for _, e in sel.info["extra"][i]) == len(crops)


# ---------------------------------------------------------------------------------------------
# ToMe


def _tome_ref(eager, pixel, sched, protect):
    """ToMe on one crop in float64, explicit loops (sets A/B alternate; [CLS] never merges)."""
    tower = copy.deepcopy(eager.adapter.vision_tower(eager.model)).double()
    vm = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        x = vm.embeddings(pixel.double())
        pre = getattr(vm, "pre_layrnorm", None)
        x = (pre(x) if pre is not None else x)[0]
        size = torch.ones(x.shape[0], dtype=torch.float64)
        members = [{i} for i in range(x.shape[0])]
        for li, r in enumerate(sched):
            layer = vm.encoder.layers[li]
            at = layer.self_attn
            h = layer.layer_norm1(x)
            H = at.num_heads
            q, k, v = (p(h).view(h.shape[0], H, -1).transpose(0, 1) for p in (at.q_proj, at.k_proj, at.v_proj))
            logits = q @ k.transpose(-1, -2) * at.scale + torch.log(size)[None, None, :]
            x = x + at.out_proj((torch.softmax(logits, -1) @ v).transpose(0, 1).reshape(h.shape[0], -1))
            metric = k.mean(0).numpy()
            A, B = list(range(0, x.shape[0], 2)), list(range(1, x.shape[0], 2))
            best = {}
            for a in A:
                if protect and a == 0:
                    best[a] = (-np.inf, B[0])
                    continue
                cos = [metric[a] @ metric[b] / np.linalg.norm(metric[a]) / np.linalg.norm(metric[b]) for b in B]
                best[a] = (max(cos), B[int(np.argmax(cos))])
            edges = sorted(A, key=lambda a: (-best[a][0], A.index(a)))
            src = edges[:r]
            unm = sorted(edges[r:]) if protect else edges[r:]
            nx, ns, nm = [], [], []
            for a in unm:
                nx.append(x[a]), ns.append(size[a]), nm.append(members[a])
            for b in B:
                grp = [b] + [a for a in src if best[a][1] == b]
                s = sum(size[j] for j in grp)
                nx.append(sum(x[j] * size[j] for j in grp) / s)
                ns.append(s)
                nm.append(set().union(*(members[j] for j in grp)))
            x, size, members = torch.stack(nx), torch.stack(ns), nm
            x = x + layer.mlp(layer.layer_norm2(x))
    return x, size, members


def _even_schedule(T, R, L, prot):
    plan = [R // L + (1 if i < R % L else 0) for i in range(L)]
    out, carry = [], 0
    for want in plan:
        want += carry
        r = min(want, (T - prot) // 2)
        carry = want - r
        out.append(r)
        T -= r
    assert carry == 0
    return out


@pytest.mark.parametrize("family,keep", [("llava_next", 0.6), ("llava_next", 45), ("llava_onevision", 0.5)])
def test_tome_per_crop_matches_reference(family, keep):
    vlm, eager, batch, _, pixels = _setup(family)
    sel = select(vlm, batch, get("tome"), keep)
    got = _received(vlm, batch, sel)
    fl = vlm.adapter.vision_feature_layer(vlm.model)
    prot = int(vlm.has_cls)
    T = int(pixels.shape[-1] // eager.model.config.vision_config.patch_size) ** 2 + prot
    for i, lay in enumerate(batch.layouts):
        n = keep if isinstance(keep, int) else int(round(keep * lay.n_image_tokens))
        crops = _crops(lay)
        want_keep = np.zeros(lay.n_image_tokens, bool)
        want_group = np.full(lay.n_image_tokens, -1)
        slots = {}
        for (c, tv), b in zip(crops.items(), _split(n, [len(v) for v in crops.values()])):
            vp = {v: t for t, v in tv}
            # the schedule rule of the docstring: from "padding stays unmerged", grow by the excess
            R = lo = T - prot - b - (T - prot - len(tv))
            tried = []
            while True:
                x, size, members = _tome_ref(eager, pixels[c : c + 1], _even_schedule(T, R, fl + 1, prot), prot)
                reach = [m for m in range(prot, len(members)) if members[m] & vp.keys()]
                tried.append((R, len(reach)))
                if len(reach) == b:
                    break
                if len(reach) > b:
                    lo, R = R, R + len(reach) - b
                    continue
                pytest.fail(f"overshoot at crop {c} ({tried}); the reference would search between {lo} and {R}")
            firsts = {m: min(vp[v] for v in members[m] if v in vp) for m in reach}
            for m in reach:
                want_keep[firsts[m]] = True
                for v in members[m]:
                    if v in vp:
                        want_group[vp[v]] = firsts[m]
                slots[firsts[m]] = _proj(eager, x[m].numpy()[None])[0]
                assert sel.scores[i][firsts[m]] == pytest.approx(float(size[m]))
            assert float(size.sum()) == T  # sizes conserve the crop's tower tokens
        np.testing.assert_array_equal(sel.keep[i], want_keep)
        np.testing.assert_array_equal(sel.group[i], want_group)  # a partition of the LM patches
        assert (want_group >= 0).all() and int(sel.keep[i].sum()) == n
        torch.testing.assert_close(got[i], _lm_sequence(vlm, batch, i, slots), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# FlowCut


@pytest.mark.parametrize("keep", [0.25, 17])
def test_flowcut_per_crop_matches_eager(keep):
    """feature_layer=-1 on the 2-layer tiny tower: layer 0 scores and prunes (rpl = 0), layer 1 runs on
    the kept tokens and feeds the projector."""
    vlm, eager, batch, out, _ = _setup("llava_next")
    sel = select(vlm, batch, get("flowcut", feature_layer=-1), keep)
    got = _received(vlm, batch, sel)
    layers = eager.adapter.vision_layers(eager.model)
    for i, lay in enumerate(batch.layouts):
        n = keep if isinstance(keep, int) else int(round(keep * lay.n_image_tokens))
        crops = _crops(lay)
        want_keep = np.zeros(lay.n_image_tokens, bool)
        slots = {}
        for (c, tv), b in zip(crops.items(), _split(n, [len(v) for v in crops.values()])):
            if b == 0:
                continue
            a = out.attentions[0][c].double()
            cls = a[:, 0, 1:].mean(0).numpy()
            at = layers[0].self_attn
            with torch.no_grad():
                v = at.v_proj(layers[0].layer_norm1(out.hidden_states[0][c])).double()
            v = v.view(v.shape[0], at.num_heads, -1).transpose(0, 1).numpy()
            sem = []
            for hd in range(v.shape[0]):
                w = v[hd] @ v[hd][0]
                e = np.exp(w - w.max())
                sem.append(e / e.sum())
            sem = np.mean(sem, 0)[1:]
            score = (cls / cls.sum() + sem / sem.sum()) * np.abs(v.mean(0)[1:]).sum(-1)
            lm_patches = [vv - 1 for _, vv in tv]  # patch index = vpos - 1
            kept = sorted(sorted(lm_patches, key=lambda j: (-score[j], j))[:b])
            tok = {vv - 1: t for t, vv in tv}
            want_keep[[tok[j] for j in kept]] = True
            rows = [0] + [j + 1 for j in kept]
            with torch.no_grad():
                f = layers[1](out.hidden_states[1][c : c + 1, rows], attention_mask=None)
                f = f[0] if isinstance(f, tuple) else f
                proj = eager.adapter.projector(eager.model)(f[0, 1:])
            for j, e in zip(kept, proj):
                slots[tok[j]] = e
        np.testing.assert_array_equal(sel.keep[i], want_keep)
        assert int(sel.keep[i].sum()) == n
        torch.testing.assert_close(got[i], _lm_sequence(vlm, batch, i, slots), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# single crop: the per-crop path reproduces the single-crop one


@pytest.mark.parametrize(
    "name,params,keep",
    [
        ("visionzip", {}, 9),
        ("prumerge", {"adaptive": False}, 6),
        ("prumerge_plus", {"adaptive": False}, 6),
        ("tome", {}, 9),
        ("flowcut", {"feature_layer": -1}, 6),
    ],
)
def test_per_crop_path_equals_single_crop_path(name, params, keep, monkeypatch):
    """On LLaVA-1.5 (one crop per sample, every patch in the LM) the per-crop path, forced, gives the
    single-crop path's kept set, groups, embeddings and LM sequence."""
    import importlib

    vlm = tiny("llava", seed=0)
    batch = vlm.prepare(_images(3), ["what is in the picture ?", "color ?"])
    single = select(vlm, batch, get(name, **params), keep)
    module = importlib.import_module(f"vtrlab.reduce.methods.{name.replace('_plus', '')}")
    monkeypatch.setattr(module, "per_crop", lambda ctx: True)
    anyres = select(vlm, batch, get(name, **params), keep)
    assert anyres.info.get("budget_split") == "per crop"
    for i in range(len(batch)):
        np.testing.assert_array_equal(anyres.keep[i], single.keep[i])
        np.testing.assert_array_equal(anyres.group[i], single.group[i])
        torch.testing.assert_close(anyres.embeds[i], single.embeds[i], rtol=1e-5, atol=1e-6)
    for a, b in zip(_received(vlm, batch, anyres), _received(vlm, batch, single)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
