"""Idefics3 and SmolVLM: image splitting into square crops + a global view, pixel shuffle.

The image processor (1) resizes the longest edge to ``size["longest_edge"]`` (upscaling too),
(2) resizes each side UP to a multiple of ``max_image_size["longest_edge"]`` (M) independently,
so the aspect ratio is slightly distorted, (3) cuts that into rows x cols crops of M x M in
raster order and (4) appends the whole image squashed to M x M (the global view) LAST. When the
image fits one crop, only the global view exists. Each view becomes ``image_seq_len`` ``<image>``
tokens after the connector's pixel shuffle (space-to-depth by ``scale_factor``). The text is
``<fake_token_around_image><row_i_col_j><image>*N`` per crop, ``\\n`` after each crop row, then
``\\n<fake_token_around_image><global-img><image>*N<fake_token_around_image>``.

Tile numbering is by view, not by sequence order: tile 0 = the global view, tiles 1..rows*cols
are the crops in raster order (so tile 0 sits LAST in the sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..base import KIND_IMAGE, KIND_SEPARATOR, FamilyAdapter, ImageLayout
from ..registry import register
from ._common import LayoutRows, call_processor, image_box, per_sample_image_sizes, runs, walked_prompt_positions


def _size_value(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


@register
class Idefics3Adapter(FamilyAdapter):
    family = "idefics3"
    model_types = ("idefics3",)

    # --- modules -------------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.text_model

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.model.vision_model.encoder.layers

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.connector

    # --- inputs and layout -----------------------------------------------------------------
    def build_inputs(self, processor: Any, images: list[list[Any]], prompts: list[str]) -> Any:
        return call_processor(processor, images, prompts)

    def _fake_token_id(self, processor: Any) -> int:
        return int(processor.tokenizer.convert_tokens_to_ids(processor.fake_image_token))

    def _split_grid(self, processor: Any, images: list[list[Any]]) -> tuple[list[list[int]], list[list[int]]]:
        """(rows, cols) of crops per image, straight from the image processor (0, 0 = not split)."""
        info = processor.image_processor(images, return_row_col_info=True)
        return info["rows"], info["cols"]

    def layouts(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[ImageLayout]:
        cfg = model.config
        patch = int(cfg.vision_config.patch_size)
        shuffle = int(cfg.scale_factor)
        crop_px = int(_size_value(processor.image_processor.max_image_size, "longest_edge"))
        if crop_px != int(cfg.vision_config.image_size):
            raise ValueError(
                f"processor crops are {crop_px} px but the vision encoder expects {cfg.vision_config.image_size} px"
            )
        side = crop_px // patch // shuffle  # merged grid side of one view
        seq_len_view = int(processor.image_seq_len)
        if side * side != seq_len_view:
            raise ValueError(f"processor.image_seq_len={seq_len_view} but the model packs {side}x{side} per view")
        image_id, fake_id = int(cfg.image_token_id), self._fake_token_id(processor)
        grid_rows, grid_cols = self._split_grid(processor, images)
        sizes = per_sample_image_sizes(images)
        input_ids = inputs["input_ids"].cpu()
        ids_np = input_ids.numpy()
        mask = inputs.get("attention_mask")
        n_views = inputs["pixel_values"].shape[1]

        out, crop_base = [], 0  # crop: index over the model's vision batch (padding views dropped)
        for i in range(len(images)):
            rows = LayoutRows()
            spans = runs(ids_np[i] == image_id)
            views_per_image = [r * c + 1 if r * c else 1 for r, c in zip(grid_rows[i], grid_cols[i])]
            if len(spans) != sum(views_per_image) or any(hi - lo != seq_len_view for lo, hi in spans):
                raise ValueError(
                    f"sample {i}: found <image> runs of lengths {[hi - lo for lo, hi in spans]}; expected "
                    f"{sum(views_per_image)} runs of {seq_len_view} for crop grids "
                    f"{list(zip(grid_rows[i], grid_cols[i]))}"
                )
            if sum(views_per_image) > n_views:
                raise ValueError(f"sample {i} has {sum(views_per_image)} views but pixel_values holds {n_views}")
            blocks, v = [], 0
            for j, (n_r, n_c) in enumerate(zip(grid_rows[i], grid_cols[i])):
                width, height = sizes[i][j]
                img_spans = spans[v : v + views_per_image[j]]
                v += views_per_image[j]
                # Views in sequence order: crops in raster order, the global view last.
                n_crops = n_r * n_c
                view_tiles = list(range(1, n_crops + 1)) + [0]
                resized_hw = (n_r * crop_px, n_c * crop_px) if n_crops else (crop_px, crop_px)
                for (lo, hi), tile in zip(img_spans, view_tiles):
                    if tile == 0:  # the whole image squashed to one crop
                        offset, scale = (0, 0), (height / crop_px, width / crop_px)
                    else:
                        cr, cc = divmod(tile - 1, n_c)
                        offset = (cr * crop_px, cc * crop_px)
                        scale = (height / resized_hw[0], width / resized_hw[1])
                    rows.grid_shapes[(j, tile)] = (side, side)
                    cell = (patch * shuffle,) * 2
                    for k, pos in enumerate(range(lo, hi)):
                        r, c = divmod(k, side)
                        rows.add(pos, KIND_IMAGE, j, tile, r, c, image_box(r, c, cell, offset, scale))
                    # vision encoder: the view's patch grid in raster order; crop index follows
                    # pixel_values order (= sequence order: crops, then global)
                    crop = crop_base + (tile - 1 if tile else n_crops)
                    n_p = crop_px // patch
                    for vpos in range(n_p * n_p):
                        r, c = divmod(vpos, n_p)
                        rows.add_vision(crop, vpos, j, tile, r, c, image_box(r, c, (patch, patch), offset, scale))
                crop_base += n_crops + 1
                # the block runs from the <fake_token_around_image> before the first view to the one
                # after the global view; every non-<image> token inside covers no patch
                lo_block = img_spans[0][0] - 1
                while lo_block >= 0 and ids_np[i][lo_block] != fake_id:
                    lo_block -= 1
                hi_block = img_spans[-1][1]
                if lo_block < 0 or hi_block >= len(ids_np[i]) or ids_np[i][hi_block] != fake_id:
                    raise ValueError(f"sample {i} image {j}: image block is not framed by <fake_token_around_image>")
                starts = [lo for lo, _ in img_spans]
                for pos in range(lo_block, hi_block + 1):
                    if ids_np[i][pos] != image_id:
                        # a separator belongs to the view it introduces (the closing one to the global view)
                        nxt = next((t for s, t in zip(starts, view_tiles) if s > pos), 0)
                        rows.add(pos, KIND_SEPARATOR, j, nxt)
                blocks.append((lo_block, hi_block + 1))
            out.append(
                rows.build(
                    input_ids=input_ids[i],
                    attention_mask=None if mask is None else mask[i],
                    question=walked_prompt_positions(processor.tokenizer, inputs, i, image_id, blocks),
                    image_sizes=sizes[i],
                )
            )
        return out


@register
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM packs images exactly like Idefics3 (same splitting, pixel shuffle and prompt string)."""

    family = "smolvlm"
    model_types = ("smolvlm",)
