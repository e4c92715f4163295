"""What the LLaVA families (1.5, NeXT, OneVision) share: module paths, inputs, layout assembly.

A family subclass only says how one image becomes a block of LM tokens (`_image_blocks`);
everything else — finding the block in ``input_ids``, the prompt's positions, the vision
table — is assembled here from the processor's own outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..base import VISION_COLUMNS, FamilyAdapter, ImageLayout
from ..geometry import AxisMap, center_crop_offset, shortest_edge_size, size_value
from ..text_positions import prompt_token_positions

# Attribute under which build_inputs leaves the templated texts and prompts for layouts():
# the contract's layouts() receives only the processor outputs.
TEXTS_ATTR = "_vtrlab_texts"


def resize_then_crop(amap: AxisMap, hw: tuple[int, int], ip: Any) -> tuple[AxisMap, tuple[int, int]]:
    """Extend ``amap`` by the ``resize(size)`` then optional ``center_crop`` that every LLaVA-family
    image processor applies (to the whole image, or to each anyres crop); returns the new (h, w)."""
    if getattr(ip, "do_resize", True):
        size = ip.size
        if size_value(size, "shortest_edge"):
            new = shortest_edge_size(hw, size_value(size, "shortest_edge"))
        elif size_value(size, "height") and size_value(size, "width"):
            new = (size_value(size, "height"), size_value(size, "width"))
        else:
            raise NotImplementedError(f"vtrlab cannot map LLaVA image-processor size {size!r}")
        amap, hw = amap.resize(hw, new), new
    if getattr(ip, "do_center_crop", False) and ip.crop_size is not None:
        crop = ip.crop_size
        dx, dy, hw = center_crop_offset(hw, (size_value(crop, "height"), size_value(crop, "width")))
        amap = amap.shift(dx, dy)
    return amap, hw


@dataclass
class ImageBlock:
    """One image's tokens in LM order, plus the vision-encoder tokens of its crops."""

    kind: np.ndarray
    tile: np.ndarray
    row: np.ndarray
    col: np.ndarray
    boxes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    grids: dict[int, tuple[int, int]]
    vision: pd.DataFrame  # VISION_COLUMNS without `image` filled in
    size_wh: tuple[int, int]

    def __len__(self) -> int:
        return len(self.kind)


def vision_rows(
    crop: int,
    n_cls: int,
    tile: int,
    lm_row: np.ndarray,
    lm_col: np.ndarray,
    boxes: tuple[np.ndarray, ...],
) -> pd.DataFrame:
    """Vision-table rows of one crop: ``n_cls`` [CLS] tokens, then the patches in raster order;
    ``lm_row``/``lm_col`` give the LM grid cell each patch becomes (-1 where none, 1:1)."""
    n = len(lm_row)
    nan = np.full(n_cls, np.nan)
    return pd.DataFrame(
        {
            "crop": crop,
            "vpos": np.arange(n_cls + n),
            "kind": ["cls"] * n_cls + ["patch"] * n,
            "image": -1,
            "tile": tile,
            "row": np.concatenate([np.full(n_cls, -1), lm_row]).astype(int),
            "col": np.concatenate([np.full(n_cls, -1), lm_col]).astype(int),
            "x0": np.concatenate([nan, boxes[0]]),
            "y0": np.concatenate([nan, boxes[1]]),
            "x1": np.concatenate([nan, boxes[2]]),
            "y1": np.concatenate([nan, boxes[3]]),
        },
        columns=list(VISION_COLUMNS),
    )


def _find_layers(module: nn.Module) -> nn.ModuleList:
    """The encoder layer list of a vision tower (CLIP/SigLIP: vision_model.encoder.layers)."""
    for path in ("vision_model.encoder.layers", "encoder.layers", "layers", "transformer.layers"):
        obj = module
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise AttributeError(f"cannot find the encoder layers of {type(module).__name__}")


class LlavaFamilyAdapter(FamilyAdapter):
    """Shared by LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (HF ``*ForConditionalGeneration``)."""

    nested_images = False  # pass images to the processor grouped per sample (OneVision counts them)

    # --- modules -------------------------------------------------------------------------
    def _inner(self, model: nn.Module) -> nn.Module:
        return model.model

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self._inner(model).vision_tower

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return _find_layers(self.vision_tower(model))

    def projector(self, model: nn.Module) -> nn.Module:
        return self._inner(model).multi_modal_projector

    def has_cls(self, model: nn.Module) -> bool:
        tower = self.vision_tower(model)
        emb = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        return getattr(emb, "class_embedding", None) is not None

    def n_cls(self, model: nn.Module) -> int:
        return int(self.has_cls(model))

    def newline_embedding(self, model: nn.Module) -> torch.Tensor | None:
        """The learned row terminator (LLaVA-NeXT / OneVision); None where the family has none."""
        return getattr(self._inner(model), "image_newline", None)

    def vision_crops(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """``pixel_values`` as the vision encoder receives them: (crops, C, H, W), padding crops
        dropped; index 0 is the layout's vision-table ``crop`` 0."""
        return inputs["pixel_values"]

    def vision_feature_layer(self, model: nn.Module) -> int:
        # config indexes hidden_states (entry 0 = embeddings, entry k = output of layer k-1).
        cfg = model.config.vision_feature_layer
        idx = max(cfg) if isinstance(cfg, (list, tuple)) else cfg
        n = len(self.vision_layers(model))
        return (idx - 1) if idx >= 0 else (n + idx)

    def select_strategy(self, model: nn.Module) -> str:
        return model.config.vision_feature_select_strategy

    def features_drop_cls(self, model: nn.Module) -> int:
        """How many leading vision tokens per crop the model drops before the projector."""
        return 1 if self.select_strategy(model) == "default" else 0

    # --- inputs ----------------------------------------------------------------------------
    def build_inputs(self, processor: Any, images: list[list[Any]], prompts: list[str]) -> Any:
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"{type(processor).__name__} has no chat_template; vtrlab builds inputs with the model's own "
                "chat template (save one with the processor)"
            )
        for i, imgs in enumerate(images):
            for im in imgs:
                if not (hasattr(im, "size") and hasattr(im, "mode")) and not isinstance(im, (np.ndarray, torch.Tensor)):
                    raise TypeError(
                        f"sample {i}: got an image of type {type(im).__name__}; pass PIL images or HWC arrays"
                    )
        texts = []
        for imgs, prompt in zip(images, prompts):
            content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": prompt}]
            conv = [{"role": "user", "content": content}]
            texts.append(processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))
        tok = processor.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"  # generation continues at the right edge of every row
        try:
            kwargs: dict[str, Any] = dict(text=texts, padding=True, return_tensors="pt")
            if any(images):
                kwargs["images"] = (
                    [im for im in images if im] if self.nested_images else [x for im in images for x in im]
                )
            inputs = processor(**kwargs)
        finally:
            tok.padding_side = old_side
        setattr(inputs, TEXTS_ATTR, {"texts": texts, "prompts": list(prompts)})
        return inputs

    # --- layout ----------------------------------------------------------------------------
    def _image_blocks(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[ImageBlock]:
        """One block per image of the batch, in processor order."""
        raise NotImplementedError

    def layouts(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[ImageLayout]:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        ids_np, mask_np = ids.cpu().numpy(), mask.cpu().numpy()
        blocks = self._image_blocks(model, processor, inputs, images) if any(images) else []
        stash = getattr(inputs, TEXTS_ATTR, None)
        image_id = self.image_token_id(model)
        out: list[ImageLayout] = []
        b = 0
        for i, imgs in enumerate(images):
            mine = blocks[b : b + len(imgs)]
            b += len(imgs)
            valid = np.flatnonzero(mask_np[i] == 1)
            img_pos = valid[ids_np[i][valid] == image_id]
            expected = sum(len(blk) for blk in mine)
            if len(img_pos) != expected:
                raise RuntimeError(
                    f"sample {i}: the processor expanded {len(img_pos)} image tokens but the {self.family} layout "
                    f"expects {expected} for image sizes {[blk.size_wh for blk in mine]}"
                )
            cols = {k: [] for k in ("positions", "kind", "image", "tile", "row", "col", "x0", "y0", "x1", "y1")}
            grids: dict[tuple[int, int], tuple[int, int]] = {}
            vis = []
            start = 0
            for j, blk in enumerate(mine):
                pos = img_pos[start : start + len(blk)]
                start += len(blk)
                if len(pos) and (np.diff(pos) != 1).any():
                    raise RuntimeError(f"sample {i}, image {j}: image tokens are not one contiguous block")
                cols["positions"].append(pos)
                cols["kind"].append(blk.kind)
                cols["image"].append(np.full(len(blk), j))
                for k in ("tile", "row", "col"):
                    cols[k].append(getattr(blk, k))
                for k, arr in zip(("x0", "y0", "x1", "y1"), blk.boxes):
                    cols[k].append(arr)
                grids.update({(j, t): g for t, g in blk.grids.items()})
                v = blk.vision.copy()
                v["image"] = j
                vis.append(v)
            cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
            question = np.zeros(0, dtype=int)
            if stash is not None:
                question = (
                    prompt_token_positions(
                        processor.tokenizer,
                        stash["texts"][i],
                        stash["prompts"][i],
                        ids_np[i][valid],
                        image_id,
                        [len(blk) for blk in mine],
                    )
                    + valid[0]
                )
            out.append(
                ImageLayout(
                    positions=cat["positions"].astype(int),
                    kind=cat["kind"].astype(object) if len(cat["kind"]) else np.zeros(0, dtype=object),
                    image=cat["image"].astype(int),
                    tile=cat["tile"].astype(int),
                    row=cat["row"].astype(int),
                    col=cat["col"].astype(int),
                    x0=cat["x0"].astype(float),
                    y0=cat["y0"].astype(float),
                    x1=cat["x1"].astype(float),
                    y1=cat["y1"].astype(float),
                    seq_len=int(ids.shape[1]),
                    valid_positions=valid,
                    question_positions=np.asarray(question, dtype=int),
                    image_sizes=[blk.size_wh for blk in mine],
                    grid_shapes=grids,
                    vision=(pd.concat(vis, ignore_index=True) if vis else pd.DataFrame(columns=list(VISION_COLUMNS))),
                )
            )
        if b != len(blocks):
            raise RuntimeError(f"{len(blocks)} image blocks for {b} images")
        return out


def image_wh(img: Any) -> tuple[int, int]:
    """(width, height) of a PIL image (or an array HWC)."""
    if hasattr(img, "size") and isinstance(img.size, tuple):
        return int(img.size[0]), int(img.size[1])
    arr = np.asarray(img)
    return int(arr.shape[1]), int(arr.shape[0])
