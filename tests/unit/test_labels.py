"""One helper per job in vtrlab.models: the grid-mask reader on the layout, the per-image-token
coordinates, the packed-crop offsets, the hook recorder and the image placeholder id."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vtrlab.models.base import ImageLayout, grid_values, image_token_id
from vtrlab.models.hooks import StopForward, record, require_seen
from vtrlab.models.labels import packed_crop_offsets, token_coordinates


def _layout(side, offset=3, tile=None):
    n = side * side
    r, c = np.divmod(np.arange(n), side)
    t = np.zeros(n, int) if tile is None else np.asarray(tile)
    return ImageLayout(
        positions=np.arange(n) + offset,
        kind=np.array(["image"] * n, dtype=object),
        image=np.zeros(n, int),
        tile=t,
        row=r,
        col=c,
        x0=c * 8.0,
        y0=r * 8.0,
        x1=c * 8.0 + 8,
        y1=r * 8.0 + 8,
        seq_len=n + offset + 2,
        valid_positions=np.arange(n + offset + 2),
        question_positions=np.array([n + offset]),
        grid_shapes={(0, int(k)): (side, side) for k in np.unique(t)},
    )


# --- value per LM image token from a patch-grid mask --------------------------------------------------


def test_tokens_from_grid_reads_each_token_cell():
    lay = _layout(4)
    mask = np.arange(16).reshape(4, 4)
    assert lay.tokens_from_grid(mask).tolist() == list(range(16))
    rel = np.zeros((4, 4), bool)
    rel[1, 2] = True
    got = lay.tokens_from_grid(rel)
    assert got.dtype == bool and np.flatnonzero(got).tolist() == [1 * 4 + 2]


def test_larger_mask_is_refused_not_read_at_its_corner():
    # issue 13: a 16x16 relevance mask on an 8x8 (merged) grid was read at [:8, :8] — the top-left
    # quadrant — without a word. It must be refused, naming both shapes.
    lay = _layout(8)
    big = np.zeros((16, 16), bool)
    big[12:, 12:] = True  # all relevance in the bottom-right quadrant: a corner read sees none of it
    with pytest.raises(ValueError, match=r"\(16, 16\) does not match the layout's 8x8 patch grid"):
        lay.tokens_from_grid(big)
    with pytest.raises(ValueError, match="does not match"):
        lay.tokens_from_grid(np.zeros((8, 6)))
    with pytest.raises(ValueError, match="2-D"):
        lay.tokens_from_grid(np.zeros(64))


def test_coarser_mask_expands_by_an_integer_factor():
    lay = _layout(4)
    coarse = np.array([[1, 0], [0, 1]], bool)
    got = lay.tokens_from_grid(coarse).reshape(4, 4)
    assert np.array_equal(got, np.kron(coarse, np.ones((2, 2), bool)))
    with pytest.raises(ValueError, match="does not match"):
        _layout(5).tokens_from_grid(coarse)  # 2 does not divide 5


def test_mask_on_one_view_refused_when_tokens_span_several():
    lay = _layout(2, tile=[0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"span views \(image, tile\) \[\(0, 0\), \(0, 1\)\]"):
        lay.tokens_from_grid(np.ones((2, 2)))


def test_grid_values_is_the_same_rule_for_tables():
    rows, cols = np.array([0, 1, 1]), np.array([1, 0, 1])
    m = np.array([[0, 1], [2, 3]])
    assert grid_values(m, (2, 2), rows, cols).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="outside the 2x2 grid"):
        grid_values(m, (2, 2), np.array([2]), np.array([0]))


# --- per-image-token coordinates ------------------------------------------------------------------------


def test_token_coordinates_follow_the_layouts_and_pad():
    lays = [_layout(3), _layout(2, offset=5)]
    c = token_coordinates(lays)
    assert c["token"].tolist() == list(range(9))
    dims, pos = c["position"]
    assert dims == ("sample", "token") and pos[0].tolist() == list(range(3, 12))
    assert pos[1, :4].tolist() == [5, 6, 7, 8] and (pos[1, 4:] == -1).all()
    assert c["row"][1][1, :4].tolist() == [0, 0, 1, 1] and c["col"][1][1, :4].tolist() == [0, 1, 0, 1]
    assert c["x1"][1][1, :4].tolist() == [8, 16, 8, 16] and np.isnan(c["x0"][1][1, 4:]).all()
    assert set(c) == {"token", "position", "image", "tile", "row", "col", "x0", "y0", "x1", "y1"}
    with pytest.raises(ValueError, match="at least one layout"):
        token_coordinates([])


# --- packed-crop offsets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_batch():
    from vtrlab.testing import tiny

    vlm = tiny("qwen2_vl", seed=0)
    rng = np.random.default_rng(0)
    imgs = [
        [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))],
        [
            Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)),
        ],
    ]
    return vlm, vlm.prepare(imgs, ["a ?", "what is it ?"])


def test_packed_offsets_come_from_the_encoder_lengths_not_the_table_rows(qwen_batch):
    vlm, batch = qwen_batch
    thw = batch.inputs["image_grid_thw"].cpu().prod(-1).tolist()
    want = dict(enumerate(np.concatenate([[0], np.cumsum(thw)[:-1]]).astype(int).tolist()))
    assert packed_crop_offsets(batch.layouts) == want
    # a vision table listing only part of a crop (here: crop 0 loses its last 5 rows) must not move
    # the crops after it. The two old rules (rows per crop; max vpos + 1) both would.
    lays = [ImageLayout(**{**lay.__dict__}) for lay in batch.layouts]
    t = lays[0].vision
    lays[0].vision = t[~((t["crop"] == 0) & (t["vpos"] >= t.loc[t["crop"] == 0, "vpos"].max() - 4))]
    assert packed_crop_offsets(lays) == want
    old_rows = int((lays[0].vision["crop"] == 0).sum())
    assert old_rows != want[1]  # the old row-count rule would have put crop 1 here
    lays[1].crop_lengths = {}
    with pytest.raises(ValueError, match="records no crop_lengths"):
        packed_crop_offsets(lays)


def test_vision_features_with_an_incomplete_table_match_the_complete_one(qwen_batch):
    from vtrlab.recon import vision_features

    vlm, batch = qwen_batch
    full = vision_features(vlm, batch, 0)[0]
    lays = [ImageLayout(**{**lay.__dict__}) for lay in batch.layouts]
    t = lays[0].vision
    keep = ~((t["crop"] == 0) & (t["vpos"] >= t.loc[t["crop"] == 0, "vpos"].max() - 4))
    lays[0].vision = t[keep].reset_index(drop=True)
    part = vision_features(
        vlm, type(batch)(inputs=batch.inputs, layouts=lays, images=batch.images, prompts=batch.prompts), 0
    )[0]
    assert torch.equal(part[0].features, full[0].features[torch.as_tensor(keep.to_numpy().copy())])
    assert torch.equal(part[1].features, full[1].features)  # crops 1 and 2 read at the right offsets


# --- the hook recorder ------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.ran = []

    def forward(self, x, scale=1.0):
        for name in ("a", "b", "c"):
            x = getattr(self, name)(x) * scale
            self.ran.append(name)
        return x


def test_record_outputs_inputs_and_stop():
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(2, 3)
    with record(outputs={"a": net.a}, inputs={"b_in": net.b}, stop=True) as seen:
        net(x, scale=2.0)
    assert net.ran == ["a"]  # stopped before b ran: nothing after it was needed
    assert torch.equal(seen["a"], net.a(x)) and torch.equal(seen["b_in"].args[0], seen["a"] * 2.0)
    net.ran.clear()
    with record(outputs={"c": net.c}, transform=lambda t: t.norm(dim=-1)) as seen:
        y = net(x)
    assert net.ran == ["a", "b", "c"] and torch.allclose(seen["c"], y.norm(dim=-1))
    assert not net.a._forward_hooks and not net.b._forward_pre_hooks and not net.c._forward_hooks


def test_record_restores_hooks_on_errors_and_only_swallows_its_own_stop():
    net, x = _Net(), torch.randn(1, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with record(outputs={"a": net.a}, stop=True):
            raise RuntimeError("boom")
    assert not net.a._forward_hooks
    # an inner recorder's stop is not swallowed by an outer one
    with record(outputs={"c": net.c}) as outer:
        with record(outputs={"a": net.a}, stop=True) as inner:
            net(x)
    assert "a" in inner and "c" not in outer
    with pytest.raises(RuntimeError, match=r"never called the module\(s\) recorded as \['c'\]"):
        require_seen(outer, ["c"], net)
    assert isinstance(StopForward(object()), Exception)
    with pytest.raises(ValueError, match="both an output and an input"):
        with record(outputs={"a": net.a}, inputs={"a": net.b}):
            pass


# --- the image placeholder id -------------------------------------------------------------------------------


def test_image_token_id_reads_either_config_name():
    class Cfg:
        pass

    new, old, none = Cfg(), Cfg(), Cfg()
    new.image_token_id, old.image_token_id, old.image_token_index = 5, None, 7
    assert image_token_id(new) == 5 and image_token_id(old) == 7
    with pytest.raises(ValueError, match="names no image placeholder"):
        image_token_id(none)
