"""ToMe inside the vision tower: bipartite soft matching merges tokens in every block.

Source: facebookresearch/ToMe — ``tome/merge.py`` (``bipartite_soft_matching``: alternate tokens
into sets A/B, each A token's best B edge by cosine of the block's keys averaged over heads, the r
best edges merged, [CLS] protected; ``merge_wavg``: size-weighted average; ``merge_source``)
and ``tome/patch/timm.py`` (merge after the attention, before the MLP, in every block;
proportional attention adds log(size) to the attention logits). ToMe uses one constant ``r``
per block; ``r=0`` (default here) derives a schedule that reaches the budget exactly (as even as
possible, each block capped at half its tokens as ToMe caps it); ``r>0`` is ToMe's constant r
(the budget is then what it yields). Blocks 0 .. the feature layer (LLaVA's ``-2``) merge; the
merged features go through the projector. ToMe defines no LM order: the merged tokens enter the
LM in the order of their first patch (raster), positions renumbered (features concatenated).

Record: each merged token sits in the layout slot of its first patch; ``group`` maps every patch
to that slot (a partition: every patch is in exactly one token). LLaVA-family towers, one crop
per sample.
"""

from __future__ import annotations

import numpy as np
import torch

from ..context import vision_layer_index
from ..registry import Method, Selection, register
from ..scoring import tome_match, tome_merge, tome_schedule
from ..stages.tower import TowerState, run_tower
from ._vision import project, require_llava_tower, single_crop


@register("tome")
class ToMe(Method):
    stage = "tower"
    positions = "renumbered"
    merges = True
    defaults = {"r": 0, "proportional": True, "feature_layer": -2}
    source = "facebookresearch/ToMe: tome/merge.py (bipartite_soft_matching, merge_wavg), tome/patch/timm.py"

    def check(self, vlm):
        require_llava_tower(vlm, self.name)
        if int(self.params["r"]) < 0:
            raise ValueError(f"tome: r={self.params['r']}; accepted: 0 (schedule from the budget) or r >= 1")
        self.exact_budget = int(self.params["r"]) == 0

    def schedule(self, n_tokens: int, n_keep_total: int, n_layers: int, protected: int) -> list[int]:
        r = int(self.params["r"])
        if r == 0:
            return tome_schedule(n_tokens, n_tokens - n_keep_total, n_layers, protected)
        out, T = [], n_tokens
        for _ in range(n_layers):
            out.append(min(r, (T - protected) // 2))
            T -= out[-1]
        return out

    def select(self, ctx, n_keep):
        vlm = ctx.vlm
        fl = vision_layer_index(vlm, int(self.params["feature_layer"]))
        crops = vlm.adapter.vision_crops(vlm.model, ctx.batch.inputs)
        has_cls = bool(vlm.has_cls)
        drop = int(vlm.adapter.features_drop_cls(vlm.model))
        keep, scores, embeds, groups = [], [], [], []
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crop, order = single_crop(lay, vlm.family, self.name) if has_cls else (None, None)
            V = lay.n_image_tokens
            n0 = V + int(has_cls)
            sched = self.schedule(n0, n + int(has_cls), fl + 1, int(has_cls))

            def between(layer, st, sched=sched):
                r = sched[layer]
                if r == 0:
                    return st
                m = tome_match(st.metric, r, protect_first=has_cls)
                size = tome_merge(st.size, m)
                x = tome_merge(st.x * st.size, m) / size
                return TowerState(x=x, size=size, source=tome_merge(st.source, m, mode="amax"))

            st = run_tower(vlm, crops[crop : crop + 1], fl, between, proportional=bool(self.params["proportional"]))
            feats = st.x[0, drop:]
            members = st.source[0, drop:, int(has_cls) :] > 0  # (tokens, V) patches in vpos order
            first = members.float().argmax(1).cpu().numpy()  # first patch of each token
            rep = order[first]
            srt = np.argsort(rep, kind="stable")
            mask = np.zeros(V, dtype=bool)
            mask[rep] = True
            g = np.full(V, -1, dtype=np.int64)
            tok_of_patch = members.float().argmax(0).cpu().numpy()
            g[order] = rep[tok_of_patch]
            proj = project(vlm, feats)
            keep.append(mask)
            scores.append(_sizes(V, rep, st.size[0, drop:, 0].float().cpu().numpy()))
            groups.append(g)
            embeds.append(proj[torch.as_tensor(srt, device=proj.device)])
        return Selection(keep=keep, scores=scores, embeds=embeds, group=groups, info={"scores": "merged size"})


def _sizes(V: int, rep: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Per layout token: the size of the merged token whose slot it is (NaN for merged-away tokens)."""
    out = np.full(V, np.nan)
    out[rep] = size
    return out
