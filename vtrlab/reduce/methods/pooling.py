"""2-D average pooling of the image-token grid: each k×k window becomes one token (its mean).

Source: the pooling baseline of LLaVA-style compression studies (e.g. LLaVA-OneVision's 2×2
bilinear/average pooling of video frames; "pooling" rows of UniPruneBench): V/4 for 2×2, V/9 for 3×3.
Every (image, tile) grid is pooled on its own; windows at the right/bottom edge may be partial
(ceil division). The merged token sits at the position of its window's first token (top-left,
the lowest position), so positions are kept, with gaps; its embedding is the window mean of the
projector outputs.

Budget: pooling cannot hit an arbitrary count. ``kernel=0`` (default) picks the smallest kernel
whose number of windows fits the budget; the record reports the count it really keeps
(``exact_budget = False``). A fixed ``kernel`` ignores the budget.
"""

from __future__ import annotations

import numpy as np
import torch

from ...models.base import KIND_IMAGE
from ..registry import Method, Selection, register


def pooling_groups(layout, kernel: int) -> np.ndarray:
    """Window id per image token (layout order) for k×k windows over each (image, tile) grid."""
    img = layout.kind == KIND_IMAGE
    image, tile, row, col = layout.image[img], layout.tile[img], layout.row[img], layout.col[img]
    keys = np.stack([image, tile, row // kernel, col // kernel], 1)
    _, ids = np.unique(keys, axis=0, return_inverse=True)
    return ids.reshape(-1)


@register("pooling")
class Pooling(Method):
    stage = "projector"
    positions = "kept"
    merges = True
    exact_budget = False
    defaults = {"kernel": 0}
    source = "baseline: 2-D average pooling of the projector output grid (no single official file)"

    def select(self, ctx, n_keep):
        keep, scores, embeds, groups = [], [], [], []
        for i, (lay, budget) in enumerate(zip(ctx.layouts, n_keep)):
            k = int(self.params["kernel"])
            if k < 0:
                raise ValueError(f"pooling kernel={k}; accepted: 0 (from the budget) or a positive int")
            if k == 0:
                if budget < 1:
                    raise ValueError("pooling keeps at least one token per window; budget 0 is not reachable")
                k = 1
                while pooling_groups(lay, k).max() + 1 > budget:
                    k += 1
            win = pooling_groups(lay, k)
            n = lay.n_image_tokens
            rep = np.full(int(win.max()) + 1, n, dtype=np.int64)  # each window's first token (layout order)
            np.minimum.at(rep, win, np.arange(n))
            mask = np.zeros(n, dtype=bool)
            mask[rep] = True
            group = rep[win]
            feats = ctx.image_embeds(i)
            w_t = torch.as_tensor(win, device=feats.device)
            sums = torch.zeros(len(rep), feats.shape[-1], dtype=torch.float64, device=feats.device)
            sums.index_add_(0, w_t, feats.double())
            counts = torch.bincount(w_t, minlength=len(rep)).double()[:, None]
            pooled = (sums / counts).to(feats.dtype)
            order = np.argsort(rep)  # kept tokens in layout order
            keep.append(mask)
            scores.append(np.full(n, np.nan))
            embeds.append(pooled[torch.as_tensor(order, device=feats.device)])
            groups.append(group)
        return Selection(keep=keep, scores=scores, embeds=embeds, group=groups, info={"kernel": k})
