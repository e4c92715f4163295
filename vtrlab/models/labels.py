"""Labels every result carries: which picture patch (image, tile, row, col) a sequence position is.

Probes (``vtrlab.probes``, ``vtrlab.flow``) and analyses read these helpers instead of re-deriving
positions; each helper is one labelling job over :class:`~vtrlab.models.base.ImageLayout` s.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import ImageLayout

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
    kind = np.full((B, seq_len), KEY_KIND_PAD, dtype=object)
    fields = {name: np.full((B, seq_len), -1, dtype=np.int64) for name in ("image", "tile", "row", "col")}
    for b, L in enumerate(layouts):
        if len(L.valid_positions) and int(np.max(L.valid_positions)) >= seq_len:
            raise ValueError(f"sample {b}'s layout has positions up to {int(np.max(L.valid_positions))}, "
                             f"beyond a sequence of {seq_len}")
        kind[b, L.valid_positions] = KEY_KIND_TEXT
        kind[b, L.positions] = L.kind
        for name, arr in fields.items():
            arr[b, L.positions] = getattr(L, name)
    out = {"key_kind": (("sample", "key"), kind.astype(str))}
    out.update({f"key_{name}": (("sample", "key"), arr) for name, arr in fields.items()})
    return out
