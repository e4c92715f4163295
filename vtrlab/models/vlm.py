"""`VLM`: a Hugging Face model, its processor and the adapter that knows its family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .base import Batch, FamilyAdapter
from .images import as_image


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
        if isinstance(prompts, str):
            prompts = [prompts]
        per_sample = [
            [as_image(x, f"sample {i}, image {j}") for j, x in enumerate(im if isinstance(im, (list, tuple)) else [im])]
            for i, im in enumerate(images)
        ]
        if len(per_sample) != len(prompts):
            raise ValueError(f"got {len(per_sample)} image entries for {len(prompts)} prompts; need one per prompt")
        inputs = self.adapter.build_inputs(self.processor, per_sample, list(prompts))
        layouts = self.adapter.layouts(self.model, self.processor, inputs, per_sample)
        batch = Batch(inputs=inputs, layouts=layouts, images=per_sample, prompts=list(prompts))
        return batch.to(self.device)
