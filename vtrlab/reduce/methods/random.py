"""Random keep: a uniformly random subset of exactly the budget, per sample.

Source: the baseline of every pruning benchmark (e.g. UniPruneBench; "Token pruning in MLLMs:
are we solving the right problem?"), which find it beats most methods at high keep ratios.
Seeded: sample i of a batch draws from ``numpy.random.default_rng([seed, i])``, so a result does
not depend on the other samples of its batch.
"""

from __future__ import annotations

import numpy as np

from ..context import top_k_mask
from ..registry import Method, Selection, register


@register("random")
class RandomKeep(Method):
    stage = "projector"
    positions = "kept"
    merges = False
    defaults = {"seed": 0}
    source = "baseline (no official repository): uniform random subset at the projector output"

    def select(self, ctx, n_keep):
        keep, scores = [], []
        for i, (lay, k) in enumerate(zip(ctx.layouts, n_keep)):
            s = np.random.default_rng([int(self.params["seed"]), i]).random(lay.n_image_tokens)
            scores.append(s)
            keep.append(top_k_mask(s, k))
        return Selection(keep=keep, scores=scores)
