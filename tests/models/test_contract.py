"""The model contract: what every supported family must satisfy, on its tiny random-weight model.

One module-scoped model per family (``vtrlab.testing.tiny_families()``) and one padded batch of two
differently sized images with prompts of different lengths. Oracles are the model's own code: the
layout is proven by identity codes (``vtrlab.testing.prove_layout``), attention rows against HF
eager ``output_attentions``, logits and hidden states against the unchanged forward, answers against
``model.generate``. Family-specific checks (module identities, tiling, mRoPE ids, Gemma3's mask
mapping, pixel boxes) stay in ``test_models_<family>.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab
from vtrlab.probes import capture
from vtrlab.reduce import generate_ids
from vtrlab.testing import prove_layout, tiny, tiny_families

TOL = 1e-5
PROMPTS = ["What color is the circle?", "Where?"]


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (64, 48))]


@pytest.fixture(scope="module", params=tiny_families())
def setup(request):
    vlm = tiny(request.param, seed=0)
    vlm.model.set_attn_implementation("sdpa")  # some tiny builders default to eager; capture runs under sdpa
    return vlm, vlm.prepare(_images(), PROMPTS)


def _attn_impls(model) -> list[tuple[object, str | None]]:
    """Every config reachable from the model's modules with its attention implementation."""
    configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    return [(c, getattr(c, "_attn_implementation", None)) for c in configs.values()]


def _hooks(model) -> int:
    """Hooks on the model, less transformers' own output recorders (installed lazily, for good)."""

    def ours(hook) -> bool:
        fn = getattr(hook, "func", hook)
        return not getattr(fn, "__module__", "").startswith("transformers.")

    return sum(
        sum(map(ours, (*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values())))
        for m in model.modules()
    )


def _eager_attentions(vlm, batch) -> list[torch.Tensor]:
    model = vlm.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch.inputs, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    return [a.detach() for a in out.attentions]


def test_modules_match_the_config(setup):
    vlm, _ = setup
    text, vision = vlm.model.config.get_text_config(), vlm.model.config.vision_config
    assert len(vlm.lm_layers) == text.num_hidden_layers
    assert len(vlm.vision_layers) == vision.num_hidden_layers
    assert 0 <= vlm.adapter.vision_feature_layer(vlm.model) < len(vlm.vision_layers)


def test_layout_proven_and_question_positions_spell_the_prompt(setup):
    vlm, batch = setup
    assert prove_layout(vlm, batch) >= sum(int(lay.n_image_tokens) for lay in batch.layouts)
    for i, lay in enumerate(batch.layouts):
        ids = batch.inputs["input_ids"][i][lay.question_positions]
        assert vlm.processor.tokenizer.decode(ids) == PROMPTS[i]
        assert lay.question_positions.min() > lay.positions.max()


def test_decoder_inputs_reproduce_the_model(setup):
    """The decoder run on ``decoder_inputs`` (with the mask exactly as the decoder got it) gives the
    full model's last hidden state and, through the LM head, its logits."""
    vlm, batch = setup
    a, m = vlm.adapter, vlm.model
    dec = a.decoder_inputs(m, batch.inputs)
    n = batch.inputs["input_ids"].shape[1]
    assert dec["inputs_embeds"].shape[:2] == (len(batch), n)
    assert torch.equal(dec["attention_mask"].bool(), batch.inputs["attention_mask"].bool())
    kwargs = {
        "inputs_embeds": dec["inputs_embeds"],
        "position_ids": dec["position_ids"],
        "attention_mask": dec["decoder_mask"],
    }
    with torch.no_grad():
        out = m(**batch.inputs, output_hidden_states=True, use_cache=False)
        hid = a.language_model(m)(**kwargs).last_hidden_state
        logits = a.lm_head(m)(hid)
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(hid[valid], out.hidden_states[-1][valid], rtol=TOL, atol=TOL)
    torch.testing.assert_close(logits[valid], out.logits[valid], rtol=TOL, atol=TOL)


def test_capture_rows_equal_hf_eager(setup):
    vlm, batch = setup
    ref = _eager_attentions(vlm, batch)
    ds = capture(vlm, batch, queries="last", vision=False)
    assert ds.lm_attn.sizes["layer"] == len(vlm.lm_layers) == len(ref)
    for b, lay in enumerate(batch.layouts):
        for li, layer in enumerate(ds.layer.values):
            want = ref[int(layer)][b, :, lay.last_position].numpy()
            np.testing.assert_allclose(ds.lm_attn.values[b, li, :, 0], want, atol=TOL, rtol=0)


def test_capture_leaves_logits_hooks_and_attention_unchanged(setup):
    vlm, batch = setup
    model = vlm.model
    impls, hooks = _attn_impls(model), _hooks(model)
    with torch.no_grad():
        plain = model(**batch.inputs, use_cache=False).logits
    seen = {}
    h = vlm.adapter.lm_head(model).register_forward_hook(lambda m, a, o: seen.setdefault("logits", o.detach()))
    try:
        capture(vlm, batch, queries="all", vision=True, hidden=True)
    finally:
        h.remove()
    assert torch.equal(seen["logits"], plain)
    assert _attn_impls(model) == impls
    assert _hooks(model) == hooks


def test_hooks_and_attention_restored_after_an_exception(setup):
    vlm, batch = setup
    model = vlm.model
    impls, hooks = _attn_impls(model), _hooks(model)

    def boom(*_):
        raise RuntimeError("boom inside the forward")

    h = vlm.lm_layers[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom inside the forward"):
            capture(vlm, batch, queries="last", vision=True, hidden=True)
    finally:
        h.remove()
    assert _attn_impls(model) == impls
    assert _hooks(model) == hooks
    assert vtrlab.probes.attention.current_session() is None


def test_keep_all_answer_equals_generate(setup):
    vlm, batch = setup
    with torch.no_grad():
        out = vlm.model.generate(**dict(batch.inputs), max_new_tokens=4, do_sample=False)
    eos = vlm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    want = []
    for row in out[:, batch.inputs["input_ids"].shape[1] :].tolist():
        want.append(row[: next((i for i, t in enumerate(row) if t in eos), len(row))])
    assert generate_ids(vlm, batch, max_new_tokens=4) == want
