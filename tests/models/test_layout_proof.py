"""The layout is proven, not assumed, for every registered family (tiny random models, CPU).

Each feature row entering the model's own packing code is replaced by a code that names its row;
what lands at each LM position is read back from the decoder's inputs and compared with what the
layout claims (vtrlab.testing.proof). Families register their hook point and expected rows
in vtrlab.testing.
"""

from __future__ import annotations

import numpy as np
import pytest

from vtrlab.testing import tiny, tiny_families
from vtrlab.testing.pixels import gradient_image
from vtrlab.testing.proof import assert_layout_proven

FAMILIES = tiny_families()

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


@pytest.mark.parametrize("case", list(CASES))
def test_layout_proven_by_identity_codes(vlm, case):
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    n_images = [len(im) if isinstance(im, list) else 1 for im in images]
    assert assert_layout_proven(vlm, batch, n_images) > 0
    if case == "padded_batch":  # left padding: the shorter sample starts later, both end at the right edge
        mask = batch.inputs["attention_mask"]
        assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()


@pytest.mark.parametrize("case", ["nonsquare", "padded_batch"])
def test_question_positions_spell_the_prompt(vlm, case):
    images, prompts = CASES[case]
    batch = vlm.prepare(images, prompts)
    tok = vlm.processor.tokenizer
    for i, lay in enumerate(batch.layouts):
        text = tok.decode(batch.inputs["input_ids"][i][lay.question_positions])
        assert " ".join(text.split()).lower() == " ".join(prompts[i].split()).lower()
        assert (np.diff(lay.question_positions) == 1).all()


def test_public_prove_layout_proves_and_catches_a_wrong_layout():
    """``vtrlab.testing.prove_layout`` is what users run on their own checkpoints: it returns the
    number of positions proven and fails, naming the position, when a layout is wrong."""
    from dataclasses import replace

    from vtrlab.testing import prove_layout

    vlm = tiny("llava", seed=0)
    batch = vlm.prepare([gradient_image(48, 48)], ["What is in the picture?"])
    assert prove_layout(vlm, batch) == batch.layouts[0].n_image_tokens
    lay = batch.layouts[0]
    row, col = lay.row.copy(), lay.col.copy()
    img = np.flatnonzero(lay.kind == "image")
    row[img[[0, 1]]], col[img[[0, 1]]] = row[img[[1, 0]]], col[img[[1, 0]]]  # two tokens swap patches
    wrong = replace(batch, layouts=[replace(lay, row=row, col=col)])
    msg = f"2/16 positions hold another feature.*position {lay.image_positions[0]} holds row 0, layout says 1"
    with pytest.raises(AssertionError, match=msg):
        prove_layout(vlm, wrong)
    with pytest.raises(ValueError, match="no tiny builder 'nope'; have: gemma3"):
        tiny("nope")
