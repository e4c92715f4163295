"""Test models without downloads: tiny random-weight models of every family, full-size shapes
with random weights for GPU benchmarks, and the hooks the layout proof needs."""

from __future__ import annotations

import torch

from vtrlab.models.registry import adapter_for
from vtrlab.models.vlm import VLM
from .registry import FULL_SIZE, PROOF, TINY, discover


def tiny_families() -> list[str]:
    discover()
    return sorted(TINY)


def full_size_names() -> list[str]:
    discover()
    return sorted(FULL_SIZE)


def tiny(family: str, seed: int = 0, attn_implementation: str = "sdpa") -> VLM:
    """A tiny random-weight model of ``family`` with its processor, built offline (float32, eval, CPU).

    Runs under ``attn_implementation`` (sdpa by default, as ``vtrlab.load`` does).
    """
    discover()
    if family not in TINY:
        raise ValueError(f"no tiny builder for family {family!r}; have: {', '.join(sorted(TINY))}")
    model, processor = TINY[family](seed)
    model.set_attn_implementation(attn_implementation)
    model.eval()
    return VLM(model=model, processor=processor, adapter=adapter_for(model.config.model_type), name=f"tiny-{family}")


def full_size(name: str, dtype: str | torch.dtype = "bfloat16", device: str = "cuda") -> VLM:
    """A full-size model (real shapes, random weights) built in one call without downloads."""
    discover()
    if name not in FULL_SIZE:
        raise ValueError(f"no full-size builder {name!r}; have: {', '.join(sorted(FULL_SIZE))}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model, processor = FULL_SIZE[name](dtype, device)
    model.eval()
    return VLM(model=model, processor=processor, adapter=adapter_for(model.config.model_type), name=name)


def proof_spec(family: str):
    discover()
    if family not in PROOF:
        raise ValueError(f"no layout-proof spec for family {family!r}; have: {', '.join(sorted(PROOF))}")
    return PROOF[family]


__all__ = ["tiny", "full_size", "tiny_families", "full_size_names", "proof_spec"]
