"""vtrlab.capture rows equal TransformerLens TransformerBridge `hook_pattern` rows (LLaVA, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.probes import capture


def _bridge(path):
    """Boot TransformerLens' bridge from a local LLaVA directory (no hub access)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(path)
    # the bridge switches its model to eager and wraps modules: give it its own copy
    hf = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return TransformerBridge.boot_transformers(str(path), hf_model=hf, tokenizer=tokenizer, device="cpu")


def _cases():
    from tiny_cases import organism_path

    cases = ["tiny-llava"]
    if organism_path() is not None:
        cases.append("organism")
    return cases


@pytest.fixture(scope="module", params=_cases())
def setup(request, tmp_path_factory, monkeypatch_module):
    from tiny_cases import _images, organism_batch, organism_path, organism_vlm

    if request.param == "organism":
        vlm = organism_vlm()
        batch, _ = organism_batch(vlm)
        path = organism_path()
    else:
        from vtrlab import testing

        vlm = testing.tiny("llava")
        batch = vlm.prepare(_images(0), ["What color is the circle?", "Where?"])
        path = tmp_path_factory.mktemp("tiny-llava")
        vlm.model.save_pretrained(path)
        vlm.processor.tokenizer.save_pretrained(path)
    return vlm, batch, _bridge(path)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    # When a directory holds no full processor, TransformerLens' boot tries to *pip install
    # torchvision* into the running interpreter (and so replaces the CPU torch with a CUDA build).
    # The bridge needs no processor here: refuse the install.
    from transformer_lens.model_bridge.sources.transformers import helpers

    mp.setattr(helpers, "_ensure_torchvision", lambda: False)
    yield mp
    mp.undo()


def test_lm_rows_equal_hook_pattern(setup):
    vlm, batch, bridge = setup
    inputs = batch.inputs
    _, cache = bridge.run_with_cache(
        inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        attention_mask=inputs["attention_mask"],
        names_filter=lambda name: name.endswith("hook_pattern"),
    )
    ds = capture(vlm, batch, queries="question", vision=True)
    for li in range(len(vlm.lm_layers)):
        pattern = cache[f"blocks.{li}.attn.hook_pattern"]  # (B, H, N, N)
        for b, L in enumerate(batch.layouts):
            q = np.asarray(L.question_positions)
            np.testing.assert_allclose(ds.lm_attn.values[b, li, :, : len(q)], pattern[b][:, q].numpy(), atol=1e-5)
    for li in range(len(vlm.vision_layers)):
        pattern = cache[f"vision_encoder.encoder_layers.{li}.attn.hook_pattern"]  # (crops, H, S, S)
        for b, L in enumerate(batch.layouts):
            t = L.vision.reset_index(drop=True)
            cls = int(t.loc[t["kind"] == "cls", "vpos"].iloc[0])
            crop, vpos = (torch.as_tensor(t[c].to_numpy().copy()) for c in ("crop", "vpos"))
            np.testing.assert_allclose(
                ds.vision_attn.values[b, li, :, : len(t)], pattern[crop, :, cls, vpos].T.numpy(), atol=1e-5
            )
