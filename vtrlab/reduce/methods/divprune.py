"""DivPrune: a max–min diverse subset of the projector outputs.

Source: vbdi/divprune — ``LLaVA/llava/model/llava_arch.py::DivPrune`` and its call in
``prepare_inputs_labels_for_multimodal`` (distance 1 − cosine of the LM-input image embeddings;
first pick the token with the largest nearest-neighbour distance, then repeatedly the token
farthest from the picked set; ``SUBSET_RATIO`` ≈ 0.098 of the image tokens in the paper's runs;
kept tokens re-sorted into sequence order). Positions: the code slices ``position_ids`` with the
kept indices when they are given, but LLaVA's generate passes None, so the LM numbers the pruned
sequence afresh — renumbered. The code runs on one image block (LLaVA-1.5 at a fixed offset of
35); vtrlab takes every sample's image tokens from its layout. ``score`` records the order of
picking (the first pick scores k, the last 1; 0 for tokens never picked).
"""

from __future__ import annotations

import numpy as np

from ..registry import Method, Selection, register
from ..scoring import divprune_order


@register("divprune")
class DivPrune(Method):
    stage = "projector"
    positions = "renumbered"
    merges = False
    defaults = {}
    source = "vbdi/divprune: LLaVA/llava/model/llava_arch.py::DivPrune"

    def select(self, ctx, n_keep):
        keep, scores = [], []
        for i, k in enumerate(n_keep):
            feats = ctx.image_embeds(i).double()
            order = divprune_order(feats, k).cpu().numpy()
            m = np.zeros(feats.shape[0], dtype=bool)
            m[order] = True
            s = np.zeros(feats.shape[0])
            s[order] = np.arange(len(order), 0, -1)  # first pick scores highest
            keep.append(m)
            scores.append(s)
        return Selection(keep=keep, scores=scores)
