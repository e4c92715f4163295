"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, 2x2 patch merge, mRoPE (3-D position ids).

The processor resizes each image to a multiple of ``patch * merge`` (``smart_resize``) and
reports the patch grid in ``image_grid_thw``; every image becomes ``t*h*w / merge**2`` copies of
``<|image_pad|>`` between ``<|vision_start|>`` and ``<|vision_end|>``. The vision encoder has no
batch dimension: all images are concatenated into one sequence (``cu_seqlens`` separates them),
with the 2x2 merge windows stored contiguously. Qwen2.5-VL additionally permutes that sequence
into attention windows inside the vision tower (and un-permutes after the merger).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import KIND_IMAGE, KIND_SEPARATOR, FamilyAdapter, ImageLayout
from ..registry import register
from ._common import LayoutRows, call_processor, image_box, per_sample_image_sizes, runs, walked_prompt_positions


def merged_patch_order(grid_h: int, grid_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) on the PRE-merge patch grid of each vision token, in processor (merge-window) order."""
    idx = np.arange(grid_h * grid_w)
    unit, sub = np.divmod(idx, merge * merge)
    mrow, mcol = np.divmod(unit, grid_w // merge)
    drow, dcol = np.divmod(sub, merge)
    return mrow * merge + drow, mcol * merge + dcol


@register
class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)

    # --- modules -------------------------------------------------------------------------
    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.model.visual.blocks

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.visual.merger

    # --- inputs and layout -----------------------------------------------------------------
    def build_inputs(self, processor: Any, images: list[list[Any]], prompts: list[str]) -> Any:
        return call_processor(processor, images, prompts)

    def vision_sequence_order(self, model: nn.Module, grid_thw: torch.Tensor) -> np.ndarray:
        """For each slot of the sequence the vision BLOCKS see, the processor-order token it holds."""
        return np.arange(int(grid_thw.prod(-1).sum()))

    def layouts(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[ImageLayout]:
        cfg = model.config
        vcfg = cfg.vision_config
        merge, patch = int(vcfg.spatial_merge_size), int(vcfg.patch_size)
        grid_thw = inputs["image_grid_thw"].cpu()
        if (grid_thw[:, 0] != 1).any():
            raise ValueError(f"image_grid_thw has temporal size {grid_thw[:, 0].tolist()}; images must have t == 1")
        n_total = sum(len(ims) for ims in images)
        if len(grid_thw) != n_total:
            raise ValueError(f"image_grid_thw describes {len(grid_thw)} images; the batch holds {n_total}")
        tokens_per_image = (grid_thw.prod(-1) // merge**2).tolist()
        seq_order = self.vision_sequence_order(model, inputs["image_grid_thw"])
        starts = np.concatenate([[0], np.cumsum(grid_thw.prod(-1).numpy())])
        sizes = per_sample_image_sizes(images)
        input_ids = inputs["input_ids"].cpu()
        mask = inputs.get("attention_mask")
        ids_np = input_ids.numpy()
        special = {cfg.vision_start_token_id, cfg.vision_end_token_id}

        out, g = [], 0  # g: global image index over the batch (== vision crop index)
        for i in range(len(images)):
            rows = LayoutRows()
            spans = runs(ids_np[i] == cfg.image_token_id)
            if len(spans) != len(images[i]):
                raise ValueError(f"sample {i}: found {len(spans)} <|image_pad|> runs for {len(images[i])} images")
            for j, (lo, hi) in enumerate(spans):
                _, gh, gw = (int(v) for v in grid_thw[g])
                if hi - lo != tokens_per_image[g]:
                    raise ValueError(
                        f"sample {i} image {j}: {hi - lo} image tokens but grid {gh}x{gw} / {merge}^2 = "
                        f"{tokens_per_image[g]}"
                    )
                width, height = sizes[i][j]
                scale = (height / (gh * patch), width / (gw * patch))
                mh, mw = gh // merge, gw // merge
                rows.grid_shapes[(j, 0)] = (mh, mw)
                for k, pos in enumerate(range(lo, hi)):
                    r, c = divmod(k, mw)
                    rows.add(pos, KIND_IMAGE, j, 0, r, c, image_box(r, c, (merge * patch,) * 2, (0, 0), scale))
                for pos in (lo - 1, hi):  # <|vision_start|> / <|vision_end|> frame the block
                    if 0 <= pos < len(ids_np[i]) and int(ids_np[i][pos]) in special:
                        rows.add(pos, KIND_SEPARATOR, j, 0)
                # vision encoder: one token per pre-merge patch; vpos in the order the blocks see
                prow, pcol = merged_patch_order(gh, gw, merge)
                local = seq_order[starts[g] : starts[g + 1]] - starts[g]
                rows.crop_lengths[g] = int(starts[g + 1] - starts[g])
                for vpos, tok in enumerate(local):
                    r, c = int(prow[tok]), int(pcol[tok])
                    rows.add_vision(g, vpos, j, 0, r, c, image_box(r, c, (patch, patch), (0, 0), scale))
                g += 1
            out.append(
                rows.build(
                    input_ids=input_ids[i],
                    attention_mask=None if mask is None else mask[i],
                    question=walked_prompt_positions(processor.tokenizer, inputs, i, cfg.image_token_id, spans),
                    image_sizes=sizes[i],
                )
            )
        return out


def _window_index(model: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's own window permutation of merge units (global over the concatenated images)."""
    visual = model.model.visual
    try:  # transformers >= 5.2x: a free function shared by the Qwen vision towers
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # earlier 5.x: a method of the vision tower
        return visual.get_window_index(grid_thw)[0]
    vcfg = model.config.vision_config
    return get_vision_window_index(
        grid_thw, spatial_merge_size=vcfg.spatial_merge_size, window_size=vcfg.window_size, patch_size=vcfg.patch_size
    )[0]


@register
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Same packing as Qwen2-VL; inside the vision tower the merge units are permuted into
    attention windows, so vision-table ``vpos`` follows that permuted order."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def vision_sequence_order(self, model: nn.Module, grid_thw: torch.Tensor) -> np.ndarray:
        unit = int(model.config.vision_config.spatial_merge_size) ** 2
        windows = _window_index(model, grid_thw.cpu()).cpu().numpy()
        return (windows[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
