"""FEATHER: FastV-style pruning inside the LM, scored **without RoPE**, plus uniform sampling, in two stages.

Source: markendo/FEATHER (paper "Feather the Throttle", 2024). The authors find that FastV's
criterion, computed with rotary embeddings, favours tokens at the bottom of the image (closest to
the text); they score with the last prompt token's attention computed from q·kᵀ **without RoPE**
(head mean), add tokens sampled uniformly on the grid (stride 3) to keep coverage, and prune in
two stages: layer 8 keeps the top 30% plus the stride-3 grid, layer 16 keeps the top 9%
(paper defaults for a 32-layer LLaVA-1.5). The attention row is recomputed from layer K's own
projections of its input (one row, no eager attention).

Budgets here are exact: stage 1 keeps ``round(first_keep · n)`` tokens — the grid tokens first,
then the highest scores — and the last stage keeps ``keep`` (the code's union of top-30% and the
grid has a count that depends on overlap). Position ids: kept.
"""

from __future__ import annotations

import numpy as np

from ...models.base import KIND_IMAGE
from ..context import top_k_mask
from ..registry import register
from ..stages.lm import LMMethod


def grid_tokens(layout, stride: int) -> np.ndarray:
    """Bool per image token (layout order): on the stride grid (row % stride == 0 and col % stride == 0)."""
    img = layout.kind == KIND_IMAGE
    return (layout.row[img] % stride == 0) & (layout.col[img] % stride == 0)


@register("feather")
class Feather(LMMethod):
    positions = "kept"
    merges = False
    defaults = {"layers": (8, 16), "first_keep": 0.3, "stride": 3}

    source = "markendo/FEATHER (no-RoPE last-token criterion + stride-3 uniform sampling; layers 8 and 16)"

    def lm_layers(self, vlm):
        return [int(k) for k in self.params["layers"]]

    def lm_schedule(self, n_image, n_final):
        if len(self._layers) == 1:
            return [n_final]
        first = max(n_final, int(round(float(self.params["first_keep"]) * n_image)))
        return [first] * (len(self._layers) - 1) + [n_final]

    def lm_score(self, probe, stage):
        return probe.image_scores(probe.rows_without_rope().mean(1))

    def lm_keep(self, probe, stage, scores, n_keep):
        out = []
        for i, (s, k) in enumerate(zip(scores, n_keep)):
            s = np.asarray(s, dtype=float)
            if stage == 0 and len(self._layers) > 1:
                lay = probe.state.batch.layouts[i]
                grid = grid_tokens(lay, int(self.params["stride"]))[probe.image_tokens[i]]
                boosted = np.where(grid, np.inf, s)  # grid tokens first, then by score
                out.append(top_k_mask(boosted, k))
            else:
                out.append(top_k_mask(s, k))
        return out
