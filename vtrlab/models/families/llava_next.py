"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): "anyres" tiles with unpadding and newline tokens.

Per image the processor makes a base view (the whole image squashed to one crop) and the crops of
the best grid resolution (aspect kept, padded, cut row-major). The model puts the base view's
patches first (tile 0), then stitches the crops into one grid, removes the rows/cols that show
only padding, and ends every row with the learned ``image_newline`` (tile 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

from ..base import KIND_IMAGE, KIND_NEWLINE, VISION_COLUMNS
from ..geometry import AxisMap, boxes_in_original, size_value
from ..registry import register
from ._llava_common import ImageBlock, LlavaFamilyAdapter, image_wh, resize_then_crop, vision_rows


@dataclass
class AnyresPlan:
    """How one image is cut and packed (all in units of vision patches unless noted)."""

    wh: tuple[int, int]
    g: int  # patches per crop side
    patch: int  # vision patch, pixels
    n_crops: int  # including the base view
    nh: int = 0  # crops down / across the best resolution
    nw: int = 0
    top: int = 0  # stitched-grid rows/cols removed on each side by unpadding
    left: int = 0
    unpad_hw: tuple[int, int] = (0, 0)
    out_hw: tuple[int, int] = (0, 0)  # grid the LM sees (after OneVision's downscale)
    canvas: AxisMap | None = None  # original -> best-resolution canvas pixels


def _unpad(grid_hw: tuple[int, int], hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) kept of a stitched grid for an original (h, w), as transformers' unpad_image."""
    cur_h, cur_w = grid_hw
    h, w = hw
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        pad = (cur_h - new_h) // 2
        return pad, 0, cur_h - 2 * pad, cur_w
    new_w = int(round(w * (cur_h / h), 7))
    pad = (cur_w - new_w) // 2
    return 0, pad, cur_h, cur_w - 2 * pad


@register
class LlavaNextAdapter(LlavaFamilyAdapter):
    family = "llava_next"
    model_types = ("llava_next",)

    # --- what differs between NeXT and OneVision -------------------------------------------
    def _downscale(self, model: nn.Module, hw: tuple[int, int], g: int) -> tuple[int, int]:
        """Grid the LM sees after unpadding (OneVision may shrink it; NeXT keeps it)."""
        return hw

    def _patched(self, inputs: Any, n_images: int) -> list[bool]:
        """Whether each image of the batch is cut into anyres crops (OneVision: single-image samples only)."""
        return [True] * n_images

    def _single_view_map(self, processor: Any, wh: tuple[int, int]) -> AxisMap:
        raise RuntimeError("LLaVA-NeXT always cuts images into anyres crops")

    # --- plan ------------------------------------------------------------------------------
    def _crop_px(self, ip: Any) -> int:
        if ip.crop_size is not None and size_value(ip.crop_size, "height"):
            return size_value(ip.crop_size, "height")
        return size_value(ip.size, "height") or size_value(ip.size, "shortest_edge")

    def _plans(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[AnyresPlan]:
        vc = model.config.vision_config
        g, patch, side = vc.image_size // vc.patch_size, vc.patch_size, vc.image_size
        pinpoints = model.config.image_grid_pinpoints
        flat = [im for imgs in images for im in imgs]
        sizes = inputs["image_sizes"].tolist()
        plans = []
        for img, (h, w), patched in zip(flat, sizes, self._patched(inputs, len(flat))):
            wh = image_wh(img)
            if (w, h) != wh:
                raise RuntimeError(f"processor reports image size {(w, h)} for a {wh} image")
            if not patched:
                plans.append(AnyresPlan(wh=wh, g=g, patch=patch, n_crops=1))
                continue
            bh, bw = select_best_resolution((h, w), pinpoints)
            nh, nw = bh // side, bw // side
            rh, rw = get_patch_output_size(
                np.broadcast_to(np.zeros(1, np.uint8), (3, h, w)), (bh, bw), "channels_first"
            )
            canvas = AxisMap().resize((h, w), (rh, rw)).shift((bw - rw) // 2, (bh - rh) // 2)
            top, left, uh, uw = _unpad((nh * g, nw * g), (h, w))
            out = self._downscale(model, (uh, uw), g)
            n_crops = 1 + len(range(0, bh, side)) * len(range(0, bw, side))
            plans.append(AnyresPlan(wh, g, patch, n_crops, nh, nw, top, left, (uh, uw), out, canvas))
        return plans

    def _check_crop_pipeline(self, processor: Any, model: nn.Module) -> None:
        """Crops must reach the vision tower unchanged (true for the released checkpoints): a
        crop's pixels then map 1:1 onto the stitched grid."""
        ip, side = processor.image_processor, model.config.vision_config.image_size
        crop_px = self._crop_px(ip)
        amap, hw = resize_then_crop(AxisMap(), (crop_px, crop_px), ip)
        if hw != (side, side) or amap != AxisMap():
            raise NotImplementedError(
                f"{self.family}: crops of {crop_px}px become {hw} after resize/crop (vision image_size {side}); "
                "vtrlab supports anyres processors whose crops reach the vision tower unchanged"
            )

    def crop_counts(self, model: nn.Module, inputs: Any, n_images: int) -> list[int]:
        """Crops the model keeps per image (as in its get_image_features)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        side = model.config.vision_config.image_size
        return [
            image_size_to_num_patches(s, model.config.image_grid_pinpoints, side) if p else 1
            for s, p in zip(inputs["image_sizes"].tolist(), self._patched(inputs, n_images))
        ]

    def vision_crops(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        pv = inputs["pixel_values"]
        if pv.dim() == 4:
            return pv
        counts = self.crop_counts(model, inputs, pv.shape[0])
        return torch.cat([p[:n] for p, n in zip(pv, counts)], dim=0)

    # --- blocks ----------------------------------------------------------------------------
    def _image_blocks(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[ImageBlock]:
        if self.select_strategy(model) == "full" and self.has_cls(model):
            raise NotImplementedError(
                f"{self.family} with a [CLS] vision tower needs vision_feature_select_strategy='default'"
            )
        self._check_crop_pipeline(processor, model)
        ip = processor.image_processor
        n_cls = self.n_cls(model)
        side = model.config.vision_config.image_size
        blocks, crop0 = [], 0
        for plan in self._plans(model, processor, inputs, images):
            g, p = plan.g, plan.patch
            rows, cols = np.divmod(np.arange(g * g), g)
            # tile 0: the whole image squashed (or padded to a square) into one crop
            if plan.n_crops == 1:
                base_map = self._single_view_map(processor, plan.wh)
            else:
                sq = (size_value(ip.size, "height"), size_value(ip.size, "width"))
                if not sq[0]:
                    sq = (size_value(ip.size, "shortest_edge"),) * 2
                base_map, hw = resize_then_crop(AxisMap().resize(plan.wh[::-1], sq), sq, ip)
                if hw != (side, side):
                    raise RuntimeError(f"base view is {hw}, vision tower expects {(side, side)}")
            base_boxes = boxes_in_original(base_map, rows, cols, p, p, plan.wh)
            vis = [vision_rows(crop0, n_cls, 0, rows, cols, base_boxes)]
            kind = [np.array([KIND_IMAGE] * (g * g), dtype=object)]
            tile, r_out, c_out = [np.zeros(g * g, int)], [rows], [cols]
            boxes = [base_boxes]
            grids = {0: (g, g)}
            if plan.n_crops == 1:  # OneVision multi-image: base view + one newline
                kind.append(np.array([KIND_NEWLINE], dtype=object))
                tile.append(np.zeros(1, int))
                r_out.append(np.array([-1]))
                c_out.append(np.array([-1]))
                boxes.append(tuple(np.full(1, np.nan) for _ in range(4)))
            else:
                oh, ow = plan.out_hw
                uh, uw = plan.unpad_hw
                R, C = np.divmod(np.arange(oh * ow), ow)
                # footprint of an output cell in stitched-grid cells (1x1 unless downscaled); a sliver of an image
                # (e.g. 8 x 97 px) can unpad to no column at all: its rows are newlines only
                fh, fw = (uh / oh if oh else 1.0), (uw / ow if ow else 1.0)
                cell_map = plan.canvas.shift(-plan.left * p, -plan.top * p)
                hb = boxes_in_original(cell_map, R, C, p * fh, p * fw, plan.wh)
                per_row = ow + 1
                k = np.full(oh * per_row, KIND_IMAGE, dtype=object)
                k[ow::per_row] = KIND_NEWLINE
                img_idx = np.flatnonzero(k == KIND_IMAGE)
                rr, cc = np.full(len(k), -1), np.full(len(k), -1)
                rr[img_idx], cc[img_idx] = R, C
                bx = tuple(np.full(len(k), np.nan) for _ in range(4))
                for dst, src in zip(bx, hb):
                    dst[img_idx] = src
                kind.append(k)
                tile.append(np.ones(len(k), int))
                r_out.append(rr)
                c_out.append(cc)
                boxes.append(bx)
                grids[1] = (oh, ow)
                exact = (oh, ow) == (uh, uw)
                for ci in range(plan.n_crops - 1):
                    cr, cc_ = divmod(ci, plan.nw)
                    SR, SC = cr * g + rows, cc_ * g + cols  # stitched-grid cell of every patch
                    cb = boxes_in_original(plan.canvas, SR, SC, p, p, plan.wh)
                    lr, lc = SR - plan.top, SC - plan.left
                    inside = exact & (lr >= 0) & (lr < uh) & (lc >= 0) & (lc < uw)
                    vis.append(
                        vision_rows(crop0 + 1 + ci, n_cls, 1, np.where(inside, lr, -1), np.where(inside, lc, -1), cb)
                    )
            blocks.append(
                ImageBlock(
                    kind=np.concatenate(kind),
                    tile=np.concatenate(tile),
                    row=np.concatenate(r_out),
                    col=np.concatenate(c_out),
                    boxes=tuple(np.concatenate([b[i] for b in boxes]) for i in range(4)),
                    grids=grids,
                    vision=pd.concat(vis, ignore_index=True)[list(VISION_COLUMNS)],
                    size_wh=plan.wh,
                )
            )
            crop0 += plan.n_crops
        return blocks
