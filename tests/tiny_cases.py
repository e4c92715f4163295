"""Tiny models and batches shared by test modules in several folders (capture, flow, compose,
TransformerLens, keep-mask tests). A plain module on the tests/ path (tests/conftest.py sits beside it),
so test modules never import each other across folders."""

from __future__ import annotations

import numpy as np
import torch


def _tiny_families() -> list[str]:
    """Every family with a tiny config (``vtrlab.testing``), plus the organism when one is on disk."""
    from vtrlab import testing

    return testing.tiny_families() + (["organism"] if organism_path() is not None else [])


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa"):
    from vtrlab import testing

    return testing.tiny("llava", seed=seed, attn_implementation=attn_implementation)


def tiny_llava_batch(vlm, n: int = 2, padding: str = "left", prompts=("What color is the circle?", "Where?")):
    """``n`` random images with prompts of different lengths: a padded batch (``padding`` side;
    ``prepare`` pads left, a right-padded copy moves every row's tokens to the start)."""
    import dataclasses

    batch = vlm.prepare((_images(0) * n)[:n], [prompts[i % len(prompts)] for i in range(n)])
    if padding == "left":
        return batch
    inputs, layouts = dict(batch.inputs), []
    for b, L in enumerate(batch.layouts):
        off = int(L.valid_positions.min())
        for k in ("input_ids", "attention_mask"):
            inputs[k] = inputs[k].clone()
            inputs[k][b] = torch.roll(batch.inputs[k][b], -off)
        layouts.append(
            dataclasses.replace(
                L,
                positions=L.positions - off,
                valid_positions=L.valid_positions - off,
                question_positions=L.question_positions - off,
            )
        )
    batch.inputs, batch.layouts = inputs, layouts
    return batch


def organism_path():
    """The organism's directory: $VTRLAB_ORGANISM, the bundled one, else the random-init one."""
    import os
    from pathlib import Path

    for cand in (
        os.environ.get("VTRLAB_ORGANISM"),
        Path(__file__).parents[1] / "data/models/organism",
        "/tmp/vtrlab-organism-random",
    ):
        if cand and (Path(cand) / "config.json").exists():
            return Path(cand)
    return None


def organism_vlm():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtrlab.models.registry import adapter_for
    from vtrlab.models.vlm import VLM

    path = organism_path()
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    return VLM(
        model=model, processor=AutoProcessor.from_pretrained(path), adapter=adapter_for("llava"), name="organism"
    )


def organism_batch(vlm, n: int = 2, seed: int = 0):
    from vtrlab.data.synthetic import generate

    samples = generate(n, seed)
    return vlm.prepare([s.image for s in samples], [s.question for s in samples]), samples


def _images(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (64, 48))]


def _build(family: str):
    if family == "organism":
        vlm = organism_vlm()
        return vlm, organism_batch(vlm)[0]
    from vtrlab import testing

    vlm = testing.tiny(family)
    vlm.model.set_attn_implementation("sdpa")  # some tiny builders default to eager; capture runs under sdpa
    # two differently sized images and prompts of different lengths: a padded batch
    return vlm, vlm.prepare(_images(0), ["What color is the circle?", "Where?"])


def reference_logits(vlm, batch, attention_mask=None):
    """The unchanged model's own forward, with ``generate``'s position ids: for 1-D positions the
    count of real tokens (a plain forward counts left pads too, which shifts RoPE by a float-error
    amount), for mRoPE the model's own 3-D ids. ``attention_mask`` overrides the batch's mask."""
    pos = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)["position_ids"]
    if pos.dim() == 2:
        pos = (batch.inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
    inputs = dict(batch.inputs)
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    with torch.no_grad():
        return vlm.model(**inputs, position_ids=pos).logits.float()
