"""Small helpers shared by family adapters: chat-templated, left-padded inputs and layout assembly.

Nothing here knows a family: token ids, grids and boxes come from the caller, which reads them
from the model config and the processor outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..base import LAYOUT_COLUMNS, TOKEN_KINDS, VISION_COLUMNS, ImageLayout
from ..text_positions import prompt_token_positions
from ._llava_common import image_wh  # one definition of an image's (width, height) for every family

NAN_BOX = (np.nan, np.nan, np.nan, np.nan)
# Attribute under which build_inputs leaves the templated texts and prompts for layouts() (same
# convention as the LLaVA families).
TEXTS_ATTR = "_vtrlab_texts"


# --- inputs ---------------------------------------------------------------------------------
def user_turn(n_images: int, prompt: str) -> list[dict[str, Any]]:
    """One user message: the images first, then the prompt (the order the model cards use)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def chat_texts(processor: Any, images: list[list[Any]], prompts: list[str]) -> list[str]:
    """The model's own chat template applied to one user turn per sample, ready for generation."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            f"{type(processor).__name__} has no chat_template; load the processor of an instruction-tuned "
            "checkpoint or set processor.chat_template"
        )
    return [
        processor.apply_chat_template(user_turn(len(ims), p), add_generation_prompt=True, tokenize=False)
        for ims, p in zip(images, prompts)
    ]


def call_processor(processor: Any, images: list[list[Any]], prompts: list[str], **kwargs: Any) -> Any:
    """Chat-template every sample and run the processor on the batch, left-padded (the last real
    token of every sample sits at -1). The texts and prompts ride along on the returned
    BatchFeature (attribute ``TEXTS_ATTR``) because ``layouts()`` receives only the processor output."""
    n_images = [len(ims) for ims in images]
    if any(n == 0 for n in n_images):
        raise ValueError(f"every sample needs at least one image; images per sample: {n_images}")
    texts = chat_texts(processor, images, prompts)
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tok.padding_side = old_side
    setattr(inputs, TEXTS_ATTR, {"texts": texts, "prompts": list(prompts)})
    return inputs


def stashed_prompts(inputs: Any, n: int) -> list[str]:
    stash = getattr(inputs, TEXTS_ATTR, None)
    if stash is None:
        raise ValueError("these inputs were not built by the adapter's build_inputs (no prompts attached)")
    if len(stash["prompts"]) != n:
        raise ValueError(f"inputs carry {len(stash['prompts'])} prompts for {n} samples")
    return stash["prompts"]


# --- token bookkeeping ------------------------------------------------------------------------
def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) spans of consecutive True values."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _find_last(haystack: np.ndarray, needle: np.ndarray, lo: int) -> int:
    n = len(needle)
    for start in range(len(haystack) - n, lo - 1, -1):
        if np.array_equal(haystack[start : start + n], needle):
            return start
    return -1


def question_positions(tokenizer: Any, input_ids: np.ndarray, prompt: str, after: int) -> np.ndarray:
    """Positions of the prompt's tokens in ``input_ids`` (one sample), searched after position ``after``.

    The prompt is tokenized alone; if the template glues it to the preceding text (a BPE merge at
    the boundary), the first prompt token is dropped and the token before the match is included.
    """
    ids = np.asarray(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    start = _find_last(input_ids, ids, after + 1)
    if start >= 0:
        return np.arange(start, start + len(ids))
    if len(ids) > 1:
        start = _find_last(input_ids, ids[1:], after + 1)
        if start > after + 1:
            return np.arange(start - 1, start + len(ids) - 1)
    raise ValueError(f"could not find the tokens of prompt {prompt!r} in the templated input")


def image_box(
    row: int, col: int, cell: tuple[float, float], offset: tuple[float, float], scale: tuple[float, float]
) -> tuple[float, float, float, float]:
    """Pixel box (x0, y0, x1, y1) in the ORIGINAL image of grid cell (row, col).

    ``cell`` = (height, width) of one cell in processed pixels, ``offset`` = (y, x) of the view's
    top-left corner in processed pixels, ``scale`` = (original / processed) for (y, x).
    """
    (ch, cw), (oy, ox), (sy, sx) = cell, offset, scale
    return ((ox + col * cw) * sx, (oy + row * ch) * sy, (ox + (col + 1) * cw) * sx, (oy + (row + 1) * ch) * sy)


# --- layout assembly ------------------------------------------------------------------------
@dataclass
class LayoutRows:
    """Accumulates image-block rows of one sample, then builds its `ImageLayout`."""

    rows: list[tuple] = field(default_factory=list)
    vision_rows: list[tuple] = field(default_factory=list)
    grid_shapes: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    crop_lengths: dict[int, int] = field(default_factory=dict)  # crop -> tokens the vision encoder ran for it

    def add(
        self,
        position: int,
        kind: str,
        image: int,
        tile: int,
        row: int = -1,
        col: int = -1,
        box: Sequence[float] = NAN_BOX,
    ) -> None:
        if kind not in TOKEN_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {TOKEN_KINDS}")
        self.rows.append((int(position), kind, int(image), int(tile), int(row), int(col), *map(float, box)))

    def add_vision(self, crop: int, vpos: int, image: int, tile: int, row: int, col: int, box: Sequence[float]) -> None:
        self.vision_rows.append(
            (int(crop), int(vpos), "patch", int(image), int(tile), int(row), int(col), *map(float, box))
        )

    def build(
        self,
        *,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        question: np.ndarray,
        image_sizes: list[tuple[int, int]],
    ) -> ImageLayout:
        ids = input_ids.detach().cpu().numpy()
        valid = (
            np.flatnonzero(attention_mask.detach().cpu().numpy() > 0)
            if attention_mask is not None
            else np.arange(len(ids))
        )
        table = pd.DataFrame(self.rows, columns=list(LAYOUT_COLUMNS)).sort_values("position", kind="stable")
        if table["position"].duplicated().any():
            dup = table.loc[table["position"].duplicated(), "position"].tolist()
            raise AssertionError(f"positions {dup[:5]} were described twice")
        vision = pd.DataFrame(self.vision_rows, columns=list(VISION_COLUMNS))
        vision = vision.sort_values(["crop", "vpos"], kind="stable").reset_index(drop=True)
        arrays = {c: table[c].to_numpy(copy=True) for c in LAYOUT_COLUMNS}
        arrays["positions"] = arrays.pop("position").astype(np.int64)
        arrays["kind"] = arrays["kind"].astype(object)
        return ImageLayout(
            **arrays,
            seq_len=int(len(ids)),
            valid_positions=valid,
            question_positions=np.asarray(question, dtype=np.int64),
            image_sizes=list(image_sizes),
            grid_shapes=dict(self.grid_shapes),
            vision=vision,
            crop_lengths=dict(self.crop_lengths),
        )


def per_sample_image_sizes(images: list[list[Any]]) -> list[list[tuple[int, int]]]:
    """(width, height) of every image (PIL or HWC array), per sample."""
    return [[image_wh(im) for im in ims] for ims in images]


def walked_prompt_positions(
    tokenizer: Any, inputs: Any, i: int, placeholder_id: int, spans: list[tuple[int, int]]
) -> np.ndarray:
    """Positions of sample i's prompt tokens, by walking the templated text against the processed
    ids (``text_positions.prompt_token_positions``). ``spans`` are the [lo, hi) position ranges each
    image placeholder (token ``placeholder_id`` in the templated text) expanded into."""
    stash = getattr(inputs, TEXTS_ATTR, None)
    if stash is None:
        raise ValueError("these inputs were not built by the adapter's build_inputs (no prompts attached)")
    ids = inputs["input_ids"][i].cpu().numpy().copy()
    mask = inputs.get("attention_mask")
    valid = np.flatnonzero(mask[i].cpu().numpy() > 0) if mask is not None else np.arange(len(ids))
    for lo, hi in spans:  # the whole expansion stands for one placeholder
        ids[lo:hi] = placeholder_id
    rel = prompt_token_positions(
        tokenizer, stash["texts"][i], stash["prompts"][i], ids[valid], placeholder_id, [hi - lo for lo, hi in spans]
    )
    return valid[rel]


__all__ = [
    "NAN_BOX",
    "TEXTS_ATTR",
    "LayoutRows",
    "call_processor",
    "chat_texts",
    "image_box",
    "per_sample_image_sizes",
    "question_positions",
    "runs",
    "stashed_prompts",
    "user_turn",
    "walked_prompt_positions",
]
