"""Tower-stage methods: the block-by-block tower run equals HF's forward, and ToMe's merged
tokens equal an independent float64 reference (explicit attention with log-size bias, matching
by Python loops over the bipartite edges, size-weighted averages), with exact budgets and a
partition of the patches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.reduce import scoring
from vtrlab.reduce.apply import select
from vtrlab.reduce.registry import NotApplicable, get
from vtrlab.reduce.stages.tower import run_tower
from vtrlab.testing import tiny


def _images(seed, n=2):
    rng = np.random.default_rng(seed)
    sizes = [(56, 84), (64, 64)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 2], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def llava():
    vlm = tiny("llava", seed=0)
    return vlm, vlm.prepare(_images(3), ["what is in the picture ?", "color ?"])


def test_run_tower_equals_hf_hidden_states(llava):
    vlm, batch = llava
    crops = vlm.adapter.vision_crops(vlm.model, batch.inputs)
    tower = vlm.adapter.vision_tower(vlm.model)
    with torch.no_grad():
        hs = tower(crops, output_hidden_states=True).hidden_states
    for layer in range(len(vlm.vision_layers)):
        st = run_tower(vlm, crops, layer, proportional=True)  # sizes 1: log(1) = 0 changes nothing
        torch.testing.assert_close(st.x, hs[layer + 1], rtol=1e-5, atol=1e-5)


def _ref_tome(vlm, pixel, sched):
    """ToMe written out for one crop in float64, from the tower's modules."""
    tower = copy.deepcopy(vlm.adapter.vision_tower(vlm.model)).double()
    vm = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        x = vm.pre_layrnorm(vm.embeddings(pixel.double()))[0]
        size = torch.ones(x.shape[0], dtype=torch.float64)
        members = [{i} for i in range(x.shape[0])]
        for li, r in enumerate(sched):
            layer = vm.encoder.layers[li]
            at = layer.self_attn
            h = layer.layer_norm1(x)
            H = at.num_heads
            q, k, v = (p(h).view(h.shape[0], H, -1).transpose(0, 1) for p in (at.q_proj, at.k_proj, at.v_proj))
            logits = q @ k.transpose(-1, -2) * at.scale + torch.log(size)[None, None, :]
            out = (torch.softmax(logits, -1) @ v).transpose(0, 1).reshape(h.shape[0], -1)
            x = x + at.out_proj(out)
            metric = k.mean(0).numpy()
            A, B = list(range(0, x.shape[0], 2)), list(range(1, x.shape[0], 2))
            best = {}
            for a in A:
                if a == 0:
                    best[a] = (-np.inf, B[0])
                    continue
                cos = [metric[a] @ metric[b] / np.linalg.norm(metric[a]) / np.linalg.norm(metric[b]) for b in B]
                best[a] = (max(cos), B[int(np.argmax(cos))])
            edges = sorted(A, key=lambda a: (-best[a][0], A.index(a)))
            src, unm = edges[:r], sorted(edges[r:])
            new_x, new_size, new_members = [], [], []
            for a in unm:
                new_x.append(x[a]), new_size.append(size[a]), new_members.append(members[a])
            for b in B:
                group = [b] + [a for a in src if best[a][1] == b]
                s = sum(size[j] for j in group)
                new_x.append(sum(x[j] * size[j] for j in group) / s)
                new_size.append(s)
                new_members.append(set().union(*(members[j] for j in group)))
            x, size, members = torch.stack(new_x), torch.stack(new_size), new_members
            x = x + layer.mlp(layer.layer_norm2(x))
    return x, size, members


@pytest.mark.parametrize("keep", [5, 9])
def test_tome_matches_reference(llava, keep):
    vlm, batch = llava
    method = get("tome")
    sel = select(vlm, batch, method, keep)
    crops = vlm.adapter.vision_crops(vlm.model, batch.inputs)
    n = len(vlm.vision_layers)
    for i, lay in enumerate(batch.layouts):
        V = lay.n_image_tokens
        sched = scoring.tome_schedule(V + 1, V - keep, n - 1, 1)
        x, size, members = _ref_tome(vlm, crops[i : i + 1], sched)
        assert members[0] == {0} and float(size.sum()) == V + 1  # [CLS] protected, sizes conserve tokens
        toks = sorted(range(1, len(members)), key=lambda t: min(members[t]))
        want_keep = np.zeros(V, bool)
        want_keep[[min(members[t]) - 1 for t in toks]] = True
        np.testing.assert_array_equal(sel.keep[i], want_keep)
        group = np.full(V, -1)
        for t in toks:
            for p in members[t]:
                group[p - 1] = min(members[t]) - 1
        np.testing.assert_array_equal(sel.group[i], group)
        with torch.no_grad():
            proj = copy.deepcopy(vlm.adapter.projector(vlm.model)).double()(x[toks])
        torch.testing.assert_close(sel.embeds[i].double(), proj, rtol=1e-4, atol=1e-5)
        assert int(sel.keep[i].sum()) == keep


def test_tome_schedule_and_errors():
    assert scoring.tome_schedule(17, 11, 2, 1) == [6, 5]
    with pytest.raises(ValueError, match="cannot remove 15 of 17 tokens in 2 layers"):
        scoring.tome_schedule(17, 15, 2, 1)
    with pytest.raises(ValueError, match="r=-1"):
        vlm = tiny("llava")
        vl.reduce.apply(vlm, vlm.prepare(_images(0, 1), ["a ?"]), get("tome", r=-1), keep=4)
    vlm = tiny("qwen2_vl")
    with pytest.raises(NotApplicable, match="'tome'.*'qwen2_vl'"):
        vl.reduce.apply(vlm, vlm.prepare(_images(0, 1), ["a ?"]), "tome", keep=2)


def test_flowcut_matches_eager(llava):
    vlm, batch = llava
    eager = tiny("llava", seed=0, attn_implementation="eager")
    crops = eager.adapter.vision_crops(eager.model, batch.inputs)
    tower = eager.adapter.vision_tower(eager.model)
    with torch.no_grad():
        out = tower(crops, output_attentions=True, output_hidden_states=True)
    keep = 6
    sel = select(vlm, batch, get("flowcut", feature_layer=-1), keep)  # feature layer 2: layers 0 (EMA) and 1 (prune)
    layers = eager.adapter.vision_layers(eager.model)
    for i, lay in enumerate(batch.layouts):
        scores = []
        for li in (0, 1):
            a = out.attentions[li][i].double()  # (H, T, T)
            cls = a[:, 0, 1:].mean(0).numpy()
            at = layers[li].self_attn
            with torch.no_grad():
                v = at.v_proj(layers[li].layer_norm1(out.hidden_states[li][i])).double()
            v = v.view(v.shape[0], at.num_heads, -1).transpose(0, 1).numpy()  # (H, T, d)
            sem = []
            for h in range(v.shape[0]):
                w = v[h] @ v[h][0]
                e = np.exp(w - w.max())
                sem.append(e / e.sum())
            sem = np.mean(sem, 0)[1:]
            l1 = np.abs(v.mean(0)[1:]).sum(-1)
            scores.append((cls / cls.sum() + sem / sem.sum()) * l1)
        cum = 0.5 * scores[0] + 0.5 * scores[1]
        kept = sorted(sorted(range(len(cum)), key=lambda j: (-cum[j], j))[:keep])
        want = np.zeros(lay.n_image_tokens, bool)
        want[kept] = True
        np.testing.assert_array_equal(sel.keep[i], want)
        rows = [0] + [j + 1 for j in kept]
        with torch.no_grad():
            feats = layers[2](out.hidden_states[2][i : i + 1, rows], attention_mask=None)
            feats = feats[0] if isinstance(feats, tuple) else feats
            proj = eager.adapter.projector(eager.model)(feats[0, 1:])
        torch.testing.assert_close(sel.embeds[i], proj, rtol=1e-4, atol=1e-5)


def test_flowcut_prune_count_reference():
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(40), size=1)
    p = a[0] / a[0].sum()
    ent = -(p * np.log(p)).sum() / np.log(40)
    want = int(np.round((40 - 10) / np.sqrt(4) * (1 - ent**2)))
    assert scoring.flowcut_prune_count(torch.as_tensor(a), 4, 10) == want
