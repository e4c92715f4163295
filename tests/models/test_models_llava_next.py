"""LLaVA-NeXT and LLaVA-OneVision adapters: anyres tiles, unpadding, newlines, OneVision's
downscale and multi-image mode (tiny random models, CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.models.base import KIND_IMAGE, KIND_NEWLINE
from vtrlab.models.registry import adapter_for
from vtrlab.models.vlm import VLM
from vtrlab.testing import tiny
from vtrlab.testing.families.llava_onevision import build_tiny_onevision
from vtrlab.testing.pixels import check_pixel_boxes, gradient_image
from vtrlab.testing.proof import MARK, assert_layout_proven, route_identity_codes

pytestmark = pytest.mark.xdist_group("llava_anyres")

# aspect ratios that pick each of the tiny grids, odd sizes that make unpadding round
SHAPES = [(30, 100), (100, 30), (64, 64), (33, 47), (96, 20), (20, 96), (80, 50)]


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def vlm(request):
    return tiny(request.param)


def test_modules(vlm):
    m, a = vlm.model, vlm.adapter
    assert len(vlm.lm_layers) == m.config.text_config.num_hidden_layers
    assert len(vlm.vision_layers) == m.config.vision_config.num_hidden_layers
    assert a.projector(m) is m.model.multi_modal_projector
    assert a.newline_embedding(m) is m.model.image_newline
    assert vlm.has_cls == (vlm.family == "llava_next")  # CLIP vs SigLIP


@pytest.mark.parametrize("wh", SHAPES)
def test_layout_proven_across_aspect_ratios(vlm, wh):
    batch = vlm.prepare([gradient_image(*wh)], ["q"])
    assert assert_layout_proven(vlm, batch, [1]) > 16
    assert check_pixel_boxes(vlm, batch, patch=8) > 0


def test_row_structure(vlm):
    """Tile 0 (base view) first, then the high-res grid row by row, each row closed by a newline."""
    lay = vlm.prepare([gradient_image(72, 40)], ["q"]).layouts[0]
    t = lay.table()
    g = vlm.model.config.vision_config.image_size // vlm.model.config.vision_config.patch_size
    assert (t.tile.iloc[: g * g] == 0).all() and (t.kind.iloc[: g * g] == KIND_IMAGE).all()
    hi = t.iloc[g * g :]
    rows, cols = lay.grid(0, 1)
    assert len(hi) == rows * (cols + 1) and (hi.tile == 1).all()
    kinds = hi.kind.to_numpy().reshape(rows, cols + 1)
    assert (kinds[:, -1] == KIND_NEWLINE).all() and (kinds[:, :-1] == KIND_IMAGE).all()
    assert (hi[hi.kind == KIND_IMAGE].row.to_numpy().reshape(rows, cols) == np.arange(rows)[:, None]).all()
    # the high-res boxes tile the image: left/right edges reach the image borders (72 is the long side)
    img = hi[hi.kind == KIND_IMAGE]
    assert np.isclose(img.x0.min(), 0) and np.isclose(img.x1.max(), 72)


def test_vision_crops_drop_padding_crops(vlm):
    batch = vlm.prepare([gradient_image(100, 30), gradient_image(30, 30)], ["a", "b"])
    crops = vlm.adapter.vision_crops(vlm.model, batch.inputs)
    vis = [lay.vision_table() for lay in batch.layouts]
    n = sum(v.crop.nunique() for v in vis)
    assert crops.shape[0] == n
    assert sorted(np.concatenate([v.crop.unique() for v in vis]).tolist()) == list(range(n))
    # the batch's pixel_values hold padding crops the model drops
    assert batch.inputs["pixel_values"].shape[0] * batch.inputs["pixel_values"].shape[1] > n


def test_decoder_inputs_reproduce_the_logits(vlm):
    """Oracle: decoder_inputs() through language_model + lm_head equals the model's logits."""
    batch = vlm.prepare([gradient_image(72, 40), [gradient_image(40, 56), gradient_image(30, 30)]], ["one", "two?"])
    a, m = vlm.adapter, vlm.model
    dec = a.decoder_inputs(m, batch.inputs)
    with torch.no_grad():
        ref = m(**batch.inputs).logits
        out = a.lm_head(m)(a.language_model(m)(**dec).last_hidden_state)
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid])


def test_onevision_multi_image_prompt_is_one_padded_crop_per_image():
    v = tiny("llava_onevision")
    batch = v.prepare([[gradient_image(72, 40), gradient_image(30, 60)]], ["compare"])
    lay = batch.layouts[0]
    assert lay.grid_shapes == {(0, 0): (4, 4), (1, 0): (4, 4)}
    assert (lay.tile == 0).all() and (lay.kind == KIND_NEWLINE).sum() == 2
    assert lay.kind[16] == KIND_NEWLINE and lay.kind[-1] == KIND_NEWLINE
    assert assert_layout_proven(v, batch, [2]) == 32
    assert check_pixel_boxes(v, batch, patch=8) > 0
    t = lay.table()
    # 72x40 padded to 72x72 (16 px top and bottom): the first grid row shows a 2 px sliver of image
    first = t[(t.image == 0) & (t.kind == KIND_IMAGE)]
    assert np.isclose(first.y0.min(), 0) and np.isclose(first[first.row == 0].y1.max(), 2.0)


def test_onevision_downscaled_grid_boxes_are_footprints():
    """A large image: OneVision shrinks the 16x16 grid bilinearly. Codes linear in the stitched-grid
    (row, col) survive bilinear interpolation as the footprint centre, which must be the centre of
    the layout's box."""
    model, proc = build_tiny_onevision(0)
    v = VLM(model=model, processor=proc, adapter=adapter_for("llava_onevision"))
    batch = v.prepare([gradient_image(128, 128)], ["q"])
    lay = batch.layouts[0]
    rows, cols = lay.grid(0, 1)
    assert (rows, cols) == (12, 12)  # 16x16 cells > 1.1 * 9 crops of 4x4 -> shrunk by 4/3
    g, nw = 4, 4

    def codes(t):  # t: (crops, 16, hidden); crop 0 is the base view, crops 1.. are row-major
        out = torch.zeros_like(t)
        k = torch.arange(t.shape[0])[:, None].expand(-1, t.shape[1])
        r, c = torch.div(torch.arange(t.shape[1]), g, rounding_mode="floor"), torch.arange(t.shape[1]) % g
        ci, cj = torch.div(k - 1, nw, rounding_mode="floor"), (k - 1) % nw
        out[..., 0] = (ci * g + r).to(t.dtype)
        out[..., 1] = (cj * g + c).to(t.dtype)
        out[..., 2] = MARK
        return out

    embeds, _, _ = route_identity_codes(v, batch, codes=codes)
    e = embeds[0]
    hi = (lay.kind == KIND_IMAGE) & (lay.tile == 1)
    pos, R, C = lay.positions[hi], lay.row[hi], lay.col[hi]
    assert (e[pos, 2] == MARK).all()
    interior = (R > 0) & (R < rows - 1) & (C > 0) & (C < cols - 1)
    src_r, src_c = e[pos, 0].numpy(), e[pos, 1].numpy()
    # a stitched cell (row r) covers pixels [8r, 8r + 8) of the 128px canvas = the original image
    cy, cx = (src_r + 0.5) * 8, (src_c + 0.5) * 8
    by, bx = (lay.y0[hi] + lay.y1[hi]) / 2, (lay.x0[hi] + lay.x1[hi]) / 2
    np.testing.assert_allclose(cy[interior], by[interior], atol=1e-3)
    np.testing.assert_allclose(cx[interior], bx[interior], atol=1e-3)
    assert np.allclose(lay.x1[hi] - lay.x0[hi], 128 / 12)  # each token's footprint: 4/3 cells
    # the vision table says no high-res patch maps 1:1 onto an LM token
    vis = lay.vision_table()
    assert (vis[vis.tile == 1].row == -1).all()
