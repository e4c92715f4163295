"""The reduce path's shape (not its speed, which benchmarks/reduce.py measures): the vision tower runs
once per answer, the LM then receives exactly the inputs of a plain forward, the vectorised mapping of
vision rows to image tokens equals a per-row lookup, and DivPrune/DART on the device equal their
step-by-step definitions."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from vtrlab.reduce import scoring
from vtrlab.reduce.context import ReductionContext
from vtrlab.reduce.methods import _vision
from vtrlab.reduce.methods.dart import dart_select
from vtrlab.testing import tiny

A = importlib.import_module("vtrlab.reduce.answer")


def _batch(vlm, n=2):
    rng = np.random.default_rng(3)
    sizes = [(56, 84), (64, 64)]
    imgs = [Image.fromarray(rng.integers(0, 255, (*sizes[i % 2], 3), dtype=np.uint8)) for i in range(n)]
    return vlm.prepare(imgs, ["what is in the picture ?", "color ?"][:n])


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_scoring_forward_gives_the_plain_decoder_inputs(family):
    vlm = tiny(family)
    batch = _batch(vlm)
    plain = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)
    ctx = ReductionContext(vlm, batch)
    _vision.vision_forward(ctx, attention=[-2])  # capture sites in the tower
    got = ctx.decoder_inputs()
    for k, v in plain.items():
        if torch.is_tensor(v):
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "random"])
def test_tower_runs_once_per_answer(name):
    """generate_ids with a method runs the tower once (the scoring forward's decoder inputs feed the LM)
    and answers as the same keep masks applied to freshly computed decoder inputs."""
    import vtrlab as vl
    from vtrlab.reduce.apply import select

    vlm = tiny("llava")
    batch = _batch(vlm)
    calls = []
    h = vlm.vision_layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        ids = A.generate_ids(vlm, batch, 0.5, max_new_tokens=3, method=name)
        n_tower = len(calls)
    finally:
        h.remove()
    assert n_tower == 1  # LLaVA-1.5 runs its tower once for the whole batch
    m = vl.reduce.get(name)
    sel = select(vlm, batch, m, 0.5)
    red = A.reduced_decoder_inputs(vlm, batch, sel.keep, None, embeds=sel.embeds, positions=m.positions)
    assert ids == A._decode(vlm, batch, red, 3, False)


def test_row_tokens_equal_a_per_row_lookup():
    vlm = tiny("llava_next")
    batch = _batch(vlm)
    ctx = ReductionContext(vlm, batch)
    for b, lay in enumerate(batch.layouts):
        t = lay.vision.reset_index(drop=True)
        rows, tok = _vision._row_tokens(ctx, b, t)
        index = _vision._token_index(lay)
        want_rows, want_tok = [], []
        ok = (t["kind"].to_numpy() == "patch") & (t["row"].to_numpy() >= 0)
        for k in np.flatnonzero(ok):
            j = index.get((int(t["image"][k]), int(t["tile"][k]), int(t["row"][k]), int(t["col"][k])))
            if j is not None:
                want_rows.append(k)
                want_tok.append(j)
        assert rows.tolist() == want_rows
        assert tok.tolist() == want_tok


def _divprune_steps(x: torch.Tensor, k: int) -> list[int]:
    n = x / x.norm(dim=1, keepdim=True)
    d = 1.0 - n @ n.T
    first = torch.topk(d, 2, dim=0, largest=False).values[1]
    picked = [int(torch.argmax(first))]
    best = d[picked[0]].clone()
    for _ in range(1, k):
        j = int(torch.argmax(best))
        picked.append(j)
        best = torch.minimum(best, d[j])
    return picked


@pytest.mark.parametrize("k", [1, 5, 40])
def test_divprune_order_on_device_equals_step_by_step(k):
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    assert scoring.divprune_order(x, k).tolist() == _divprune_steps(x, k)


def _dart_steps(keys_l1, img_cols, text_cols, normed, n_keep, p_i, p_t):
    p_img = min(p_i, len(img_cols), n_keep)
    img_order = img_cols[np.argsort(-keys_l1[img_cols], kind="stable")][:p_img]
    txt_order = text_cols[np.argsort(-keys_l1[text_cols], kind="stable")][:p_t]
    pivots = list(img_order) + list(txt_order)
    chosen = {int(c) for c in img_order}
    remaining = [int(c) for c in img_cols if int(c) not in chosen]
    extra = n_keep - p_img
    share = [extra // len(pivots) + (1 if j < extra % len(pivots) else 0) for j in range(len(pivots))]
    for piv, take in zip(pivots, share):
        if take == 0 or not remaining:
            continue
        sim = torch.nn.functional.cosine_similarity(normed[piv].double()[None], normed[remaining].double(), dim=-1)
        picked = [remaining[j] for j in torch.argsort(sim, stable=True)[:take].tolist()]
        chosen.update(picked)
        remaining = [c for c in remaining if c not in set(picked)]
    return np.isin(img_cols, np.array(sorted(chosen), dtype=np.int64))


@pytest.mark.parametrize("n_keep", [4, 9, 30, 60])
def test_dart_select_equals_step_by_step(n_keep):
    g = torch.Generator().manual_seed(n_keep)
    L = 80
    normed = torch.randn(L, 12, generator=g)
    keys_l1 = torch.rand(L, generator=g, dtype=torch.float64).numpy()
    img_cols, text_cols = np.arange(5, 69), np.arange(69, 80)
    got = dart_select(keys_l1, img_cols, text_cols, normed, n_keep, 4, 4)
    want = _dart_steps(keys_l1, img_cols, text_cols, normed, n_keep, 4, 4)
    assert got.dtype == bool and int(got.sum()) == n_keep
    assert np.array_equal(got, want)
