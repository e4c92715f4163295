"""Vision-encoder features per sample, with the map from vision patches to LM image tokens.

The selector works on the features of one vision layer (default: the layer the model feeds its
projector, ``adapter.vision_feature_layer``). [CLS]-like tokens are dropped: only rows of the
layout's vision table with ``kind == "patch"`` are features. Each patch maps to the LM image
token of the same (image, tile) whose pixel box holds the patch centre — 1:1 for LLaVA-style
models, several patches to one token where the projector merges (Qwen2-VL 2x2, Idefics3 pixel
shuffle, Gemma3 pooling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.base import KIND_IMAGE, Batch
from ..models.hooks import record, require_seen
from ..models.labels import packed_crop_offsets
from ..probes.spec import layer_indices

PATCH = "patch"


@dataclass
class SampleFeatures:
    """One sample's patch features from one layer."""

    features: torch.Tensor  # (P, C) patch tokens, vision-table order, float32 on CPU
    row: np.ndarray  # (P,) LM grid row of each patch
    col: np.ndarray  # (P,)
    tile: np.ndarray  # (P,)
    token: np.ndarray  # (P,) index into the sample's LM image tokens (layout order); -1 if none
    n_tokens: int  # number of LM image tokens of the sample


def resolve_vision_layer(vlm: Any, layer: int | None) -> int:
    n = len(vlm.vision_layers)
    if layer is None:
        return int(vlm.adapter.vision_feature_layer(vlm.model)) % n
    if not -n <= int(layer) < n:
        raise ValueError(f"vision layer {layer} out of range; this model has vision layers 0..{n - 1}")
    return int(layer) % n


def patch_rows(vision_table) -> Any:
    return vision_table[vision_table["kind"] == PATCH]


def _token_index(layout, patches) -> np.ndarray:
    """For each patch row, the index of the LM image token (layout order) covering the patch's
    centre pixel in the same (image, tile). Pixel boxes, not grid indices, decide, so the map is
    right whether vision-table row/col are the encoder's own grid or the merged LM grid."""
    img = layout.kind == KIND_IMAGE
    t_img, t_tile = layout.image[img], layout.tile[img]
    t_x0, t_y0, t_x1, t_y1 = (np.asarray(getattr(layout, k)[img], dtype=float) for k in ("x0", "y0", "x1", "y1"))
    cx = (patches["x0"].to_numpy(float) + patches["x1"].to_numpy(float)) / 2
    cy = (patches["y0"].to_numpy(float) + patches["y1"].to_numpy(float)) / 2
    same = (patches["image"].to_numpy()[:, None] == t_img[None]) & (patches["tile"].to_numpy()[:, None] == t_tile[None])
    inside = (
        (t_x0[None] <= cx[:, None])
        & (cx[:, None] < t_x1[None])
        & (t_y0[None] <= cy[:, None])
        & (cy[:, None] < t_y1[None])
    )
    hit = same & inside
    return np.where(hit.any(1), hit.argmax(1), -1).astype(np.int64)


def _gather(hidden: torch.Tensor, layouts: Sequence[Any]) -> list[torch.Tensor]:
    """Per sample, the hidden rows of its patch tokens. ``hidden`` is (crops, tokens, C) or, for
    encoders that pack all crops into one sequence (Qwen2-VL), (total tokens, C)."""
    tables = [patch_rows(lay.vision_table()) for lay in layouts]
    if hidden.dim() == 3:
        return [
            hidden[
                torch.as_tensor(t["crop"].to_numpy(np.int64, copy=True)),
                torch.as_tensor(t["vpos"].to_numpy(np.int64, copy=True)),
            ]
            for t in tables
        ]
    if hidden.dim() != 2:
        raise ValueError(
            f"vision layer output has shape {tuple(hidden.shape)}; expected (crops, tokens, C) or (tokens, C)"
        )
    # packed: crop c occupies a contiguous block after crops 0..c-1 (one rule: models.labels)
    offsets = packed_crop_offsets(layouts)
    total = max((offsets[c] + n for lay in layouts for c, n in lay.crop_lengths.items()), default=0)
    if total != hidden.shape[0]:
        raise ValueError(f"layouts account for {total} packed vision tokens; the layer output has {hidden.shape[0]}")
    return [hidden[torch.as_tensor([offsets[int(c)] + int(v) for c, v in zip(t["crop"], t["vpos"])])] for t in tables]


def _run(vlm: Any, batch: Batch, mods: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Outputs of ``mods`` in one no-grad forward of the unchanged model, stopped once all have fired."""
    with record(outputs=mods, stop=True) as seen, torch.no_grad():
        vlm.model(**dict(batch.inputs), use_cache=False)
    require_seen(seen, list(mods), vlm.model)
    return seen


@torch.no_grad()
def vision_features(
    vlm: Any, batch: Batch, layers: Sequence[int] | int | None = None
) -> dict[int, list[SampleFeatures]]:
    """Patch features of the given vision layers (default: the projector's input layer) for every sample.

    Runs the unchanged model's forward only as far as the deepest requested layer.
    """
    if layers is None or isinstance(layers, (int, np.integer)):
        layers = [resolve_vision_layer(vlm, layers)]
    layers = [resolve_vision_layer(vlm, l) for l in layers]
    seen = _run(vlm, batch, {str(l): vlm.vision_layers[l] for l in layers})
    out: dict[int, list[SampleFeatures]] = {}
    tables = [patch_rows(lay.vision_table()) for lay in batch.layouts]
    tokens = [_token_index(lay, t) for lay, t in zip(batch.layouts, tables)]
    for l in layers:
        per = _gather(seen[str(l)], batch.layouts)
        out[l] = [
            SampleFeatures(
                features=f.float().cpu(),
                row=t["row"].to_numpy(np.int64),
                col=t["col"].to_numpy(np.int64),
                tile=t["tile"].to_numpy(np.int64),
                token=tok,
                n_tokens=lay.n_image_tokens,
            )
            for f, t, tok, lay in zip(per, tables, tokens, batch.layouts)
        ]
    return out


def _layer_modules(vlm: Any, vision_layers, layers) -> dict[tuple[str, int], torch.nn.Module]:
    mods: dict[tuple[str, int], torch.nn.Module] = {}
    for stack, mlist, sel, what in (
        ("vision", vlm.vision_layers, vision_layers, "vision_layers"),
        ("lm", vlm.lm_layers, layers, "layers"),
    ):
        if sel is None:
            continue
        for i in layer_indices(sel, len(mlist), what=what):
            mods[(stack, i)] = mlist[i]
    if not mods:
        raise ValueError("no layers requested; give layers= and/or vision_layers= ('all' or indices)")
    return mods


@torch.no_grad()
def token_features(
    vlm: Any,
    batch: Batch,
    *,
    layers: Sequence[int] | str | None = "all",
    vision_layers: Sequence[int] | str | None = "all",
) -> dict[tuple[str, int], list[np.ndarray]]:
    """Per layer — key ``("lm", i)`` for the output of LM layer i, ``("vision", j)`` for vision layer
    j — per sample, one feature row per LM image token (layout order), float64. Vision patches are
    averaged over the LM token that covers them (identity for 1:1 models), so every layer lives on
    the same token axis. ``None`` skips a stack."""
    mods = _layer_modules(vlm, vision_layers, layers)
    seen = _run(vlm, batch, {f"{k[0]}.{k[1]}": m for k, m in mods.items()})
    tables = [patch_rows(lay.vision_table()) for lay in batch.layouts] if vision_layers is not None else []
    tokens = [_token_index(lay, t) for lay, t in zip(batch.layouts, tables)]
    out: dict[tuple[str, int], list[np.ndarray]] = {}
    for key in mods:
        hidden = seen[f"{key[0]}.{key[1]}"]
        if key[0] == "lm":
            out[key] = [
                hidden[i, torch.as_tensor(lay.image_positions)].double().cpu().numpy()
                for i, lay in enumerate(batch.layouts)
            ]
            continue
        rows = []
        for f, tok, lay in zip(_gather(hidden, batch.layouts), tokens, batch.layouts):
            f = f.double().cpu().numpy()
            agg = np.zeros((lay.n_image_tokens, f.shape[1]))
            cnt = np.bincount(tok[tok >= 0], minlength=lay.n_image_tokens)
            np.add.at(agg, tok[tok >= 0], f[tok >= 0])
            agg[cnt > 0] /= cnt[cnt > 0, None]
            agg[cnt == 0] = np.nan
            rows.append(agg)
        out[key] = rows
    return out
