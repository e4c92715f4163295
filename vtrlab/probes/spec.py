"""Turn user-facing selections (rows, layers, heads, dtype) into indices, with clear errors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vtrlab.models.base import ImageLayout

ROW_NAMES = ("last", "question", "text", "all")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def rows_per_sample(layouts: Sequence[ImageLayout], rows) -> list[np.ndarray]:
    """Query positions per sample, from a name in ROW_NAMES or explicit positions.

    Explicit positions: one list of ints for every sample, or one list per sample. Negative
    positions count from each sample's last real token (-1 = last real token).
    """
    if isinstance(rows, str):
        if rows not in ROW_NAMES:
            raise ValueError(f"rows={rows!r} is not one of {ROW_NAMES} or a list of positions")
        pick = {
            "last": lambda L: np.array([L.last_position]),
            "question": lambda L: np.asarray(L.question_positions),
            "text": lambda L: np.asarray(L.text_positions),
            "all": lambda L: np.asarray(L.valid_positions),
        }[rows]
        out = [np.sort(pick(L)).astype(np.int64) for L in layouts]
    else:
        try:
            arr = [np.asarray(r, dtype=np.int64).ravel() for r in rows]
        except (TypeError, ValueError):
            raise ValueError(f"rows={rows!r} is not one of {ROW_NAMES} or a list of positions") from None
        nested = len(arr) > 0 and all(a.ndim == 1 and np.asarray(r).ndim == 1 for a, r in zip(arr, rows))
        if not nested:  # one flat list shared by every sample
            flat = np.asarray(rows, dtype=np.int64).ravel()
            arr = [flat for _ in layouts]
        if len(arr) != len(layouts):
            raise ValueError(f"rows gives {len(arr)} position lists for a batch of {len(layouts)} samples")
        out = []
        for i, (a, L) in enumerate(zip(arr, layouts)):
            a = np.where(a < 0, L.last_position + 1 + a, a)
            bad = a[~np.isin(a, L.valid_positions)]
            if bad.size:
                raise ValueError(
                    f"rows: position(s) {bad.tolist()} of sample {i} are not real tokens "
                    f"(valid positions {int(L.valid_positions.min())}..{int(L.valid_positions.max())})"
                )
            out.append(a)
    for i, a in enumerate(out):
        if a.size == 0:
            raise ValueError(f"rows={rows!r} selects no position in sample {i}")
    return out


def padded_rows(per_sample: list[np.ndarray]) -> np.ndarray:
    """(B, R) int64, -1 where a sample has fewer rows."""
    R = max(len(a) for a in per_sample)
    out = np.full((len(per_sample), R), -1, dtype=np.int64)
    for i, a in enumerate(per_sample):
        out[i, : len(a)] = a
    return out


def layer_indices(layers, n_layers: int, what: str = "layers") -> list[int]:
    """``"all"`` or a list of indices (negative counts from the end) -> sorted unique indices."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"{what}={layers!r}: use 'all' or a list of indices in 0..{n_layers - 1}")
        return list(range(n_layers))
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    out = []
    for layer in layers:
        if not isinstance(layer, (int, np.integer)) or not -n_layers <= layer < n_layers:
            raise ValueError(f"{what}: {layer!r} is not an index in 0..{n_layers - 1} (or -{n_layers}..-1)")
        out.append(int(layer) % n_layers)
    if not out:
        raise ValueError(f"{what}=[] selects nothing; use 'all' or a list of indices in 0..{n_layers - 1}")
    return sorted(set(out))


def head_indices(heads, n_heads: int) -> list[int]:
    if heads is None:
        return list(range(n_heads))
    return layer_indices(list(heads) if not isinstance(heads, int) else [heads], n_heads, what="heads")


def store_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {tuple(DTYPES)}")
    return DTYPES[dtype]
