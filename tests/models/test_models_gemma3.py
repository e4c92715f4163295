"""Gemma 3 adapter: modules, boi/eoi separators, pooled grid, pixel-proven layout, pan & scan refusal."""

from __future__ import annotations

import pytest
import torch

from vtrlab.models.base import KIND_SEPARATOR
from vtrlab.models.families._common import TEXTS_ATTR, chat_texts
from vtrlab.testing import tiny
from vtrlab.testing._pixel_route import check_lm_positions, check_vision_table, codes_at_positions
from vtrlab.testing.pixels import gradient_image
from vtrlab.testing.probes import projector_io

pytestmark = pytest.mark.xdist_group("gemma3")
CASES = {
    "nonsquare": ([gradient_image(90, 30)], ["Where is the red square?"]),
    "two_images": ([[gradient_image(64, 40), gradient_image(20, 28)]], ["Which image is brighter?"]),
    "padded_batch": (
        [gradient_image(40, 70), gradient_image(70, 70)],
        ["Count the dots.", "Is the circle on the left?"],
    ),
}


@pytest.fixture(scope="module")
def vlm():
    return tiny("gemma3", seed=0)


def test_modules(vlm):
    m, a = vlm.model, vlm.adapter
    assert a.family == "gemma3"
    assert a.language_model(m) is m.model.language_model
    assert list(vlm.lm_layers) == list(m.model.language_model.layers)
    assert list(vlm.vision_layers) == list(a.vision_encoder(m).encoder.layers)
    assert a.vision_attention(vlm.vision_layers[0]) is vlm.vision_layers[0].self_attn
    assert a.projector(m) is m.model.multi_modal_projector and a.lm_head(m) is m.lm_head
    assert vlm.has_cls is False


def test_vision_feature_layer_feeds_the_projector(vlm):
    m, a = vlm.model, vlm.adapter
    batch = vlm.prepare([gradient_image(40, 40)], ["hi"])
    layer_out, proj = projector_io(vlm, batch)
    torch.testing.assert_close(proj, a.vision_encoder(m).post_layernorm(layer_out), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_counts_and_separators(vlm, case):
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    cfg = vlm.model.config
    for i, lay in enumerate(batch.layouts):
        n = len(lay.image_sizes)
        ids = batch.inputs["input_ids"][i]
        assert lay.n_image_tokens == int((ids == cfg.image_token_id).sum()) == n * cfg.mm_tokens_per_image
        seps = lay.positions[lay.kind == KIND_SEPARATOR]
        assert sorted(ids[seps].tolist()) == sorted([cfg.boi_token_id, cfg.eoi_token_id] * n)
        for j in range(n):
            assert lay.grid(j, 0) == (4, 4)


@pytest.mark.parametrize("case", list(CASES))
def test_layout_and_vision_table_proven_by_pixels(vlm, case):
    """Codes ride through the model's own average pooling: each pooled token's pixels must be
    centred on the box the layout gives it, and come from its image's view."""
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    embeds, seen = codes_at_positions(vlm, batch)

    def source_of(i, j, tile):
        vis = batch.layouts[i].vision_table()
        return set(vis.loc[vis["image"] == j, "crop"].tolist())

    assert check_lm_positions(vlm, batch, embeds, 1, source_of) == sum(lay.n_image_tokens for lay in batch.layouts)
    n_views, per_view = seen["vision_seq"].shape[:2]
    assert check_vision_table(vlm, batch, seen["vision_seq"], flat=False) == n_views * per_view


def test_pan_and_scan_is_refused_with_a_clear_error(vlm):
    """Pan & scan is off by default; inputs built with it carry crops the layout does not
    describe, so the adapter must refuse them instead of mislabelling."""
    images, prompts = [[gradient_image(120, 30)]], ["wide"]
    inputs = vlm.processor(
        images=images,
        text=chat_texts(vlm.processor, images, prompts),
        return_tensors="pt",
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=8,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    setattr(inputs, TEXTS_ATTR, {"texts": None, "prompts": prompts})
    assert inputs["pixel_values"].shape[0] > 1  # the processor did add crops
    with pytest.raises(ValueError, match="pan & scan"):
        vlm.adapter.layouts(vlm.model, vlm.processor, inputs, images)


def _decoder_kwargs_seen(vlm, batch):
    seen = {}
    lm = vlm.adapter.language_model(vlm.model)
    h = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            ref = vlm.model(**batch.inputs, output_hidden_states=True).hidden_states[-1]
    finally:
        h.remove()
    return seen, ref


def test_decoder_inputs_embeds_and_positions_are_what_the_decoder_gets(vlm):
    images, prompts = CASES["padded_batch"]
    batch = vlm.prepare(images, prompts)
    dec = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)
    seen, ref = _decoder_kwargs_seen(vlm, batch)
    torch.testing.assert_close(dec["inputs_embeds"], seen["inputs_embeds"], rtol=0, atol=0)
    # Gemma3 hands its decoder a per-layer-type mask mapping (image blocks attend bidirectionally,
    # from token_type_ids); with that mapping the decoder reproduces the model exactly.
    assert isinstance(seen["attention_mask"], dict)
    lm = vlm.adapter.language_model(vlm.model)
    with torch.no_grad():
        got = lm(**dict(dec, attention_mask=seen["attention_mask"])).last_hidden_state
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
