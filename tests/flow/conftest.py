"""Tiny float64 models of every family, each with a padded batch of two samples of different sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vtrlab.testing import tiny, tiny_families


def _images(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)),
    ]


def tiny64(family: str):
    vlm = tiny(family)
    vlm.model.set_attn_implementation("sdpa")
    vlm.model.to(torch.float64)
    batch = vlm.prepare(_images(0), ["What color is the circle?", "Where?"])
    batch.inputs = {
        k: (v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in dict(batch.inputs).items()
    }
    return vlm, batch


@pytest.fixture(scope="module", params=tiny_families())
def tiny_f64(request):
    return tiny64(request.param)


@pytest.fixture(scope="module")
def llava_f64():
    return tiny64("llava")
