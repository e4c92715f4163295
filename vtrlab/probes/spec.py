"""Turn user-facing selections (queries, keys, layers, heads, dtype) into indices, with clear errors.

Every verb takes the same selectors: ``queries=`` / ``keys=`` (a name or explicit sequence positions)
and ``layers=`` (``"all"`` or indices). Indices must be integers: floats and bools are refused, never
rounded or coerced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vtrlab.models.base import ImageLayout

QUERY_NAMES = ("last", "question", "text", "all", "image")
KEY_NAMES = QUERY_NAMES + ("image_block",)
DTYPES = {"float32": torch.float32, "float16": torch.float16}

_PICK = {
    "last": lambda L: np.array([L.last_position]),
    "question": lambda L: np.asarray(L.question_positions),
    "text": lambda L: np.asarray(L.text_positions),
    "all": lambda L: np.asarray(L.valid_positions),
    "image": lambda L: np.asarray(L.image_positions),
    "image_block": lambda L: np.asarray(L.positions),
}


def _is_index(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _int_list(values, what: str, accepted: str) -> list[int]:
    """A flat list of ints from a list/array/tensor; floats, bools and strings name themselves in the error."""
    if torch.is_tensor(values):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise ValueError(
                f"{what}: an array of dtype {values.dtype} is not a list of positions; accepted: {accepted}"
            )
        return [int(v) for v in values.ravel()]
    out = []
    for v in values:
        if not _is_index(v):
            raise ValueError(f"{what}: {v!r} is not an integer position; accepted: {accepted}")
        out.append(int(v))
    return out


def positions_per_sample(
    layouts: Sequence[ImageLayout], spec, what: str = "queries", names: Sequence[str] = QUERY_NAMES
) -> list[np.ndarray]:
    """Sequence positions per sample, from a name in ``names`` or explicit positions.

    Explicit positions: one list of ints for every sample, or one list per sample. Negative
    positions count from each sample's last real token (-1 = last real token).
    """
    accepted = f"one of {tuple(names)}, or integer positions (one list, or one list per sample)"
    if isinstance(spec, str):
        if spec not in names:
            raise ValueError(f"{what}={spec!r} is not accepted; use {accepted}")
        out = [np.sort(_PICK[spec](L)).astype(np.int64) for L in layouts]
    else:
        if _is_index(spec):
            spec = [spec]
        if torch.is_tensor(spec):
            spec = spec.detach().cpu().numpy()
        scalar = isinstance(spec, (bool, float, np.bool_, np.floating, dict, set))
        if spec is None or scalar or not hasattr(spec, "__iter__"):
            raise ValueError(f"{what}={spec!r} is not accepted; use {accepted}")
        if isinstance(spec, np.ndarray):
            if spec.ndim not in (1, 2):
                raise ValueError(f"{what}: an array of shape {spec.shape} is not accepted; use {accepted}")
            nested, items = spec.ndim == 2, list(spec) if spec.ndim == 2 else spec
        else:
            items = list(spec)
            sequences = (list, tuple, range, np.ndarray, torch.Tensor)
            nested = len(items) > 0 and all(isinstance(r, sequences) for r in items)
        if nested:
            arr = [np.asarray(_int_list(r, what, accepted), dtype=np.int64) for r in items]
            if len(arr) != len(layouts):
                raise ValueError(f"{what} gives {len(arr)} position lists for a batch of {len(layouts)} samples")
        else:
            flat = np.asarray(_int_list(items, what, accepted), dtype=np.int64)
            arr = [flat for _ in layouts]
        out = []
        for i, (a, L) in enumerate(zip(arr, layouts)):
            a = np.where(a < 0, L.last_position + 1 + a, a)
            bad = a[~np.isin(a, L.valid_positions)]
            if bad.size:
                raise ValueError(
                    f"{what}: position(s) {bad.tolist()} of sample {i} are not real tokens "
                    f"(valid positions {int(L.valid_positions.min())}..{int(L.valid_positions.max())})"
                )
            out.append(a)
    for i, a in enumerate(out):
        if a.size == 0:
            raise ValueError(f"{what}={spec!r} selects no position in sample {i}")
    return out


def queries_per_sample(layouts: Sequence[ImageLayout], queries) -> list[np.ndarray]:
    """Query positions per sample (see :func:`positions_per_sample`; names: :data:`QUERY_NAMES`)."""
    return positions_per_sample(layouts, queries, "queries", QUERY_NAMES)


def keys_per_sample(layouts: Sequence[ImageLayout], keys) -> list[np.ndarray]:
    """Key positions per sample; names: :data:`KEY_NAMES` (``image_block`` adds newline/separator tokens)."""
    return positions_per_sample(layouts, keys, "keys", KEY_NAMES)


def padded_rows(per_sample: list[np.ndarray]) -> np.ndarray:
    """(B, R) int64, -1 where a sample has fewer rows."""
    R = max(len(a) for a in per_sample)
    out = np.full((len(per_sample), R), -1, dtype=np.int64)
    for i, a in enumerate(per_sample):
        out[i, : len(a)] = a
    return out


def layer_indices(layers, n_layers: int, what: str = "layers") -> list[int]:
    """``"all"`` or a list of indices (negative counts from the end) -> sorted unique indices."""
    accepted = f"'all', an index or a list of indices in 0..{n_layers - 1} (or -{n_layers}..-1)"
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"{what}={layers!r} is not accepted; use {accepted}")
        return list(range(n_layers))
    if _is_index(layers):
        layers = [int(layers)]
    if layers is None or isinstance(layers, (bool, float, np.bool_, np.floating)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"{what}={layers!r} is not accepted; use {accepted}")
    out = []
    for layer in layers:
        if not _is_index(layer) or not -n_layers <= layer < n_layers:
            raise ValueError(f"{what}: {layer!r} is not an index in 0..{n_layers - 1} (or -{n_layers}..-1)")
        out.append(int(layer) % n_layers)
    if not out:
        raise ValueError(f"{what}=[] selects nothing; use {accepted}")
    return sorted(set(out))


def head_indices(heads, n_heads: int) -> list[int]:
    if heads is None:
        return list(range(n_heads))
    if isinstance(heads, str):
        raise ValueError(f"heads={heads!r} is not accepted; use None (all) or indices in 0..{n_heads - 1}")
    return layer_indices(heads, n_heads, what="heads")


def store_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {tuple(DTYPES)}")
    return DTYPES[dtype]
