"""The synthetic organism tasks: determinism, answers and relevance masks checked from the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from vtrlab.data.glyphs import LETTERS, glyph
from vtrlab.data.synthetic import (
    BACKGROUND,
    COLORS,
    COUNTS,
    FAMILIES,
    PLURALS,
    SHAPES,
    WORD_LENGTH,
    blank_like,
    generate,
    make_sample,
    relevance_from_mask,
)

N = 30  # samples per family checked


@pytest.fixture(scope="module")
def samples():
    return {f: generate(N, seed=7, family=f) for f in FAMILIES}


def _same(a, b) -> bool:
    return (
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        and a.question == b.question
        and a.answer == b.answer
        and np.array_equal(a.relevance, b.relevance)
        and np.array_equal(a.pixel_mask, b.pixel_mask)
    )


def test_generate_is_deterministic_and_prefix_stable():
    a, b = generate(12, seed=3), generate(12, seed=3)
    assert all(_same(x, y) for x, y in zip(a, b))
    longer = generate(20, seed=3)
    assert all(_same(x, y) for x, y in zip(a, longer[:12]))
    other = generate(12, seed=4)
    assert not all(_same(x, y) for x, y in zip(a, other))
    assert [s.family for s in a] == [FAMILIES[i % len(FAMILIES)] for i in range(12)]


def test_unknown_family_error_lists_accepted():
    with pytest.raises(ValueError, match=r"unknown family 'colour'.*color, shape, count, relation, reading"):
        generate(2, 0, family="colour")
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate(-1, 0)


def test_shapes_and_grid(samples):
    for ss in samples.values():
        for s in ss:
            assert s.image.size == (128, 128) and s.image.mode == "RGB"
            assert s.relevance.shape == (16, 16) and s.relevance.dtype == bool
            assert s.pixel_mask.shape == (128, 128) and s.pixel_mask.any()
    s = make_sample(0, 0, "color", grid=8, image_size=64)
    assert s.relevance.shape == (8, 8) and s.image.size == (64, 64)


def test_relevance_is_patch_pooling_of_pixel_mask(samples):
    # oracle: explicit loop over patches
    for s in samples["count"][:10] + samples["reading"][:10]:
        g, p = 16, 8
        ref = np.zeros((g, g), bool)
        for r in range(g):
            for c in range(g):
                ref[r, c] = s.pixel_mask[r * p : (r + 1) * p, c * p : (c + 1) * p].any()
        assert np.array_equal(ref, s.relevance)
        assert np.array_equal(relevance_from_mask(s.pixel_mask, 16), ref)


def _color_mask(img: np.ndarray, color: str) -> np.ndarray:
    return (img == np.array(COLORS[color])).all(-1)


def test_shape_family_mask_is_exactly_the_pixels_of_the_unique_color(samples):
    # the target color is unique in a `shape` scene, so its pixels *are* the relevant object
    for s in samples["shape"]:
        color = s.question.split()[-3]
        img = np.asarray(s.image)
        assert np.array_equal(s.pixel_mask, _color_mask(img, color))
        target = [o for o in s.objects if o.relevant]
        assert len(target) == 1 and target[0].shape == s.answer


def test_masks_cover_exactly_the_drawn_relevant_objects(samples):
    """For every relevant object: inside its box (objects never overlap), the mask equals the
    pixels painted in its color; outside all relevant boxes the mask is empty; and the pixels
    that differ from the background are exactly the drawn objects."""
    for fam in ("color", "count", "relation"):
        for s in samples[fam]:
            img = np.asarray(s.image)
            drawn = (img != np.array(BACKGROUND)).any(-1)
            assert np.array_equal(drawn, s.object_map > 0)
            covered = np.zeros_like(s.pixel_mask)
            for o in s.objects:
                if not o.relevant:
                    continue
                x0, y0, x1, y1 = o.bbox
                box = np.zeros_like(covered)
                box[y0:y1, x0:x1] = True
                painted = _color_mask(img, o.color) & box
                assert painted.sum() > 20
                assert np.array_equal(s.pixel_mask & box, painted)
                covered |= box
            assert not (s.pixel_mask & ~covered).any()


def test_reading_mask_is_the_ink(samples):
    for s in samples["reading"]:
        img = np.asarray(s.image).astype(int)
        ink = (img < 100).all(-1)  # glyph ink is darker than any clutter or background
        assert np.array_equal(ink, s.pixel_mask)
        assert len(s.answer) == WORD_LENGTH and s.answer.upper() == "".join(o.letter for o in s.objects)
        # each glyph is drawn exactly: its box holds the font bitmap
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            g = glyph(o.letter)
            ys, xs = np.nonzero(g)
            bits = ink[y0:y1, x0:x1]
            assert np.array_equal(bits, g[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
        assert 4 <= s.relevance.sum() <= 40


def test_answers_follow_from_the_scene(samples):
    for s in samples["color"]:
        shape = s.question.split()[-2]
        targets = [o for o in s.objects if o.shape == shape]
        assert len(targets) == 1 and targets[0].color == s.answer and targets[0].relevant
    for s in samples["count"]:
        plural = s.question.split()[2]
        shape = next(k for k, v in PLURALS.items() if v == plural)
        n = sum(o.shape == shape for o in s.objects)
        assert s.answer == str(n) and s.answer in COUNTS
        assert all(o.relevant == (o.shape == shape) for o in s.objects)
    for s in samples["relation"]:
        words = s.question.rstrip(" ?").split()  # is the A left or right of the B | is the A above or below the B
        a, b = words[2], words[-1]
        oa = next(o for o in s.objects if o.shape == a)
        ob = next(o for o in s.objects if o.shape == b)
        assert sum(o.shape == a for o in s.objects) == 1 and sum(o.shape == b for o in s.objects) == 1
        if words[3] == "left":
            assert s.choices == ("left", "right") and s.answer == ("left" if oa.center[0] < ob.center[0] else "right")
        else:
            assert words[3] == "above" and s.choices == ("above", "below")
            assert s.answer == ("above" if oa.center[1] < ob.center[1] else "below")
        assert {o.shape for o in s.objects if o.relevant} == {a, b}


def test_position_answer_follows_from_the_scene(samples):
    from vtrlab.data.synthetic import COLOR_NAMES, POSITION_MARGIN

    for s in samples["position"]:
        words = s.question.rstrip(" ?").split()  # is the [COLOR] SHAPE left or right | top or bottom
        named = words[2:-3]
        if named[0] in COLOR_NAMES:
            color, shape = named
            same = [o for o in s.objects if (o.color, o.shape) == (color, shape)]
        else:
            (shape,) = named
            same = [o for o in s.objects if o.shape == shape]
        assert len(same) == 1 and same[0].relevant and sum(o.relevant for o in s.objects) == 1
        k = 0 if words[-3:] == ["left", "or", "right"] else 1
        assert words[-3:] in (["left", "or", "right"], ["top", "or", "bottom"])
        assert abs(same[0].center[k] - 64) >= POSITION_MARGIN  # centre of the drawn pixels
        options = ("left", "right") if k == 0 else ("top", "bottom")
        assert s.choices == options and s.answer == options[0 if same[0].center[k] < 64 else 1]
        assert s.relevance.any()


def test_captions_describe_every_object(samples):
    from vtrlab.data.synthetic import caption, region

    for fam, ss in samples.items():
        for s in ss:
            assert s.caption == caption(s.objects)
            if fam == "reading":
                assert s.caption == f"the word {s.answer} written on clutter"
                continue
            for o in s.objects:
                assert f"a {o.color} {o.shape} at {region(o.center)}" in s.caption
            assert s.caption.count(" and ") == len(s.objects) - 1
    assert region((0, 0)) == "top left" and region((127, 127)) == "bottom right" and region((64, 64)) == "middle center"


def test_answer_balance():
    for family, axes in (
        ("relation", (("left", "right"), ("above", "below"))),
        ("position", (("left", "right"), ("top", "bottom"))),
    ):
        ss = generate(600, seed=11, family=family)
        for options in axes:
            asked = [s for s in ss if s.choices == options]
            assert 0.4 < len(asked) / len(ss) < 0.6, (family, options)
            first = sum(s.answer == options[0] for s in asked) / len(asked)
            assert 0.4 < first < 0.6, (family, options, first)
    ss = generate(200, seed=11, family="shape")
    assert {s.answer for s in ss} == set(SHAPES)


def test_blank_like_is_plain_background(samples):
    b = np.asarray(blank_like(samples["color"][0]))
    assert b.shape == (128, 128, 3) and (b == np.array(BACKGROUND)).all()


def test_glyph_errors():
    assert len(LETTERS) == 26 and glyph("a").shape == (14, 10)
    with pytest.raises(ValueError, match="no glyph for '1'"):
        glyph("1")


def test_manifest_roundtrip_and_errors(tmp_path):
    from vtrlab.data.manifest import read_image_folder, read_manifest, write_manifest

    ss = generate(5, seed=2)
    path = write_manifest(ss, tmp_path / "export")
    recs = read_manifest(path)
    assert [r.question for r in recs] == [s.question for s in ss]
    assert [r.answer for r in recs] == [s.answer for s in ss]
    assert np.array_equal(np.asarray(recs[3].image), np.asarray(ss[3].image))
    # the pixel mask travels as a 1-bit PNG beside the picture and reads back exactly
    assert np.array_equal(recs[4].pixel_mask > 0, np.asarray(ss[4].pixel_mask, dtype=bool))
    assert recs[0].family == ss[0].family
    assert len(read_image_folder(tmp_path / "export" / "images", question="what ?")) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: each line needs an object with an 'image' key"):
        read_manifest(bad)
    bad.write_text('{"image": "nope.png"}\n')
    with pytest.raises(FileNotFoundError, match="nope.png does not exist"):
        read_manifest(bad)
    with pytest.raises(ValueError, match="no images in"):
        read_image_folder(tmp_path)
