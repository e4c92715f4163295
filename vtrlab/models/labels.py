"""Labels every result carries: which image token, which patch, which packed vision token.

One place for the coordinates that results share, so that every verb labels its axes the same way
and reads the packed vision sequence with the same offsets:

* :func:`key_coordinates` — labels of every sequence position (the ``key`` axis) per sample;
* :func:`token_coordinates` — the per-image-token axis ``token`` (layout order, image tokens only)
  with the layout's labels (position, image, tile, row, col, pixel box) per sample;
  (the value of a patch-grid mask at each image token is ``ImageLayout.tokens_from_grid``);
* :func:`token_dataset` — per-image-token values of every sample (per layer) as an ``xarray.Dataset``
  on that axis, the shape every per-token signal returns (recon errors, reduction scores, ...);
* :func:`packed_crop_offsets` — where each crop starts in the one sequence a packed vision encoder
  (Qwen2-VL) runs, from the lengths the adapter recorded (not from the rows a vision table lists).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .base import KIND_IMAGE, ImageLayout

KEY_KIND_TEXT = "text"
KEY_KIND_PAD = "pad"


def key_coordinates(layouts: Sequence[ImageLayout], seq_len: int) -> dict[str, tuple]:
    """Per-sample labels of every sequence position (the ``key`` axis), as xarray variables.

    Returns ``{"key_kind", "key_image", "key_tile", "key_row", "key_col"}``, each
    ``(("sample", "key"), array)`` of shape (B, seq_len): ``key_kind`` is the layout's kind for
    image-block positions (image / newline / separator), ``"text"`` for other real tokens and
    ``"pad"`` for padding; the integer labels are -1 where they do not apply.
    """
    B = len(layouts)
    # kind as a code first (0 pad, 1 text, 2 image block) and as strings once: an object array of
    # every position converted with astype(str) was most of this function's time (0.5 ms at batch 8 x 617)
    code = np.zeros((B, seq_len), dtype=np.int8)
    fields = {name: np.full((B, seq_len), -1, dtype=np.int64) for name in ("image", "tile", "row", "col")}
    block_kinds: set = set()
    for b, L in enumerate(layouts):
        if len(L.valid_positions) and int(np.max(L.valid_positions)) >= seq_len:
            raise ValueError(
                f"sample {b}'s layout has positions up to {int(np.max(L.valid_positions))}, "
                f"beyond a sequence of {seq_len}"
            )
        code[b, L.valid_positions] = 1
        code[b, L.positions] = 2
        block_kinds.update(L.kind.tolist())
        for name, arr in fields.items():
            arr[b, L.positions] = getattr(L, name)
    # the strings' width is that of the longest label present (what astype(str) of the labels gives)
    present = np.bincount(code.ravel(), minlength=3)
    labels = {str(k) for k in block_kinds}
    labels |= {KEY_KIND_PAD} if present[0] else set()
    labels |= {KEY_KIND_TEXT} if present[1] else set()
    kind = np.full((B, seq_len), KEY_KIND_PAD, dtype=f"<U{max([1] + [len(k) for k in labels])}")
    kind[code == 1] = KEY_KIND_TEXT
    for b, L in enumerate(layouts):
        kind[b, L.positions] = L.kind
    out = {"key_kind": (("sample", "key"), kind)}
    out.update({f"key_{name}": (("sample", "key"), arr) for name, arr in fields.items()})
    return out


TOKEN_INT_LABELS = ("position", "image", "tile", "row", "col")
TOKEN_BOX_LABELS = ("x0", "y0", "x1", "y1")


def token_coordinates(layouts: Sequence[Any]) -> dict[str, Any]:
    """Coordinates of the per-image-token axis ``token`` for a batch of layouts.

    ``token`` indexes each sample's image tokens (``kind == "image"``) in layout order; samples with
    fewer image tokens are padded (-1 for the integer labels, NaN for the pixel box). Returns a dict
    for ``xarray``: ``{"token": arange(n), "position": (("sample", "token"), ...), "image": ...,
    "tile": ..., "row": ..., "col": ..., "x0": ..., "y0": ..., "x1": ..., "y1": ...}``.
    """
    layouts = list(layouts)
    if not layouts:
        raise ValueError("token_coordinates needs at least one layout; got none")
    n = max(lay.n_image_tokens for lay in layouts)
    ints = {k: np.full((len(layouts), n), -1, dtype=np.int64) for k in TOKEN_INT_LABELS}
    boxes = {k: np.full((len(layouts), n), np.nan) for k in TOKEN_BOX_LABELS}
    for s, lay in enumerate(layouts):
        img = lay.kind == KIND_IMAGE
        t = int(img.sum())
        ints["position"][s, :t] = lay.positions[img]
        for k in TOKEN_INT_LABELS[1:]:
            ints[k][s, :t] = getattr(lay, k)[img]
        for k in TOKEN_BOX_LABELS:
            boxes[k][s, :t] = getattr(lay, k)[img]
    out: dict[str, Any] = {"token": np.arange(n)}
    out.update({k: (("sample", "token"), v) for k, v in ints.items()})
    out.update({k: (("sample", "token"), v) for k, v in boxes.items()})
    return out


def token_dataset(
    variables: dict[str, tuple[str | None, dict[int, Sequence[np.ndarray]]]],
    layouts: Sequence[Any],
    attrs: dict | None = None,
) -> xr.Dataset:
    """A Dataset of per-image-token values: ``variables[name] = (layer_dim, {layer: [per-sample arrays]})``
    with ``layer_dim`` ``"layer"``, ``"vision_layer"`` or ``None`` (then the dict has one entry, key
    ignored). Each per-sample array has one value per LM image token (layout order); the ``token``
    axis is labelled by :func:`token_coordinates` and padded with NaN."""
    coords = token_coordinates(layouts)
    n = len(coords["token"])
    data, layer_coords = {}, {}
    for name, (dim, per_layer) in variables.items():
        keys = list(per_layer)
        arr = np.full((len(layouts), len(keys), n), np.nan)
        for j, key in enumerate(keys):
            for s, lay in enumerate(layouts):
                v = np.asarray(per_layer[key][s], dtype=float)
                if v.shape != (lay.n_image_tokens,):
                    raise ValueError(
                        f"{name}[{key!r}][{s}] has shape {v.shape}; sample {s} has {lay.n_image_tokens} image tokens"
                    )
                arr[s, j, : len(v)] = v
        if dim is None:
            data[name] = (("sample", "token"), arr[:, 0])
        else:
            data[name] = (("sample", dim, "token"), arr)
            layer_coords[dim] = np.asarray(keys, dtype=np.int64)
    return xr.Dataset(
        data, coords={"sample": np.arange(len(layouts)), **layer_coords, **coords}, attrs=dict(attrs or {})
    )


def packed_crop_offsets(layouts: Sequence[Any]) -> dict[int, int]:
    """Start of each crop in the single sequence a packed vision encoder runs (Qwen2-VL: all images
    of the batch concatenated, no batch dimension).

    Crop ``c`` starts after crops ``0..c-1``; each crop's length is the number of tokens the encoder
    ran for it, as the family adapter recorded it (``layout.crop_lengths``) — never inferred from the
    rows a vision table happens to list, so a table that lists only some tokens of a crop (dropped
    [CLS]-like rows, a subset) still gives the right offsets.
    """
    lengths: dict[int, int] = {}
    for i, lay in enumerate(layouts):
        if lay.vision is not None and len(lay.vision) and not lay.crop_lengths:
            raise ValueError(
                f"sample {i}'s layout records no crop_lengths, so the packed vision sequence cannot be split; "
                "the family adapter must record each crop's encoder length"
            )
        for crop, n in lay.crop_lengths.items():
            if lengths.setdefault(int(crop), int(n)) != int(n):
                raise ValueError(f"crop {crop} has length {lengths[int(crop)]} in one layout and {n} in another")
    offsets, at = {}, 0
    for crop in sorted(lengths):
        offsets[crop] = at
        at += lengths[crop]
    return offsets
