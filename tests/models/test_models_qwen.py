"""Qwen2-VL and Qwen2.5-VL adapters: modules, counts, pixel-proven layout, mRoPE, full-size shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.models.base import KIND_IMAGE, KIND_SEPARATOR
from vtrlab.testing import full_size, tiny
from vtrlab.testing._pixel_route import check_lm_positions, check_vision_table, codes_at_positions
from vtrlab.testing.pixels import gradient_image
from vtrlab.testing.probes import projector_io

pytestmark = pytest.mark.xdist_group("qwen")
FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
CASES = {
    "nonsquare": ([gradient_image(150, 60)], ["Where is the red square?"]),
    "two_images": ([[gradient_image(64, 40), gradient_image(40, 100)]], ["Which image is brighter?"]),
    "padded_batch": ([gradient_image(120, 90), gradient_image(40, 56)], ["Count the dots.", "Is it left?"]),
}


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    return tiny(request.param, seed=0)


def test_modules(vlm):
    m, a = vlm.model, vlm.adapter
    assert a.family == m.config.model_type
    assert list(vlm.lm_layers) == list(m.model.language_model.layers)
    assert list(vlm.vision_layers) == list(m.model.visual.blocks)
    assert a.lm_attention(vlm.lm_layers[0]) is m.model.language_model.layers[0].self_attn
    assert a.vision_attention(vlm.vision_layers[0]) is m.model.visual.blocks[0].attn
    assert a.projector(m) is m.model.visual.merger
    assert a.language_model(m) is m.model.language_model and a.lm_head(m) is m.lm_head
    assert vlm.has_cls is False


def test_vision_feature_layer_feeds_the_merger(vlm):
    batch = vlm.prepare([gradient_image(60, 60)], ["hi"])
    layer_out, merger = projector_io(vlm, batch)
    torch.testing.assert_close(merger, layer_out, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_counts_match_the_processor_expansion(vlm, case):
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    merge = vlm.model.config.vision_config.spatial_merge_size
    grid = batch.inputs["image_grid_thw"]
    per_image = (grid.prod(-1) // merge**2).tolist()
    g = 0
    for i, lay in enumerate(batch.layouts):
        n = len(lay.image_sizes)
        placeholders = int((batch.inputs["input_ids"][i] == vlm.model.config.image_token_id).sum())
        assert lay.n_image_tokens == placeholders == sum(per_image[g : g + n])
        for j in range(n):
            rows, cols = lay.grid(j, 0)
            assert (rows * merge, cols * merge) == tuple(grid[g + j, 1:].tolist())
        seps = lay.positions[lay.kind == KIND_SEPARATOR]
        assert len(seps) == 2 * n  # <|vision_start|>, <|vision_end|> per image
        g += n


@pytest.mark.parametrize("case", list(CASES))
def test_layout_and_vision_table_proven_by_pixels(vlm, case):
    """(b)+(c)+(d): every LM image position holds the four sub-patches its box names, from the right
    image; every vision-table row (Qwen2.5: window-permuted order) shows the pixels of its box."""
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    embeds, seen = codes_at_positions(vlm, batch)
    rows = batch.inputs["image_grid_thw"].prod(-1).tolist()
    offsets = np.concatenate([[0], np.cumsum(rows)])
    first = np.cumsum([0] + [len(lay.image_sizes) for lay in batch.layouts])

    def source_of(i, j, tile):
        g = first[i] + j
        return set(range(offsets[g], offsets[g + 1]))

    merge = vlm.model.config.vision_config.spatial_merge_size
    n = check_lm_positions(vlm, batch, embeds, merge, source_of)
    assert n == merge**2 * sum(lay.n_image_tokens for lay in batch.layouts)
    assert check_vision_table(vlm, batch, seen["vision_seq"], flat=True) == offsets[-1]


def test_wrong_layout_is_caught(vlm):
    images, prompts = CASES["nonsquare"]
    batch = vlm.prepare(images, prompts)
    embeds, _ = codes_at_positions(vlm, batch)
    lay = batch.layouts[0]
    img = np.flatnonzero(lay.kind == KIND_IMAGE)
    lay.col[img[0]], lay.col[img[1]] = lay.col[img[1]], lay.col[img[0]]
    lay.x0[img[0]], lay.x0[img[1]] = lay.x0[img[1]], lay.x0[img[0]]
    lay.x1[img[0]], lay.x1[img[1]] = lay.x1[img[1]], lay.x1[img[0]]
    with pytest.raises(AssertionError, match="pixels centred"):
        check_lm_positions(vlm, batch, embeds, 2, lambda i, j, t: set(range(10_000)))


def test_mrope_position_ids_step_along_rows_and_cols(vlm):
    """decoder_inputs()' mRoPE ids are 3-D and, at image tokens, step along the layout's rows and
    columns (that the decoder run on them reproduces the model: tests/models/test_contract.py)."""
    images, prompts = CASES["padded_batch"]
    batch = vlm.prepare(images, prompts)
    pos = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)["position_ids"]
    assert pos.shape == (3, *batch.inputs["input_ids"].shape)
    for i, lay in enumerate(batch.layouts):
        sel = lay.kind == KIND_IMAGE
        p = lay.positions[sel]
        t, h, w = (pos[a, i, p].numpy() for a in range(3))
        assert (t == t[0]).all()
        np.testing.assert_array_equal(h - h.min(), lay.row[sel])
        np.testing.assert_array_equal(w - w.min(), lay.col[sel])


def test_full_size_qwen2_5_vl_7b_on_meta():
    vlm = full_size("qwen2.5-vl-7b", dtype="bfloat16", device="meta")
    m = vlm.model
    assert vlm.family == "qwen2_5_vl" and m.device.type == "meta" and m.dtype == torch.bfloat16
    assert len(vlm.lm_layers) == 28 and len(vlm.vision_layers) == 32
    # Qwen2.5-VL-7B-Instruct: 8,292,166,656 parameters (model card / safetensors index)
    assert sum(p.numel() for p in m.parameters()) == 8_292_166_656
    assert m.lm_head.weight.shape == (152064, 3584)
    assert m.model.visual.merger.mlp[-1].weight.shape == (3584, 5120)
