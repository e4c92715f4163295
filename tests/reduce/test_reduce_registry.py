"""Registry, budgets, the Dataset record and the pre-LM answer path (random, pooling, oracle).

Oracles: random's kept set is recomputed from its definition (seeded uniform scores, top-k);
the pooling method's merged embeddings are recomputed as float64 window means of the projector
outputs; the oracle keeps every relevant token first; answering with a method equals answering
with the same keep masks (and embeddings) through the keep-mask path.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.reduce import get, names
from vtrlab.reduce.registry import Method, Selection, register
from vtrlab.testing import tiny


def _images(seed, n=2):
    rng = np.random.default_rng(seed)
    sizes = [(56, 56), (56, 84), (84, 56)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def llava():
    vlm = tiny("llava", seed=0)
    return vlm, vlm.prepare(_images(0), ["what is in the picture ?", "color ?"])


def test_names_and_errors():
    assert {"random", "pooling", "oracle"} <= set(names())
    with pytest.raises(ValueError, match="unknown reduction method 'nope'.*accepted: .*random"):
        get("nope")
    with pytest.raises(ValueError, match="has no parameter 'sede'; accepted: seed"):
        get("random", sede=1)
    with pytest.raises(TypeError, match="seed='a'.*expected int"):
        get("random", seed="a")
    m = get("random", seed=3)
    assert m.params == {"seed": 3} and get(m) is m


def test_register_rejects_bad_stage():
    with pytest.raises(ValueError, match="stage 'nowhere'"):

        @register("_bad_stage_probe")
        class Bad(Method):
            stage = "nowhere"


def test_selection_rejects_merge_into_dropped():
    with pytest.raises(ValueError, match="points at a dropped token"):
        Selection(keep=[np.array([True, False])], scores=[np.zeros(2)], group=[np.array([1, -1])])


def test_budget_errors(llava):
    vlm, batch = llava
    for bad, msg in [(0.0, "ratio"), (1.5, "ratio"), (10**6, "image tokens"), (True, "accepted"), ("a", "accepted")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            vl.reduce.apply(vlm, batch, "random", keep=bad)


@pytest.mark.parametrize("keep", [0.25, 0.5, 3])
def test_random_matches_definition_and_budget_exact(llava, keep):
    vlm, batch = llava
    ds = vl.reduce.apply(vlm, batch, "random", keep=keep, seed=7)
    for i, lay in enumerate(batch.layouts):
        n = lay.n_image_tokens
        k = keep if isinstance(keep, int) else int(round(keep * n))
        s = np.random.default_rng([7, i]).random(n)
        ref = np.zeros(n, bool)
        ref[np.argsort(-s)[:k]] = True
        np.testing.assert_array_equal(ds.kept.values[i, 0, :n], ref)
        assert int(ds.budget[i]) == k
        np.testing.assert_array_equal(ds.token_position.values[i, :n], lay.image_positions)
        np.testing.assert_array_equal(ds.token_row.values[i, :n], lay.row[lay.kind == "image"])
    assert ds.attrs["method"] == "random" and ds.attrs["positions"] == "kept"
    assert list(ds.stage_layer.values) == [-1]


def test_pooling_merges_window_means(llava):
    vlm, batch = llava
    ds = vl.reduce.apply(vlm, batch, "pooling", keep=0.25)
    m = get("pooling")
    sel = vl.reduce.apply.__globals__["select"](vlm, batch, m, 0.25)
    dec = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)
    for i, lay in enumerate(batch.layouts):
        n = lay.n_image_tokens
        feats = dec["inputs_embeds"][i, torch.as_tensor(lay.image_positions)].double()
        group = ds.group.values[i, :n]
        kept = ds.kept.values[i, 0, :n]
        assert (group >= 0).all() and kept[group].all()  # every token merged into a kept one
        assert int(kept.sum()) <= int(round(0.25 * n))
        # reference: 2x2 windows (this grid's kernel) by (image, tile, row // 2, col // 2)
        img = lay.kind == "image"
        rows, cols = lay.row[img], lay.col[img]
        for j, rep in enumerate(np.flatnonzero(kept)):
            members = np.flatnonzero(group == rep)
            k = sel.info["kernel"]
            same = (rows // k == rows[rep] // k) & (cols // k == cols[rep] // k) & (lay.tile[img] == lay.tile[img][rep])
            np.testing.assert_array_equal(members, np.flatnonzero(same))
            torch.testing.assert_close(sel.embeds[i][j].double(), feats[members].mean(0), rtol=1e-5, atol=1e-6)


def test_oracle_keeps_relevant_first(llava):
    vlm, batch = llava
    rel = []
    for lay in batch.layouts:
        r = np.zeros(lay.n_image_tokens, bool)
        r[[1, 4, 6]] = True
        rel.append(r)
    ds = vl.reduce.apply(vlm, batch, "oracle", keep=5, relevance=rel)
    for i, r in enumerate(rel):
        kept = ds.kept.values[i, 0, : len(r)]
        assert kept[r].all() and kept.sum() == 5
    with pytest.raises(ValueError, match="needs relevance"):
        vl.reduce.apply(vlm, batch, "oracle", keep=5)


def test_answer_with_method_equals_keep_path(llava):
    vlm, batch = llava
    ds = vl.reduce.apply(vlm, batch, "random", keep=0.5, seed=1)
    masks = [ds.kept.values[i, 0, : lay.n_image_tokens] for i, lay in enumerate(batch.layouts)]
    a = vl.answer(vlm, batch, method="random", keep=0.5, seed=1, max_new_tokens=3)
    b = vl.answer(vlm, batch, keep=masks, max_new_tokens=3)
    assert a == b
    with pytest.raises(ValueError, match="is a budget"):
        vl.answer(vlm, batch, keep=0.5)
    with pytest.raises(ValueError, match="needs a budget"):
        vl.answer(vlm, batch, method="random")


def test_merged_embeddings_reach_the_lm(llava):
    """Pooling through answer.logits == the keep path's logits with the window means substituted by hand."""
    vlm, batch = llava
    from vtrlab.reduce import logits
    from vtrlab.reduce.apply import select

    sel = select(vlm, batch, get("pooling"), 0.25)
    got = logits(vlm, batch, keep=0.25, method="pooling").last
    dec = vl.reduce.decoder_inputs(vlm, batch)
    emb = dec["inputs_embeds"].clone()
    for i, lay in enumerate(batch.layouts):
        emb[i, torch.as_tensor(lay.image_positions[sel.keep[i]])] = sel.embeds[i]
    ref = logits(vlm, batch, keep=sel.keep, decoder_inputs={**dec, "inputs_embeds": emb}).last
    torch.testing.assert_close(got, ref)
    no_merge = logits(vlm, batch, keep=sel.keep, decoder_inputs=dec).last
    assert not torch.allclose(got, no_merge)


def test_every_method_documents_itself():
    """Each registered method names its stage, position policy, defaults and its source (docstring too)."""
    for name in names():
        m = get(name)
        cls = type(m)
        assert m.stage in ("tower", "projector", "lm"), name
        assert m.positions in ("kept", "renumbered"), name
        assert isinstance(m.defaults, dict), name
        assert m.source, f"{name}: no source"
        doc = (__import__(cls.__module__, fromlist=["x"]).__doc__ or "") + (cls.__doc__ or "")
        assert len(doc) > 80, f"{name}: module/class docstring must name the source and code/paper differences"
