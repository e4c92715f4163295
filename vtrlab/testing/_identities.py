"""Turn "what each feature row covers" (derived from processor outputs) into the layout proof's
expected rows: for every image position of every sample, the feature row that must land there."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vtrlab.models.base import KIND_IMAGE


def expected_rows(identities: pd.DataFrame, batch) -> list[np.ndarray]:
    """``identities``: one row per feature row in memory order, columns sample, image, tile, row, col.
    Returns, per sample, the feature row index for each of ``layout.image_positions`` (-1 if none)."""
    index = {
        tuple(map(int, key)): n
        for n, key in enumerate(identities[["sample", "image", "tile", "row", "col"]].to_numpy())
    }
    if len(index) != len(identities):
        raise AssertionError("two feature rows claim the same (sample, image, tile, row, col)")
    out = []
    for s, lay in enumerate(batch.layouts):
        sel = lay.kind == KIND_IMAGE
        keys = zip(lay.image[sel], lay.tile[sel], lay.row[sel], lay.col[sel])
        out.append(np.asarray([index.get((s, int(j), int(t), int(r), int(c)), -1) for j, t, r, c in keys], dtype=int))
    return out
