"""`VLM`: a Hugging Face model, its processor and the adapter that knows its family."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .base import Batch, FamilyAdapter
from .images import ACCEPTED, as_image


def _is_single_image(obj: Any) -> bool:
    return isinstance(obj, (str, Path, Image.Image, np.ndarray)) or (hasattr(obj, "detach") and hasattr(obj, "cpu"))


def _check_prepare_args(images: Any, prompts: Any) -> tuple[list[list[Image.Image]], list[str]]:
    """(images per sample, prompts) checked: one entry per prompt, every prompt a string."""
    if isinstance(prompts, str):
        prompts = [prompts]
        if _is_single_image(images):
            images = [images]  # prepare(img, "question"): one sample
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(f"prompts must be a list of strings (one per sample), got {type(prompts).__name__}")
    if _is_single_image(images) or not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a list with one entry per prompt (an image or a list of images), "
            f"got {type(images).__name__}"
        )
    if len(prompts) == 0:
        raise ValueError("prepare needs at least one sample: got 0 prompts and 0 images")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} must be a string, got {prompt!r} ({type(prompt).__name__})")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} image entries for {len(prompts)} prompts; need one per prompt")
    per_sample = []
    for i, entry in enumerate(images):
        group = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not group:
            raise ValueError(f"sample {i} has no image (an empty list); accepted: {ACCEPTED}")
        per_sample.append([as_image(x, f"sample {i}, image {j}") for j, x in enumerate(group)])
    return per_sample, list(prompts)


@dataclass
class VLM:
    model: nn.Module
    processor: Any
    adapter: FamilyAdapter
    name: str = ""

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def lm_layers(self) -> Sequence[nn.Module]:
        return self.adapter.lm_layers(self.model)

    @property
    def vision_layers(self) -> Sequence[nn.Module]:
        return self.adapter.vision_layers(self.model)

    @property
    def has_cls(self) -> bool:
        return self.adapter.has_cls(self.model)

    def prepare(self, images: Sequence[Any], prompts: Sequence[str]) -> Batch:
        """Build model inputs with the model's own processor and chat template.

        ``images[i]`` is one image or a list of them (several images in one prompt); an image is a
        PIL image, an H×W×3 array or a path to an image file (a bad one is named in the error);
        ``prompts[i]`` is the user's text for sample i.
        """
        per_sample, prompts = _check_prepare_args(images, prompts)
        inputs = self.adapter.build_inputs(self.processor, per_sample, list(prompts))
        layouts = self.adapter.layouts(self.model, self.processor, inputs, per_sample)
        batch = Batch(inputs=inputs, layouts=layouts, images=per_sample, prompts=list(prompts))
        return batch.to(self.device)
