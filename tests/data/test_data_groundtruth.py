"""Ground truth per image token from pixel boxes and masks, through each family's own layout.

Reference (independent of vtrlab.data.groundtruth): rasterise each box pixel by pixel and
integrate the mask over every token's pixel box with explicit per-pixel overlap areas (float64).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from vtrlab.data.groundtruth import box_coverage, rasterize_boxes, relevance_grid, token_coverage, token_relevance
from vtrlab.data.manifest import Record
from vtrlab.testing import tiny, tiny_families


def _reference_coverage(mask: np.ndarray, box) -> float:
    """Mean of a pixel-square mask over one box, summing per-pixel overlap areas in a plain loop."""
    x0, y0, x1, y1 = box
    h, w = mask.shape
    x0, x1, y0, y1 = max(x0, 0.0), min(x1, float(w)), max(y0, 0.0), min(y1, float(h))
    area = (x1 - x0) * (y1 - y0)
    if not area > 0:
        return math.nan
    total = 0.0
    for y in range(math.floor(y0), math.ceil(y1)):
        oy = min(y + 1, y1) - max(y, y0)
        for x in range(math.floor(x0), math.ceil(x1)):
            ox = min(x + 1, x1) - max(x, x0)
            if ox > 0 and oy > 0:
                total += mask[y, x] * ox * oy
    return total / area


def _reference_raster(boxes, size) -> np.ndarray:
    w, h = size
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            for x0, y0, x1, y1 in boxes:
                ov = max(0.0, min(x + 1, x1) - max(x, x0)) * max(0.0, min(y + 1, y1) - max(y, y0))
                out[y, x] = max(out[y, x], ov)
    return out


def test_box_coverage_matches_loop_reference_on_random_fractional_boxes():
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31))
    mask[rng.random(mask.shape) < 0.5] = 0
    b = rng.uniform(-3, 34, size=(200, 4))
    x0, x1 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
    y0, y1 = np.minimum(b[:, 1], b[:, 3]) * 0.75, np.maximum(b[:, 1], b[:, 3]) * 0.75
    got = box_coverage(mask, x0, y0, x1, y1)
    want = np.array([_reference_coverage(mask, (a, c, d, e)) for a, c, d, e in zip(x0, y0, x1, y1)])
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=1e-10)


def test_box_coverage_nan_for_nan_and_outside_boxes():
    mask = np.ones((4, 4))
    got = box_coverage(mask, [np.nan, 5, 0], [0, 5, 0], [1, 6, 4], [1, 6, 4])
    assert np.isnan(got[0]) and np.isnan(got[1]) and got[2] == 1.0


def test_rasterize_boxes_matches_reference():
    boxes = np.array([[1.25, 0.5, 7.75, 3.0], [3.0, 2.5, 9.5, 6.2], [0, 0, 2, 2]])
    np.testing.assert_allclose(rasterize_boxes(boxes, (10, 7)), _reference_raster(boxes, (10, 7)), atol=1e-12)


def _picture(size=(200, 150)) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=tiny_families())
def family_layout(request):
    vlm = tiny(request.param)
    image = _picture()
    batch = vlm.prepare(images=[image], prompts=["what is in the box?"])
    return request.param, batch.layouts[0], image


def test_token_coverage_on_every_family_against_pixel_geometry(family_layout):
    family, layout, image = family_layout
    w, h = image.size
    boxes = np.array([[0.0, 0.0, 110.5, 80.25], [150, 100.5, 200, 150]])
    rec = Record(id="r", image_source=image, question="q", boxes=boxes)
    cov = token_relevance(layout, rec)
    sel = layout.kind == "image"
    assert cov.shape == (layout.n_image_tokens,) == (int(sel.sum()),)  # newline/separator tokens excluded
    raster = _reference_raster(boxes, (w, h))
    x0, y0, x1, y1 = (getattr(layout, c)[sel] for c in ("x0", "y0", "x1", "y1"))
    want = np.array([_reference_coverage(raster, b) for b in zip(x0, y0, x1, y1)])
    assert np.array_equal(np.isnan(cov), np.isnan(want)), family
    np.testing.assert_allclose(cov[~np.isnan(cov)], want[~np.isnan(want)], atol=1e-10, err_msg=family)
    # Tokens whose pixel box lies inside a box are fully covered; tokens far from both are not.
    inside = np.zeros_like(cov, dtype=bool)
    outside = np.ones_like(cov, dtype=bool)
    for bx0, by0, bx1, by1 in boxes:
        inside |= (x0 >= bx0) & (x1 <= bx1) & (y0 >= by0) & (y1 <= by1)
        outside &= (x1 <= bx0) | (x0 >= bx1) | (y1 <= by0) | (y0 >= by1)
    assert inside.any() and outside.any(), family
    np.testing.assert_allclose(cov[inside], 1.0, atol=1e-9, err_msg=family)
    np.testing.assert_allclose(cov[outside], 0.0, atol=1e-9, err_msg=family)


def test_token_coverage_of_a_whole_picture_mask_is_one_on_every_family(family_layout):
    family, layout, image = family_layout
    w, h = image.size
    cov = token_coverage(layout, np.ones((h, w)))
    valid = ~np.isnan(layout.x0[layout.kind == "image"])
    assert valid.any(), family
    np.testing.assert_allclose(cov[valid], 1.0, atol=1e-9, err_msg=family)
    assert np.all(np.isnan(cov[~valid])), family


def test_mask_and_normalised_boxes_agree_with_pixel_boxes(family_layout):
    family, layout, image = family_layout
    w, h = image.size
    box = [40, 30, 160, 120]
    mask = np.zeros((h, w), dtype=bool)
    mask[30:120, 40:160] = True
    a = token_relevance(layout, Record(id="a", image_source=image, question="q", boxes=[box]))
    b = token_relevance(layout, Record(id="b", image_source=image, question="q", mask=mask))
    c = token_relevance(
        layout,
        Record(
            id="c", image_source=image, question="q", box_format="xywh_norm", boxes=[[40 / w, 30 / h, 120 / w, 90 / h]]
        ),
    )
    np.testing.assert_allclose(a, b, atol=1e-12, err_msg=family)
    np.testing.assert_allclose(a, c, atol=1e-9, err_msg=family)


def test_mask_of_the_wrong_size_is_refused(family_layout):
    _, layout, _ = family_layout
    with pytest.raises(ValueError, match="mask is 10x10"):
        token_coverage(layout, np.ones((10, 10)))


def test_record_without_ground_truth_gives_none(family_layout):
    _, layout, image = family_layout
    assert token_relevance(layout, Record(id="x", image_source=image, question="q")) is None


def test_organism_pixel_masks_give_its_patch_relevance():
    import vtrlab as vl
    from vtrlab.data.sources import load_data

    data = load_data("organism", n_samples=15, seed=3)
    vlm = vl.load("organism")
    batch = vlm.prepare(images=[r.image for r in data], prompts=[r.question for r in data])
    for layout, rec in zip(batch.layouts, data):
        cov = token_relevance(layout, rec)
        grid = relevance_grid(layout, cov)
        assert grid.shape == rec.relevance.shape
        assert np.array_equal(grid, rec.relevance), rec.id
        # coverage is the exact fraction of relevant pixels in each 8x8 patch
        m = np.asarray(rec.mask, dtype=float)
        frac = m.reshape(16, 8, 16, 8).mean(axis=(1, 3))
        np.testing.assert_allclose(layout.to_grid(cov), frac, atol=1e-12)


def test_synthetic_samples_and_their_records_give_the_same_coverage():
    from vtrlab.data.sources import organism_record
    from vtrlab.data.synthetic import generate

    vlm = tiny("llava_next")
    samples = generate(3, seed=1)
    batch = vlm.prepare(images=[s.image for s in samples], prompts=[s.question for s in samples])
    for layout, s in zip(batch.layouts, samples):
        a, b = token_relevance(layout, s), token_relevance(layout, organism_record(s))
        assert a is not None and np.array_equal(a, b)
