"""Vision-encoder features per sample, with the map from vision patches to LM image tokens.

The selector works on the features of one vision layer (default: the layer the model feeds its
projector, ``adapter.vision_feature_layer``). [CLS]-like tokens are dropped: only rows of the
layout's vision table with ``kind == "patch"`` are features. Each patch maps to the LM image
token of the same (image, tile) whose pixel box holds the patch centre — 1:1 for LLaVA-style
models, several patches to one token where the projector merges (Qwen2-VL 2x2, Idefics3 pixel
shuffle, Gemma3 pooling).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..models.base import KIND_IMAGE, Batch

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


def _output_tensor(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    for key in ("last_hidden_state", "hidden_states"):
        if hasattr(out, key):
            return getattr(out, key)
    raise TypeError(f"cannot read a hidden-state tensor from a layer output of type {type(out).__name__}")


class _Done(Exception):
    """Raised by the last recording hook to skip the rest of the forward (nothing after it is needed)."""


@contextmanager
def record_outputs(modules: dict[str, torch.nn.Module], stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record each module's output tensor (detached) during the forward run inside the block.

    With ``stop=True`` the forward is aborted once every module has fired; run it through
    :func:`run_forward`, which swallows that abort.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, mod in modules.items():
            def hook(_m, _a, out, name=name):
                seen[name] = _output_tensor(out).detach()
                if stop and len(seen) == len(modules):
                    raise _Done

            handles.append(mod.register_forward_hook(hook))
        yield seen
    finally:
        for h in handles:
            h.remove()


def run_forward(model: torch.nn.Module, inputs: Any) -> None:
    """One no-grad forward of the unchanged model (stops early when a recorder says so)."""
    try:
        with torch.no_grad():
            model(**dict(inputs), use_cache=False)
    except _Done:
        pass


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
    inside = (t_x0[None] <= cx[:, None]) & (cx[:, None] < t_x1[None]) & (t_y0[None] <= cy[:, None]) & (cy[:, None] < t_y1[None])
    hit = same & inside
    return np.where(hit.any(1), hit.argmax(1), -1).astype(np.int64)


def _gather(hidden: torch.Tensor, layouts: Sequence[Any]) -> list[torch.Tensor]:
    """Per sample, the hidden rows of its patch tokens. ``hidden`` is (crops, tokens, C) or, for
    encoders that pack all crops into one sequence (Qwen2-VL), (total tokens, C)."""
    tables = [patch_rows(lay.vision_table()) for lay in layouts]
    if hidden.dim() == 3:
        return [hidden[torch.as_tensor(t["crop"].to_numpy(np.int64, copy=True)), torch.as_tensor(t["vpos"].to_numpy(np.int64, copy=True))] for t in tables]
    if hidden.dim() != 2:
        raise ValueError(f"vision layer output has shape {tuple(hidden.shape)}; expected (crops, tokens, C) or (tokens, C)")
    # packed: crop c occupies a contiguous block; its length is its token count over the whole batch
    every = [lay.vision_table() for lay in layouts]
    sizes: dict[int, int] = {}
    for t in every:
        for crop, vmax in t.groupby("crop")["vpos"].max().items():
            sizes[int(crop)] = max(sizes.get(int(crop), 0), int(vmax) + 1)
    offsets, acc = {}, 0
    for crop in sorted(sizes):
        offsets[crop] = acc
        acc += sizes[crop]
    if acc != hidden.shape[0]:
        raise ValueError(f"vision tables account for {acc} packed tokens; the layer output has {hidden.shape[0]}")
    return [hidden[torch.as_tensor([offsets[int(c)] + int(v) for c, v in zip(t["crop"], t["vpos"])])] for t in tables]


@torch.no_grad()
def vision_features(vlm: Any, batch: Batch, layers: Sequence[int] | int | None = None) -> dict[int, list[SampleFeatures]]:
    """Patch features of the given vision layers (default: the projector's input layer) for every sample.

    Runs the unchanged model's forward only as far as the deepest requested layer.
    """
    if layers is None or isinstance(layers, (int, np.integer)):
        layers = [resolve_vision_layer(vlm, layers)]
    layers = [resolve_vision_layer(vlm, l) for l in layers]
    mods = {str(l): vlm.vision_layers[l] for l in layers}
    with record_outputs(mods, stop=True) as seen:
        run_forward(vlm.model, batch.inputs)
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


def _layer_names(vlm: Any, vision: Sequence[int] | str | None, lm: Sequence[int] | str | None) -> dict[str, torch.nn.Module]:
    mods: dict[str, torch.nn.Module] = {}
    for prefix, stack, sel in (("vision", vlm.vision_layers, vision), ("lm", vlm.lm_layers, lm)):
        if sel is None:
            continue
        idx = range(len(stack)) if sel == "all" else sel
        if isinstance(idx, str):
            raise ValueError(f"{prefix} layers={sel!r}; accepted: 'all', None or a list of layer indices")
        for i in idx:
            if not -len(stack) <= int(i) < len(stack):
                raise ValueError(f"{prefix} layer {i} out of range; this model has {prefix} layers 0..{len(stack) - 1}")
            mods[f"{prefix}.{int(i) % len(stack)}"] = stack[int(i)]
    if not mods:
        raise ValueError("no layers requested; give vision= and/or lm= ('all' or indices)")
    return mods


@torch.no_grad()
def token_features(
    vlm: Any, batch: Batch, vision: Sequence[int] | str | None = "all", lm: Sequence[int] | str | None = "all"
) -> dict[str, list[np.ndarray]]:
    """Per layer (``vision.i`` / ``lm.j``, output of that layer), per sample, one feature row per
    LM image token (layout order), float64. Vision patches are averaged over the LM token that
    covers them (identity for 1:1 models), so every layer lives on the same token axis."""
    mods = _layer_names(vlm, vision, lm)
    with record_outputs(mods, stop=True) as seen:
        run_forward(vlm.model, batch.inputs)
    tables = [patch_rows(lay.vision_table()) for lay in batch.layouts] if vision is not None else []
    tokens = [_token_index(lay, t) for lay, t in zip(batch.layouts, tables)]
    out: dict[str, list[np.ndarray]] = {}
    for name, hidden in seen.items():
        if name.startswith("lm."):
            out[name] = [hidden[i, torch.as_tensor(lay.image_positions)].double().cpu().numpy()
                         for i, lay in enumerate(batch.layouts)]
            continue
        per = _gather(hidden, batch.layouts)
        rows = []
        for f, tok, lay in zip(per, tokens, batch.layouts):
            f = f.double().cpu().numpy()
            agg = np.zeros((lay.n_image_tokens, f.shape[1]))
            cnt = np.bincount(tok[tok >= 0], minlength=lay.n_image_tokens)
            np.add.at(agg, tok[tok >= 0], f[tok >= 0])
            agg[cnt > 0] /= cnt[cnt > 0, None]
            agg[cnt == 0] = np.nan
            rows.append(agg)
        out[name] = rows
    order = list(mods)
    return {k: out[k] for k in order}
