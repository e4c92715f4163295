"""The layout is proven, not assumed, for every registered family (tiny random models, CPU).

Each feature row entering the model's own packing code is replaced by a code that names its row;
what lands at each LM position is read back from the decoder's inputs and compared with what the
layout claims. Families register their hook point and expected rows in vtrlab.models.testing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.models.base import KIND_IMAGE, KIND_NEWLINE
from vtrlab.models.testing import proof_spec, tiny, tiny_families
from vtrlab.models.testing.pixels import gradient_image

FAMILIES = tiny_families()
MARK = 4096.0  # channel 1 of every code; no text embedding of a random model comes near it


CASES = {
    "square": ([gradient_image(48, 48)], ["What is in the picture?"]),
    "nonsquare": ([gradient_image(72, 40)], ["Where is the red square?"]),
    "two_images": ([[gradient_image(64, 40), gradient_image(40, 72)]], ["Which image is brighter?"]),
    "padded_batch": (
        [gradient_image(72, 40), gradient_image(40, 56)],
        ["Count the dots.", "Is there a circle on the left side of the image?"],
    ),
}


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    return tiny(request.param, seed=0)


def _replace(out, codes_fn):
    """Replace the feature tensor inside a module output with identity codes."""
    if torch.is_tensor(out):
        return codes_fn(out)
    for name in ("pooler_output", "last_hidden_state"):
        t = getattr(out, name, None)
        if torch.is_tensor(t):
            setattr(out, name, codes_fn(t))
            if isinstance(out, dict) and name in out:
                out[name] = getattr(out, name)
            return out
    if isinstance(out, tuple):
        return (codes_fn(out[0]),) + tuple(out[1:])
    raise TypeError(f"cannot find the feature tensor in a {type(out).__name__}")


def route_identity_codes(vlm, batch):
    """inputs_embeds the decoder receives when every feature row n of the proof module is (n+1, MARK, 0, ...)."""
    module, expected = proof_spec(vlm.family)(vlm, batch)
    n_rows = {}

    def codes(t):
        flat = torch.zeros(t.numel() // t.shape[-1], t.shape[-1], dtype=t.dtype, device=t.device)
        flat[:, 0] = torch.arange(1, flat.shape[0] + 1, dtype=t.dtype, device=t.device)
        flat[:, 1] = MARK
        n_rows["n"] = flat.shape[0]
        return flat.reshape(t.shape)

    handle = module.register_forward_hook(lambda m, a, out: _replace(out, codes))
    try:
        embeds = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)["inputs_embeds"]
    finally:
        handle.remove()
    return embeds.float(), expected, n_rows["n"]


def image_token_id(vlm) -> int:
    fn = getattr(vlm.adapter, "image_token_id", None)
    if fn is not None:
        return int(fn(vlm.model))
    cfg = vlm.model.config
    return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)


@pytest.mark.parametrize("case", list(CASES))
def test_layout_proven_by_identity_codes(vlm, case):
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    embeds, expected, n_rows = route_identity_codes(vlm, batch)
    ids = batch.inputs["input_ids"]
    newline = getattr(vlm.adapter, "newline_embedding", lambda m: None)(vlm.model)
    seen_rows = []
    for i, lay in enumerate(batch.layout):
        e = embeds[i]
        is_code = e[:, 1] == MARK
        # (a) the processor's image tokens are exactly the layout's image + newline positions
        placeholder = set(torch.nonzero(ids[i] == image_token_id(vlm)).flatten().tolist())
        fed = set(lay.positions[np.isin(lay.kind, [KIND_IMAGE, KIND_NEWLINE])].tolist())
        assert placeholder == fed, f"sample {i}: processor placeholders and layout disagree"
        n_expected_images = len(images[i]) if isinstance(images[i], list) else 1
        assert sorted(set(lay.image.tolist())) == list(range(n_expected_images))
        # (b) every image position holds exactly the feature row the layout names
        img_pos = lay.image_positions
        got = torch.round(e[img_pos, 0]).long().numpy() - 1
        assert is_code[img_pos].all(), f"sample {i}: some image positions hold no feature"
        exp = np.asarray(expected[i])
        assert len(exp) == len(img_pos) and (exp >= 0).all()
        bad = np.flatnonzero(got != exp)
        assert bad.size == 0, (
            f"sample {i}: {bad.size}/{len(exp)} positions hold another feature than the layout names; first: "
            f"position {img_pos[bad[0]]} holds row {got[bad[0]]}, layout says {exp[bad[0]]}"
        )
        assert torch.all(e[img_pos, 2:] == 0)
        seen_rows.append(got)
        # nothing outside the layout's image positions carries a feature code
        others = np.setdiff1d(np.arange(e.shape[0]), img_pos)
        assert not is_code[others].any(), f"sample {i}: a feature landed outside the layout's image positions"
        nl = lay.positions[lay.kind == KIND_NEWLINE]
        if len(nl):
            assert newline is not None, f"{vlm.family} has newline tokens but its adapter gives no newline_embedding"
            torch.testing.assert_close(e[nl], newline.float().expand(len(nl), -1), rtol=0, atol=0)
        # layout bookkeeping
        assert lay.seq_len == ids.shape[1]
        assert np.isin(lay.positions, lay.valid_positions).all()
        assert not np.isin(lay.question_positions, lay.positions).any()
        assert lay.last_position == int(torch.nonzero(batch.inputs["attention_mask"][i]).max())
        for j, t in set(zip(lay.image[lay.kind == KIND_IMAGE].tolist(), lay.tile[lay.kind == KIND_IMAGE].tolist())):
            grid = lay.to_grid(np.ones(lay.n_image_tokens), j, t)
            assert np.nansum(grid) == ((lay.image == j) & (lay.tile == t) & (lay.kind == KIND_IMAGE)).sum()
    rows = np.concatenate(seen_rows)
    assert len(np.unique(rows)) == len(rows), "two positions claim the same feature row"
    assert rows.max() < n_rows


@pytest.mark.parametrize("case", ["nonsquare", "padded_batch"])
def test_question_positions_spell_the_prompt(vlm, case):
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    tok = vlm.processor.tokenizer
    for i, lay in enumerate(batch.layout):
        text = tok.decode(batch.inputs["input_ids"][i][lay.question_positions])
        assert " ".join(text.split()).lower() == " ".join(prompts[i].split()).lower()
        assert (np.diff(lay.question_positions) == 1).all()
