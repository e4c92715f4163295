"""The keep-mask answer path on tiny random models of every family.

Oracles: the model's own forward logits and ``model.generate`` (keep all), and for dropped
tokens the model's own forward with those tokens masked out as keys at unchanged positions
(removing a token from the sequence and hiding it from attention are the same computation when
every other token keeps its position id).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_cases import reference_logits as _reference_logits

import vtrlab
from vtrlab.reduce import answer, generate_ids, logits, reduced_decoder_inputs
from vtrlab.testing import tiny, tiny_families

FAMILIES = tiny_families()


def _images(seed):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    vlm = tiny(request.param, seed=0)
    # two prompts of different length, so the batch is padded
    batch = vlm.prepare(_images(0), ["what is in the picture ?", "color ?"])
    return vlm, batch


def _new_tokens(vlm, batch, n):
    out = vlm.model.generate(**dict(batch.inputs), max_new_tokens=n, do_sample=False)
    new = out[:, batch.inputs["input_ids"].shape[1] :].tolist()
    eos = vlm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    res = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        res.append(row[:cut])
    return res


def test_keep_all_logits_equal_model_logits(setup):
    vlm, batch = setup
    ref = _reference_logits(vlm, batch)
    got = logits(vlm, batch, keep=None)
    mask = batch.inputs["attention_mask"].bool()
    src = got.source_positions
    for i in range(len(batch)):
        cols = src[i] >= 0
        assert torch.equal(src[i][cols], torch.nonzero(mask[i]).squeeze(-1))
        diff = (got.logits[i][cols] - ref[i][mask[i]]).abs().max().item()
        assert diff < 1e-4, f"max |logit diff| {diff}"


def test_keep_all_answers_exactly_as_generate(setup):
    vlm, batch = setup
    n = 6
    assert generate_ids(vlm, batch, keep=None, max_new_tokens=n) == _new_tokens(vlm, batch, n)
    all_true = [np.ones(lay.n_image_tokens, dtype=bool) for lay in batch.layouts]
    assert answer(vlm, batch, keep=all_true, max_new_tokens=n) == vtrlab.answer(vlm, batch, max_new_tokens=n)


def test_dropped_tokens_equal_masking_them_at_unchanged_positions(setup):
    vlm, batch = setup
    rng = np.random.default_rng(3)
    keep = [rng.random(lay.n_image_tokens) < 0.4 for lay in batch.layouts]
    red = reduced_decoder_inputs(vlm, batch, keep)
    for i, (lay, k) in enumerate(zip(batch.layouts, keep)):
        assert int(red.attention_mask[i].sum()) == int(batch.inputs["attention_mask"][i].sum()) - int((~k).sum())
        assert not set(lay.image_positions[~k]) & set(red.source_positions[i].tolist())
    got = logits(vlm, batch, keep).last
    # oracle: the unchanged model, dropped image tokens hidden from attention, positions given explicitly
    am = batch.inputs["attention_mask"].clone()
    for i, (lay, k) in enumerate(zip(batch.layouts, keep)):
        am[i, torch.as_tensor(lay.image_positions[~k])] = 0
    ref = _reference_logits(vlm, batch, attention_mask=am)[:, -1]
    assert (got - ref).abs().max().item() < 1e-4


def test_dropping_tokens_changes_the_prediction_inputs(setup):
    vlm, batch = setup
    none = [np.zeros(lay.n_image_tokens, dtype=bool) for lay in batch.layouts]
    a = logits(vlm, batch, None).last
    b = logits(vlm, batch, none).last
    assert (a - b).abs().max().item() > 1e-4  # the image reaches the answer; dropping it is visible
    assert len(answer(vlm, batch, keep=none, max_new_tokens=3)) == len(batch)


def test_teacher_forced_continuation_matches_cached_decoding(setup):
    vlm, batch = setup
    keep = [np.arange(lay.n_image_tokens) % 2 == 0 for lay in batch.layouts]
    ids = generate_ids(vlm, batch, keep, max_new_tokens=4)
    out = logits(vlm, batch, keep, append=[seq if seq else [1] for seq in ids])
    assert torch.allclose(out.appended[:, 0], out.last, atol=1e-5)
    for i, seq in enumerate(ids):
        assert out.appended_mask[i].sum() == max(len(seq), 1)
        assert out.appended[i, : len(seq)].argmax(-1).tolist() == seq


def test_bad_keep_masks_are_rejected_with_clear_errors(setup):
    vlm, batch = setup
    n0 = batch.layouts[0].n_image_tokens
    with pytest.raises(ValueError, match="one per sample"):
        answer(vlm, batch, keep=[np.ones(n0, dtype=bool)])
    with pytest.raises(ValueError, match=f"must be \\({n0},\\)"):
        answer(vlm, batch, keep=[np.ones(n0 + 1, dtype=bool), None])
    with pytest.raises(ValueError, match="dtype float64"):
        answer(vlm, batch, keep=[np.ones(n0), None])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        answer(vlm, batch, max_new_tokens=0)


def test_organism_keep_all_matches_generate_and_logits():
    """The organism itself (the bundled one, or $VTRLAB_ORGANISM)."""
    from vtrlab.data.synthetic import generate

    vlm = vtrlab.load("organism", device="cpu")
    samples = generate(3, 0)
    batch = vlm.prepare([s.image for s in samples], [s.question for s in samples])
    ref = _reference_logits(vlm, batch)
    got = logits(vlm, batch)
    mask = batch.inputs["attention_mask"].bool()
    for i in range(len(batch)):
        assert (got.logits[i][got.source_positions[i] >= 0] - ref[i][mask[i]]).abs().max().item() < 1e-4
    assert generate_ids(vlm, batch, max_new_tokens=5) == _new_tokens(vlm, batch, 5)
