"""The contract every family adapter fulfils: where image tokens sit and where the layers are.

Everything downstream (capture, flow, recon, reduce) reads positions from an `ImageLayout` and
modules from a `FamilyAdapter`; nothing downstream hard-codes a token offset or a module path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .hooks import record, require_seen

# Kinds of token in the image block of the LM sequence.
KIND_IMAGE = "image"  # covers a picture patch (after any merge)
KIND_NEWLINE = "newline"  # LLaVA-NeXT / OneVision row terminator: covers no patch
KIND_SEPARATOR = (
    "separator"  # other image-block tokens that cover no patch (tile markers, <fake_token_around_image>, ...)
)
TOKEN_KINDS = (KIND_IMAGE, KIND_NEWLINE, KIND_SEPARATOR)

LAYOUT_COLUMNS = ("position", "kind", "image", "tile", "row", "col", "x0", "y0", "x1", "y1")
VISION_COLUMNS = ("crop", "vpos", "kind", "image", "tile", "row", "col", "x0", "y0", "x1", "y1")


def grid_values(mask, grid: tuple[int, int], rows, cols) -> np.ndarray:
    """``mask[row, col]`` for each (row, col) of a patch grid of shape ``grid``.

    ``mask`` must be on that grid: its shape equals ``grid``, or it is coarser by an integer factor
    per axis (each mask cell then covers factor x factor grid cells). Any other shape — a finer
    mask, or one that does not divide — is refused with an error naming both shapes: reading a
    larger mask at the grid's indices would silently look at its top-left corner only.
    """
    m = np.asarray(mask)
    grid = (int(grid[0]), int(grid[1]))
    if m.ndim != 2:
        raise ValueError(f"mask must be a 2-D (rows, cols) patch-grid array; got shape {m.shape}")
    if m.shape != grid:
        fr, fc = grid[0] / m.shape[0], grid[1] / m.shape[1]
        if not (fr >= 1 and fc >= 1 and fr == int(fr) and fc == int(fc)):
            raise ValueError(
                f"mask of shape {m.shape} does not match the layout's {grid[0]}x{grid[1]} patch grid; accepted: "
                f"a {grid[0]}x{grid[1]} mask, or a coarser one whose shape divides it"
            )
        m = np.kron(m, np.ones((int(fr), int(fc)), dtype=m.dtype))
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if rows.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= grid[0] or cols.max() >= grid[1]):
        raise ValueError(
            f"(row, col) outside the {grid[0]}x{grid[1]} grid: rows {rows.min()}..{rows.max()}, "
            f"cols {cols.min()}..{cols.max()}"
        )
    return m[rows, cols]


def image_token_id(config: Any) -> int:
    """The image placeholder id of a model config (``image_token_id``, or ``image_token_index`` in older
    LLaVA configs)."""
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise ValueError(f"{type(config).__name__} names no image placeholder (image_token_id / image_token_index)")
    return int(token)


@dataclass
class ImageLayout:
    """Where one sample's image tokens are, and which picture patch each one covers.

    Arrays are aligned: entry i describes the token at LM sequence position ``positions[i]``.
    ``row``/``col`` index the patch grid the LM sees (after any merge); -1 where ``kind`` is not
    ``image``. ``x0..x1``/``y0..y1`` are the pixel box in the *original* image (NaN for tokens
    that cover no patch). ``tile`` 0 is the global/base view; crops follow in processor order.
    """

    positions: np.ndarray
    kind: np.ndarray
    image: np.ndarray
    tile: np.ndarray
    row: np.ndarray
    col: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    seq_len: int  # length of the padded sequence this sample sits in
    valid_positions: np.ndarray  # positions holding real (non-pad) tokens
    question_positions: np.ndarray  # tokens of the user's prompt text (no template, no image)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per image
    grid_shapes: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # (image, tile) -> (rows, cols)
    vision: pd.DataFrame | None = None  # one row per vision-encoder token, columns VISION_COLUMNS
    crop_lengths: dict[int, int] = field(default_factory=dict)  # crop -> tokens the encoder ran (packed encoders)

    # --- derived views -------------------------------------------------------------------
    @property
    def last_position(self) -> int:
        return int(self.valid_positions.max())

    @property
    def text_positions(self) -> np.ndarray:
        """Real tokens that are not part of an image block (template, prompt, ...)."""
        return np.setdiff1d(self.valid_positions, self.positions)

    @property
    def image_positions(self) -> np.ndarray:
        """Positions of tokens that cover a picture patch (kind == image), layout order."""
        return self.positions[self.kind == KIND_IMAGE]

    @property
    def n_image_tokens(self) -> int:
        return int((self.kind == KIND_IMAGE).sum())

    def table(self) -> pd.DataFrame:
        """One row per image-block position: position, kind, image, tile, row, col, x0, y0, x1, y1."""
        return pd.DataFrame({c: getattr(self, "positions" if c == "position" else c) for c in LAYOUT_COLUMNS})

    def vision_table(self) -> pd.DataFrame:
        """One row per vision-encoder token: crop, vpos, kind (cls | patch), image, tile, row, col, box."""
        if self.vision is None:
            raise ValueError("this layout carries no vision-encoder table")
        return self.vision

    def grid(self, image: int = 0, tile: int = 0) -> tuple[int, int]:
        try:
            return self.grid_shapes[(image, tile)]
        except KeyError:
            raise KeyError(f"no (image={image}, tile={tile}) in this layout; have {sorted(self.grid_shapes)}") from None

    def tokens_from_grid(self, mask, image: int = 0, tile: int = 0) -> np.ndarray:
        """The value of a patch-grid ``mask`` (rows, cols) at each image token, aligned with ``image_positions``.

        ``mask`` lies on the grid of view (``image``, ``tile``); its shape must equal that grid (or be
        coarser by an integer factor, see :func:`grid_values`) — a mismatched mask is refused, never read
        at its top-left corner. Every image token must belong to that view (a layout with several views
        needs one mask per view). The result keeps ``mask``'s dtype::

            relevant = batch.layouts[0].tokens_from_grid(sample.relevance)   # bool per image token
        """
        sel = self.kind == KIND_IMAGE
        inside = (self.image[sel] == image) & (self.tile[sel] == tile)
        if not inside.all():
            views = sorted({(int(i), int(t)) for i, t in zip(self.image[sel], self.tile[sel])})
            raise ValueError(
                f"this layout's image tokens span views (image, tile) {views}; a mask on view ({image}, {tile}) "
                "covers only some of them: give one mask per view"
            )
        return grid_values(mask, self.grid(image, tile), self.row[sel], self.col[sel])

    def to_grid(self, values: np.ndarray, image: int = 0, tile: int = 0) -> np.ndarray:
        """Scatter per-image-token ``values`` (aligned with ``image_positions``) onto a (rows, cols) grid."""
        values = np.asarray(values)
        sel_img = self.kind == KIND_IMAGE
        if values.shape[0] != int(sel_img.sum()):
            raise ValueError(f"values has {values.shape[0]} entries; this layout has {int(sel_img.sum())} image tokens")
        rows, cols = self.grid(image, tile)
        out = np.full((rows, cols), np.nan, dtype=float)
        m = (self.image[sel_img] == image) & (self.tile[sel_img] == tile)
        out[self.row[sel_img][m], self.col[sel_img][m]] = values[m]
        return out


@dataclass
class Batch:
    """Model inputs built by the model's own processor and chat template, plus one layout per sample."""

    inputs: Any  # BatchFeature / dict: what ``vlm.model(**batch.inputs)`` takes
    layouts: list[ImageLayout]
    images: list[list[Any]]  # per sample, the PIL images it holds
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.layouts)

    def to(self, device: torch.device | str) -> Batch:
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in dict(self.inputs).items()}
        return Batch(inputs=inputs, layouts=self.layouts, images=self.images, prompts=self.prompts)


class FamilyAdapter:
    """One per VLM family. Subclasses name the HF model types they serve and implement the hooks.

    Adapters only *describe* a model: they never change its forward.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()  # HF ``config.model_type`` values served by this adapter

    # --- modules -------------------------------------------------------------------------
    def lm_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.language_model(model).layers

    def lm_attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def projector(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack that receives the merged ``inputs_embeds`` (e.g. ``model.model.language_model``)."""
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def decoder_inputs(self, model: nn.Module, inputs: Any) -> dict[str, Any]:
        """The exact tensors the LM decoder receives for ``inputs``: inputs_embeds (image features
        already merged by the model's own code), attention_mask, position_ids (3-D for mRoPE).

        Generic for every family: the decoder's call is recorded (``models.hooks.record``) and the
        forward stops there, so the model's own merge code is the only one used.
        ``position_ids`` is filled with the decoder's default (0..N-1) where the model passes None.
        ``attention_mask`` is the 2-D padding mask; ``decoder_mask`` the mask as the decoder got it.
        """
        lm = self.language_model(model)
        with record(inputs={"decoder": lm}, stop=True) as seen, torch.no_grad():
            model(**dict(inputs), use_cache=False)
        require_seen(seen, ["decoder"], model)
        call = seen["decoder"]
        seen = dict(call.kwargs)
        if call.args:
            seen.setdefault("input_ids", call.args[0])
        embeds = seen["inputs_embeds"]
        raw_mask = seen.get("attention_mask")
        mask = raw_mask
        if isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
            mask = dict(inputs).get("attention_mask")
        pos = seen.get("position_ids")
        if pos is None:
            pos = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0).expand(embeds.shape[0], -1)
        # ``decoder_mask`` is the mask exactly as the decoder got it: a 2-D padding mask for most
        # families, but e.g. Gemma3 passes a dict of 4-D masks in which image blocks attend
        # both ways; re-running the decoder needs that one, not the 2-D padding mask.
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos, "decoder_mask": raw_mask}

    def has_cls(self, model: nn.Module) -> bool:
        return False

    def image_token_id(self, model: nn.Module) -> int:
        """The id of the image placeholder the processor expands (see :func:`image_token_id`)."""
        return image_token_id(model.config)

    def vision_feature_layer(self, model: nn.Module) -> int:
        """Index (into ``vision_layers``) of the layer whose output feeds the projector."""
        return len(self.vision_layers(model)) - 1

    # --- inputs and layout -----------------------------------------------------------------
    def build_inputs(self, processor: Any, images: list[list[Any]], prompts: list[str]) -> Any:
        raise NotImplementedError

    def layouts(self, model: nn.Module, processor: Any, inputs: Any, images: list[list[Any]]) -> list[ImageLayout]:
        raise NotImplementedError
