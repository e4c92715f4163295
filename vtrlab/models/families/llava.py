"""LLaVA-1.5 (``LlavaForConditionalGeneration``), and the vtrlab organism, which is one.

One square crop per image (optional pad-to-square, resize, center crop); the projector output of
every patch lands, in raster order, on the image's run of ``<image>`` tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..base import KIND_IMAGE, KIND_SEPARATOR
from ..geometry import AxisMap, boxes_in_original
from ..registry import register
from ._llava_common import ImageBlock, LlavaFamilyAdapter, image_wh, resize_then_crop, vision_rows


def llava_crop_map(image_processor: Any, wh: tuple[int, int]) -> tuple[AxisMap, tuple[int, int]]:
    """Original -> processed pixel map of LLaVA's image processor, and the processed (h, w)."""
    w, h = wh
    amap, hw = AxisMap(), (h, w)
    if getattr(image_processor, "do_pad", False):
        side = max(h, w)
        amap = amap.shift((side - w) // 2, (side - h) // 2)
        hw = (side, side)
    return resize_then_crop(amap, hw, image_processor)


@register
class LlavaAdapter(LlavaFamilyAdapter):
    family = "llava"
    model_types = ("llava",)

    def _image_blocks(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[ImageBlock]:
        patch = model.config.vision_config.patch_size
        pixel_values = inputs["pixel_values"]
        n_cls = self.n_cls(model)
        keep_cls = n_cls and not self.features_drop_cls(model)  # "full": the [CLS] feature is an LM token too
        blocks = []
        flat = [im for imgs in images for im in imgs]
        if pixel_values.shape[0] != len(flat):
            raise RuntimeError(f"processor returned {pixel_values.shape[0]} crops for {len(flat)} images")
        for crop, img in enumerate(flat):
            wh = image_wh(img)
            amap, hw = llava_crop_map(processor.image_processor, wh)
            ph, pw = pixel_values.shape[-2:]
            if tuple(hw) != (ph, pw):
                raise RuntimeError(
                    f"LLaVA geometry predicts a {hw} crop for a {wh} image but the processor made {(ph, pw)}"
                )
            gh, gw = ph // patch, pw // patch
            rows, cols = np.divmod(np.arange(gh * gw), gw)
            patch_boxes = boxes_in_original(amap, rows, cols, patch, patch, wh)
            boxes = patch_boxes
            kind = np.array([KIND_IMAGE] * (gh * gw), dtype=object)
            tile = np.zeros(gh * gw, dtype=int)
            lm_rows, lm_cols = rows, cols
            if keep_cls:
                nan = np.array([np.nan])
                kind = np.concatenate([[KIND_SEPARATOR], kind]).astype(object)
                tile = np.concatenate([[0], tile])
                lm_rows, lm_cols = np.concatenate([[-1], rows]), np.concatenate([[-1], cols])
                boxes = tuple(np.concatenate([nan, b]) for b in boxes)
            blocks.append(
                ImageBlock(
                    kind=kind,
                    tile=tile,
                    row=lm_rows,
                    col=lm_cols,
                    boxes=boxes,
                    grids={0: (gh, gw)},
                    vision=vision_rows(crop, n_cls, 0, rows, cols, patch_boxes),
                    size_wh=wh,
                )
            )
        return blocks
