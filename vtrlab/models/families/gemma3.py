"""Gemma 3: one fixed-size square view per image, average-pooled to ``mm_tokens_per_image``.

The image processor squashes every image to ``size`` (896 x 896 in the checkpoints; aspect ratio
NOT kept); SigLIP sees (896/14)^2 = 4096 patches; the projector average-pools them to a
sqrt(mm_tokens_per_image)-a-side grid (16 x 16 = 256 tokens, each covering 4 x 4 patches). In the
text every ``<start_of_image>`` becomes ``\\n\\n<start_of_image><image_soft_token>*256<end_of_image>\\n\\n``;
``<start_of_image>``/``<end_of_image>`` are the block's separators. Pan & scan (extra crops) is off
by default in the processor; batches built with it are refused rather than mislabelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..base import KIND_IMAGE, KIND_SEPARATOR, FamilyAdapter, ImageLayout
from ..registry import register
from ._common import (
    LayoutRows,
    call_processor,
    image_box,
    per_sample_image_sizes,
    question_positions,
    runs,
    stashed_prompts,
)


@register
class Gemma3Adapter(FamilyAdapter):
    family = "gemma3"
    model_types = ("gemma3",)

    # --- modules -------------------------------------------------------------------------
    def vision_encoder(self, model: nn.Module) -> nn.Module:
        """The SigLIP module holding embeddings / encoder / post_layernorm (transformers releases
        differ on whether ``SiglipVisionModel`` wraps it in ``.vision_model``)."""
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.vision_encoder(model).encoder.layers

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    # --- inputs and layout -----------------------------------------------------------------
    def build_inputs(self, processor: Any, images: list[list[Any]], prompts: list[str]) -> Any:
        return call_processor(processor, images, prompts)

    def layouts(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[ImageLayout]:
        cfg = model.config
        patch = int(cfg.vision_config.patch_size)
        n_tokens = int(cfg.mm_tokens_per_image)
        side = math.isqrt(n_tokens)
        view_h, view_w = (int(v) for v in inputs["pixel_values"].shape[-2:])
        n_patch = view_h // patch
        if side * side != n_tokens or n_patch % side or view_h != view_w:
            raise ValueError(
                f"mm_tokens_per_image={n_tokens} on a {view_h}x{view_w} view with {patch} px patches "
                "does not pool evenly"
            )
        n_all = sum(len(ims) for ims in images)
        if inputs["pixel_values"].shape[0] != n_all:
            raise ValueError(
                f"pixel_values holds {inputs['pixel_values'].shape[0]} views for {n_all} images: pan & scan crops "
                "are not supported (call the processor with do_pan_and_scan=False, its default)"
            )
        pool = n_patch // side  # patches per pooled token, per axis
        image_id, boi_id, eoi_id = int(cfg.image_token_id), int(cfg.boi_token_id), int(cfg.eoi_token_id)
        sizes = per_sample_image_sizes(images)
        input_ids = inputs["input_ids"].cpu()
        ids_np = input_ids.numpy()
        mask = inputs.get("attention_mask")
        prompts = stashed_prompts(inputs, len(images))

        out, crop = [], 0
        for i in range(len(images)):
            rows = LayoutRows()
            spans = runs(ids_np[i] == image_id)
            if len(spans) != len(images[i]) or any(hi - lo != n_tokens for lo, hi in spans):
                raise ValueError(
                    f"sample {i}: found image-token runs of lengths {[hi - lo for lo, hi in spans]} for "
                    f"{len(images[i])} images of {n_tokens} tokens"
                )
            for j, (lo, hi) in enumerate(spans):
                width, height = sizes[i][j]
                scale = (height / view_h, width / view_w)
                rows.grid_shapes[(j, 0)] = (side, side)
                for k, pos in enumerate(range(lo, hi)):
                    r, c = divmod(k, side)
                    rows.add(pos, KIND_IMAGE, j, 0, r, c, image_box(r, c, (pool * patch,) * 2, (0, 0), scale))
                for pos, tid in ((lo - 1, boi_id), (hi, eoi_id)):
                    if not (0 <= pos < len(ids_np[i]) and ids_np[i][pos] == tid):
                        raise ValueError(f"sample {i} image {j}: image tokens are not framed by boi/eoi")
                    rows.add(pos, KIND_SEPARATOR, j, 0)
                for vpos in range(n_patch * n_patch):
                    r, c = divmod(vpos, n_patch)
                    rows.add_vision(crop, vpos, j, 0, r, c, image_box(r, c, (patch, patch), (0, 0), scale))
                crop += 1
            # The expansion adds "\n\n" around each block, which a real tokenizer may merge with the
            # neighbouring text; the prompt is found by its own tokens after the last block.
            question = question_positions(processor.tokenizer, ids_np[i], prompts[i], spans[-1][1])
            out.append(
                rows.build(
                    input_ids=input_ids[i],
                    attention_mask=None if mask is None else mask[i],
                    question=question,
                    image_sizes=sizes[i],
                )
            )
        return out
