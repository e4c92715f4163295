"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres packing on a
SigLIP tower (no [CLS]), plus two twists the layout follows:

- when the unpadded high-res grid holds more than ``anyres_max_N`` crops' worth of patches
  (by a factor > 1.1), the model shrinks it bilinearly; each LM token then covers a footprint
  of several patches (its box is that footprint);
- in prompts with several images, images are not cut: each is padded to a square, seen as one
  crop (tile 0) and followed by one newline token.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..geometry import AxisMap
from ..registry import register
from ._llava_common import resize_then_crop
from .llava_next import LlavaNextAdapter


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    nested_images = True  # the processor counts images per sample to decide who gets cut

    def _downscale(self, model: nn.Module, hw: tuple[int, int], g: int) -> tuple[int, int]:
        spec = getattr(model.config, "vision_aspect_ratio", None) or "anyres_max_9"
        max_crops = int(spec.strip("anyres_max_"))  # noqa: B005 -- the model parses it this way
        h, w = hw
        ratio = math.sqrt(h * w / (max_crops * g**2))
        if ratio > 1.1:
            return int(h // ratio), int(w // ratio)
        return hw

    def _patched(self, inputs: Any, n_images: int) -> list[bool]:
        per_sample = inputs.get("batch_num_images")
        if per_sample is None:
            return [True] * n_images
        flags = [int(n) == 1 for n in per_sample.tolist() for _ in range(int(n))]
        if len(flags) != n_images:
            raise RuntimeError(f"batch_num_images {per_sample.tolist()} does not cover {n_images} images")
        return flags

    def _single_view_map(self, processor: Any, wh: tuple[int, int]) -> AxisMap:
        w, h = wh
        side = max(w, h)
        amap = AxisMap().shift((side - w) // 2, (side - h) // 2)
        amap, _ = resize_then_crop(amap, (side, side), processor.image_processor)
        return amap
