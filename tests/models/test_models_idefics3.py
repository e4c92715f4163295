"""Idefics3 and SmolVLM adapters: modules, counts, crop/global tiles, pixel-proven layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.models.base import KIND_IMAGE, KIND_SEPARATOR
from vtrlab.testing import tiny
from vtrlab.testing._pixel_route import check_lm_positions, check_vision_table, codes_at_positions
from vtrlab.testing.pixels import gradient_image
from vtrlab.testing.probes import projector_io

pytestmark = pytest.mark.xdist_group("idefics3")
FAMILIES = ["idefics3", "smolvlm"]
CASES = {
    # 90x30 -> 96x32: one row of three crops + global; 20x28 (small) is UPSCALED to 3x3 crops
    "nonsquare": ([gradient_image(90, 30)], ["Where is the red square?"]),
    "two_images": ([[gradient_image(64, 40), gradient_image(20, 28)]], ["Which image is brighter?"]),
    "padded_batch": ([gradient_image(40, 70), gradient_image(70, 70)], ["Count the dots.", "Is it left?"]),
}


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    return tiny(request.param, seed=0)


def test_modules(vlm):
    m, a = vlm.model, vlm.adapter
    assert a.family == m.config.model_type
    assert a.language_model(m) is m.model.text_model
    assert list(vlm.lm_layers) == list(m.model.text_model.layers)
    assert list(vlm.vision_layers) == list(m.model.vision_model.encoder.layers)
    assert a.vision_attention(vlm.vision_layers[0]) is m.model.vision_model.encoder.layers[0].self_attn
    assert a.lm_attention(vlm.lm_layers[0]) is m.model.text_model.layers[0].self_attn
    assert a.projector(m) is m.model.connector and a.lm_head(m) is m.lm_head
    assert vlm.has_cls is False


def test_vision_feature_layer_feeds_the_connector(vlm):
    """Oracle: the connector input is the last encoder layer's output after post_layernorm."""
    m = vlm.model
    batch = vlm.prepare([gradient_image(40, 40)], ["hi"])
    layer_out, conn = projector_io(vlm, batch)
    torch.testing.assert_close(conn, m.model.vision_model.post_layernorm(layer_out), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_counts_and_tiles(vlm, case):
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    info = vlm.processor.image_processor(batch.images, return_row_col_info=True)
    seq = vlm.processor.image_seq_len
    for i, lay in enumerate(batch.layouts):
        n_views = [r * c + 1 if r * c else 1 for r, c in zip(info["rows"][i], info["cols"][i])]
        placeholders = int((batch.inputs["input_ids"][i] == vlm.model.config.image_token_id).sum())
        assert lay.n_image_tokens == placeholders == seq * sum(n_views)
        # the processor's own replacement string for each image, tokenized
        grid = {"rows": [info["rows"][i]], "cols": [info["cols"][i]]}
        expected_block = [
            len(
                vlm.processor.tokenizer(vlm.processor.replace_image_token(grid, j), add_special_tokens=False)[
                    "input_ids"
                ]
            )
            for j in range(len(lay.image_sizes))
        ]
        for j in range(len(lay.image_sizes)):
            mine = lay.image == j
            # the whole block (separators included) has the length the processor itself predicts
            assert mine.sum() == expected_block[j]
            tiles = lay.tile[mine & (lay.kind == KIND_IMAGE)]
            assert sorted(set(tiles.tolist())) == list(range(n_views[j]))
            # tile 0 (global view) comes LAST in the sequence; crops 1.. in raster order before it
            pos = lay.positions[mine & (lay.kind == KIND_IMAGE)]
            order = [t for t in dict.fromkeys(tiles[np.argsort(pos)].tolist())]
            assert order == list(range(1, n_views[j])) + [0]
        seps = lay.positions[lay.kind == KIND_SEPARATOR]
        ids = batch.inputs["input_ids"][i][seps]
        fake = vlm.processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
        assert int((ids == fake).sum()) == sum(n + 1 for n in n_views)


@pytest.mark.parametrize("case", list(CASES))
def test_layout_and_vision_table_proven_by_pixels(vlm, case):
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    embeds, seen = codes_at_positions(vlm, batch)

    def source_of(i, j, tile):
        vis = batch.layouts[i].vision_table()
        return set(vis.loc[(vis["image"] == j) & (vis["tile"] == tile), "crop"].tolist())

    s = vlm.model.config.scale_factor
    n = check_lm_positions(vlm, batch, embeds, s, source_of)
    assert n == s * s * sum(lay.n_image_tokens for lay in batch.layouts)
    n_crops = seen["vision_seq"].shape[0]
    per_crop = seen["vision_seq"].shape[1]
    assert check_vision_table(vlm, batch, seen["vision_seq"], flat=False) == n_crops * per_crop


def test_wrong_tile_is_caught(vlm):
    images, prompts = CASES["nonsquare"]
    batch = vlm.prepare(images, prompts)
    embeds, _ = codes_at_positions(vlm, batch)
    lay = batch.layouts[0]
    lay.tile[lay.tile == 1] = 9  # relabel crop 1: its source crop no longer matches

    def source_of(i, j, tile):
        vis = batch.layouts[i].vision_table()
        return set(vis.loc[(vis["image"] == j) & (vis["tile"] == tile), "crop"].tolist())

    with pytest.raises(AssertionError, match="came from vision input"):
        check_lm_positions(vlm, batch, embeds, 2, source_of)
