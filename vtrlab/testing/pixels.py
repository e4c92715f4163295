"""Pixel-level proof of the layout's boxes: with gradient images (R encodes x, G encodes y, B = 255),
each vision patch of ``pixel_values`` tells which original pixels it shows; the box the layout gives
that patch must be centred on them. Padding shows up as B far from 255."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def gradient_image(w: int, h: int) -> Image.Image:
    x = (np.arange(w) + 0.5) / w
    y = (np.arange(h) + 0.5) / h
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.round(255 * x)[None, :]
    arr[..., 1] = np.round(255 * y)[:, None]
    arr[..., 2] = 255
    return Image.fromarray(arr)


def _denormalize(crops: torch.Tensor, image_processor) -> torch.Tensor:
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(1, -1, 1, 1)
    x = crops.detach().cpu().double()
    if getattr(image_processor, "do_normalize", True):
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / image_processor.rescale_factor
    return x  # 0..255


def check_pixel_boxes(vlm, batch, patch: int) -> int:
    """Assert every vision patch's box against the gradient pixels it shows; returns how many
    full (unclipped) boxes were checked. Needs ``adapter.vision_crops`` (LLaVA families)."""
    crops = _denormalize(vlm.adapter.vision_crops(vlm.model, batch.inputs), vlm.processor.image_processor)
    gw = crops.shape[-1] // patch
    checked = 0
    for i, lay in enumerate(batch.layouts):
        vis = lay.vision_table()
        vis = vis[vis["kind"] == "patch"]
        n_cls = int((lay.vision_table()["kind"] == "cls").sum() // max(1, vis["crop"].nunique()))
        area = (vis["x1"] - vis["x0"]) * (vis["y1"] - vis["y0"])
        full_area = area.groupby(vis["crop"]).transform("max")
        for rec, frac in zip(vis.itertuples(), (area / full_area).to_numpy()):
            r, c = divmod(int(rec.vpos) - n_cls, gw)
            pix = crops[int(rec.crop), :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
            w, h = lay.image_sizes[int(rec.image)]
            blue = float(pix[2].max())
            if np.isnan(rec.x0):
                assert blue < 230, f"sample {i}: crop {rec.crop} patch {(r, c)} shows the image but has no box"
                continue
            if frac > 0.25:
                assert blue > 230, f"sample {i}: crop {rec.crop} patch {(r, c)} shows only padding but has box {rec}"
            if pix[2].min() < 250:  # partly padding: the mean mixes in pad colour
                continue
            cx = float(pix[0].mean()) / 255 * w
            cy = float(pix[1].mean()) / 255 * h
            bx, by = (rec.x0 + rec.x1) / 2, (rec.y0 + rec.y1) / 2
            tol_x = 0.6 + w / 255 + 0.1 * (rec.x1 - rec.x0)
            tol_y = 0.6 + h / 255 + 0.1 * (rec.y1 - rec.y0)
            assert abs(cx - bx) < tol_x and abs(cy - by) < tol_y, (
                f"sample {i} image {rec.image} crop {rec.crop} patch {(r, c)}: pixels centred at "
                f"({cx:.2f}, {cy:.2f}) but box {(rec.x0, rec.y0, rec.x1, rec.y1)}"
            )
            checked += 1
    return checked
