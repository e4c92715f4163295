"""Oracle keep: the ground-truth relevant patches first, then a seeded random fill (organism tasks).

Not a published method: the upper reference of the comparison where ground truth is known (the
synthetic organism's ``Sample.relevance``). ``relevance`` is one array per sample: either bool
per image token (layout order) or a grid over the LM patch grid read at each token's (row, col).
When a sample has more relevant tokens than its budget, a random subset of them is kept.
Score: 1 for relevant tokens, 0 otherwise.
"""

from __future__ import annotations

import numpy as np

from ...models.base import KIND_IMAGE
from ..registry import Method, Selection, register


def relevance_per_token(layout, relevance) -> np.ndarray:
    """Relevance of each image token of ``layout`` (layout order) from a per-token or grid array."""
    rel = np.asarray(relevance)
    n = layout.n_image_tokens
    if rel.ndim == 1:
        if rel.shape[0] != n:
            raise ValueError(f"relevance has {rel.shape[0]} entries; the layout has {n} image tokens")
        return rel.astype(bool)
    if rel.ndim != 2:
        raise ValueError(f"relevance of shape {rel.shape}; accepted: (n_image_tokens,) or a (rows, cols) grid")
    img = layout.kind == KIND_IMAGE
    rows, cols = layout.row[img], layout.col[img]
    if rows.max() >= rel.shape[0] or cols.max() >= rel.shape[1]:
        raise ValueError(f"relevance grid {rel.shape} is smaller than the layout's grid ({rows.max() + 1}, {cols.max() + 1})")
    return rel[rows, cols].astype(bool)


@register("oracle")
class OracleKeep(Method):
    stage = "projector"
    positions = "kept"
    merges = False
    defaults = {"relevance": None, "seed": 0}
    source = "vtrlab reference (no official repository): ground-truth relevant patches first"

    def select(self, ctx, n_keep):
        rel = self.params["relevance"]
        if rel is None:
            raise ValueError("method 'oracle' needs relevance=[one array per sample] (e.g. organism Sample.relevance)")
        rel = list(rel)
        if len(rel) != len(ctx.layouts):
            raise ValueError(f"relevance has {len(rel)} entries for a batch of {len(ctx.layouts)}")
        keep, scores = [], []
        for i, (lay, r, k) in enumerate(zip(ctx.layouts, rel, n_keep)):
            r = relevance_per_token(lay, r)
            rng = np.random.default_rng([int(self.params["seed"]), i])
            order = rng.permutation(r.shape[0])
            order = order[np.argsort(~r[order], kind="stable")]  # relevant first, random within each class
            mask = np.zeros(r.shape[0], dtype=bool)
            mask[order[:k]] = True
            keep.append(mask)
            scores.append(r.astype(float))
        return Selection(keep=keep, scores=scores)
