"""Public test helpers (like ``torch.testing``): models without downloads and the layout proof.

* :func:`tiny` — a tiny random-weight model of every supported family, with its processor, offline;
* :func:`full_size` — real shapes with random weights (GPU benchmarks), built without downloads;
* :func:`prove_layout` — check, on your own checkpoint and inputs, that every LM position holds
  what the layout says it holds (features that name themselves are routed through the model's own
  packing code).

Nothing in the runtime packages imports this one.
"""

from __future__ import annotations

import torch

from vtrlab.models.registry import adapter_for
from vtrlab.models.vlm import VLM

from .registry import FULL_SIZE, PROOF, TINY


def tiny_families() -> list[str]:
    """Families with a tiny builder (``tiny(family)``)."""
    return TINY.names()


def full_size_names() -> list[str]:
    """Names accepted by ``full_size(name)``."""
    return FULL_SIZE.names()


def tiny(family: str, seed: int = 0, attn_implementation: str = "sdpa") -> VLM:
    """A tiny random-weight model of ``family`` with its processor, built offline (float32, eval, CPU).

    Runs under ``attn_implementation`` (sdpa by default, as ``vtrlab.load`` does)::

        vlm = vtrlab.testing.tiny("llava")
        batch = vlm.prepare([image], ["what is it ?"])
    """
    model, processor = TINY[family](seed)
    model.set_attn_implementation(attn_implementation)
    model.eval()
    return VLM(model=model, processor=processor, adapter=adapter_for(model.config.model_type), name=f"tiny-{family}")


def full_size(name: str, dtype: str | torch.dtype = "bfloat16", device: str = "cuda") -> VLM:
    """A full-size model (real shapes, random weights) built in one call without downloads."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model, processor = FULL_SIZE[name](dtype, device)
    model.eval()
    return VLM(model=model, processor=processor, adapter=adapter_for(model.config.model_type), name=name)


def _built(scheme: str, name: str, names: list[str]) -> None:
    if name not in names:
        accepted = ", ".join(f"{scheme}:{n}" for n in names)
        raise ValueError(f"model='{scheme}:{name}': no such model; accepted: {accepted}")


def load_tiny(name: str, *, device, dtype=None, attn_implementation: str = "sdpa") -> VLM:
    """``vtrlab.load("tiny:<family>")``: :func:`tiny` on ``device`` (float32 unless ``dtype`` is given)."""
    _built("tiny", name, tiny_families())
    vlm = tiny(name, attn_implementation=attn_implementation)
    vlm.model.to(device=device, dtype=dtype or torch.float32)
    return vlm


def load_full_size(name: str, *, device, dtype=None, attn_implementation: str = "sdpa") -> VLM:
    """``vtrlab.load("full_size:<name>")``: :func:`full_size` on ``device`` (bfloat16 on a GPU, float32 on the
    CPU unless ``dtype`` is given)."""
    _built("full_size", name, full_size_names())
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    vlm = full_size(name, dtype=dtype, device=str(device))
    vlm.model.set_attn_implementation(attn_implementation)
    return vlm


def proof_spec(family: str):
    """The family's layout-proof spec (see ``vtrlab.testing.registry``)."""
    return PROOF[family]


def prove_layout(vlm: VLM, batch) -> int:
    """Prove ``batch``'s layouts on ``vlm``: returns the number of image positions checked, or raises
    ``AssertionError`` naming the first sample and position whose content differs from the layout.

    Every feature row entering the projector's packing is replaced by a code that names it; the
    decoder's ``inputs_embeds`` are read back and decoded. The proof checks that the processor's image
    placeholders are exactly the layout's image (+ newline) positions, that each image position holds
    the feature row the layout names (and no feature lands elsewhere), newline tokens hold the
    model's ``image_newline``, and the layout's bookkeeping (sequence length, valid and question
    positions, one token per grid cell). Works on any checkpoint of a supported family — run it on
    your own model and inputs before trusting positions::

        import vtrlab as vl
        from vtrlab.testing import prove_layout

        vlm = vl.load("/path/to/llava-1.5-7b-hf", device="cuda")
        batch = vlm.prepare(images=[img_a, [img_b, img_c]], prompts=["What is it?", "Compare them."])
        n = prove_layout(vlm, batch)     # e.g. 1728 image positions proven
    """
    from .proof import assert_layout_proven

    return assert_layout_proven(vlm, batch)


__all__ = [
    "tiny",
    "full_size",
    "load_tiny",
    "load_full_size",
    "tiny_families",
    "full_size_names",
    "proof_spec",
    "prove_layout",
]
