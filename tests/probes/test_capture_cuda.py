"""Capture on CUDA equals capture on the CPU (skipped without a GPU; run on the device machine with
``pytest tests/probes/test_capture_cuda.py``): the asynchronous paths that only CUDA takes — the device staging
buffer, each group's copy to pinned host memory on the side stream, the Dataset made before the copies land,
the vision gather copied asynchronously — against the synchronous CPU path on the same float32 weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vtrlab.probes import engine
from vtrlab.probes import grouped as G

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(family):
    from vtrlab import testing
    from vtrlab.models.vlm import VLM

    cpu = testing.tiny(family)
    gpu = VLM(model=copy.deepcopy(cpu.model).to("cuda"), processor=cpu.processor, adapter=cpu.adapter, name=cpu.name)
    return cpu, gpu


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("stage_max", [None, 0])  # staging buffer; none (rows copied from a temporary)
@pytest.mark.parametrize("out_max", [None, 1])  # one group; every layer its own group and copy
def test_capture_on_cuda_equals_cpu(monkeypatch, family, stage_max, out_max):
    if stage_max is not None:
        monkeypatch.setattr(engine, "_STAGE_MAX_BYTES", stage_max)
    if out_max is not None:
        monkeypatch.setattr(G, "GROUP_MAX_OUT_BYTES", out_max)
    cpu, gpu = _pair(family)
    imgs = [np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8), np.zeros((64, 48, 3), np.uint8)]
    prompts = ["What color is the circle?", "Where?"]
    for kw in (
        dict(queries="last", vision=True),
        dict(queries="question", vision=True),
        dict(queries="question", vision=False, heads=[0], dtype="float16"),
        dict(queries="last", vision=True, head_mean=True),
    ):
        want = engine.capture(cpu, cpu.prepare(imgs, prompts), **kw)
        for _ in range(2):  # twice: the second call reuses the cached pinned and device blocks
            got = engine.capture(gpu, gpu.prepare(imgs, prompts), **kw)
        assert set(got.data_vars) == set(want.data_vars)
        for name in want.data_vars:
            a, b = got[name].values, want[name].values
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, b, atol=2e-3 if kw.get("dtype") == "float16" else 2e-5, equal_nan=True)
            else:
                assert np.array_equal(a, b)


@pytest.mark.parametrize("plan", ["auto", "splice"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_knockout_and_saliency_on_cuda_equal_cpu(monkeypatch, family, plan):
    """The knocked-out forward (masks through pinned memory, the full cut mask built on the device or the splice's
    host-side mask, the batch check by reference) and saliency (rows' probabilities in layer groups, stacked
    A ⊙ (dO·Vᵀ)) on CUDA equal the CPU's."""
    import vtrlab as vl
    from vtrlab.probes import attention as att

    if plan == "splice":
        monkeypatch.setattr(att, "_FULL_MASK_MAX_ELEMENTS", 0)

    cpu, gpu = _pair(family)
    imgs = [np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)]
    for queries in ("last", "question"):
        want = vl.knockout(cpu, cpu.prepare(imgs, ["What color?"]), keys="image", queries=queries, layers=[0])
        got = vl.knockout(gpu, gpu.prepare(imgs, ["What color?"]), keys="image", queries=queries, layers=[0])
        np.testing.assert_allclose(got["logprobs"].values, want["logprobs"].values, atol=2e-4)
        np.testing.assert_allclose(got["delta"].values, want["delta"].values, atol=2e-4)
        want = vl.saliency(cpu, cpu.prepare(imgs, ["What color?"]), queries=queries)
        got = vl.saliency(gpu, gpu.prepare(imgs, ["What color?"]), queries=queries)
        np.testing.assert_array_equal(got["target"].values, want["target"].values)
        np.testing.assert_allclose(got["attn_grad"].values, want["attn_grad"].values, atol=1e-5, equal_nan=True)
