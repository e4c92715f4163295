"""FlowCut: prune inside the vision tower, every other layer, by an information-flow score.

Source: TungChintao/FlowCut — ``flowcut/modeling_clip_flowcut.py`` (``CLIPEncoderLayer_forward``,
``CLIPEncoder_forward``, ``CLIPAttention_forward``), ``flowcut/utils_flowcut.py`` (``compute_score``,
``adaptive_prune_ratio``), ``flowcut/main.py`` (``target = target_num + 1`` for LLaVA-1.5: one slot for
the [CLS] token, removed at the end). After each block (attention + MLP) while more than
``target`` tokens remain: score = (norm. head-mean [CLS] attention + norm. head-mean
softmax(v_CLS · Vᵀ)) · ‖head-mean v‖₁; cumulative score = EMA 0.5 (the first layer's score
alone). At layers whose distance to the feature layer ``rpl = select_layer − layer − 1`` is
even, drop ``round((N − target) / √rpl · (1 − entropy_ratio²))`` tokens (all the excess when
rpl = 0), keeping the top by cumulative score in raster order; so the feature layer's output
(``hidden_states[-2]``) has exactly the budget. Budgets 64 / 128 / 192. Positions renumbered
(LLaVA concatenates the kept features). Where vtrlab differs: LLaVA-1.5-style single crops only
(the code's anyres variant halves the budget and prunes again in the LM).
"""

from __future__ import annotations

import numpy as np
import torch

from ..context import vision_layer_index
from ..registry import Method, Selection, register
from ..scoring import flowcut_prune_count, flowcut_score, top_k
from ..stages.tower import TowerState, run_tower
from ._vision import project, require_cls, require_llava_tower, single_crop


def flowcut_step(st: TowerState, layer: int, select_layer: int, target: int) -> TowerState:
    """One FlowCut update after block ``layer`` (batch of one crop sequence with [CLS] first)."""
    T = st.x.shape[1]
    if T <= target:
        return st
    cls = st.attn_cls[:, :, 1:].mean(1)  # (B, N)
    v = st.values  # (B, H, T, d)
    sem = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1)[:, :, 0].mean(1)[:, 1:]
    score = flowcut_score(cls, sem, v.mean(1)[:, 1:])
    extra = dict(st.extra or {})
    cum = extra.get("cum")
    cum = score if cum is None else 0.5 * cum + 0.5 * score
    extra["cum"] = cum
    rpl = select_layer - layer - 1
    if rpl % 2 == 0:
        prune = flowcut_prune_count(cls, rpl, target - 1) if rpl else T
        n_keep = max(T - prune, target)
        if st.x.shape[0] != 1:
            raise ValueError("flowcut_step runs one crop at a time")
        keep = top_k(cum[0], n_keep - 1)
        rows = torch.cat([torch.zeros(1, dtype=torch.long, device=keep.device), keep + 1])
        extra["cum"] = cum[:, keep]
        return TowerState(x=st.x[:, rows], size=st.size[:, rows], source=st.source[:, rows], extra=extra)
    return TowerState(x=st.x, size=st.size, source=st.source, extra=extra)


@register("flowcut")
class FlowCut(Method):
    stage = "tower"
    positions = "renumbered"
    merges = False
    defaults = {"feature_layer": -2}
    source = (
        "TungChintao/FlowCut: flowcut/modeling_clip_flowcut.py (CLIPEncoderLayer_forward), "
        "flowcut/utils_flowcut.py (compute_score, adaptive_prune_ratio)"
    )

    def check(self, vlm):
        require_llava_tower(vlm, self.name)
        require_cls(vlm, self.name, "its score and its entropy read the [CLS] attention and value")

    def select(self, ctx, n_keep):
        vlm = ctx.vlm
        fl = vision_layer_index(vlm, int(self.params["feature_layer"]))
        crops = vlm.adapter.vision_crops(vlm.model, ctx.batch.inputs)
        keep, scores, embeds = [], [], []
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crop, order = single_crop(lay, vlm.family, self.name)
            V = lay.n_image_tokens
            if n < 1:
                raise ValueError("flowcut keeps at least one patch (target_num >= 1, as its code requires)")
            st = run_tower(
                vlm,
                crops[crop : crop + 1],
                fl,
                lambda li, s, n=n: flowcut_step(s, li, fl, n + 1),
                want_cls=True,
                where="block",
            )
            kept_patches = (st.source[0, 1:, 1:] > 0).float().argmax(1).cpu().numpy()  # raster order
            m = np.zeros(V, dtype=bool)
            m[order[kept_patches]] = True
            s = np.full(V, np.nan)
            if st.extra and st.extra.get("cum") is not None:
                s[order[kept_patches]] = st.extra["cum"][0].float().cpu().numpy()
            keep.append(m)
            scores.append(s)
            embeds.append(project(vlm, st.x[0, 1:])[torch.as_tensor(np.argsort(order[kept_patches], kind="stable"))])
        return Selection(
            keep=keep, scores=scores, embeds=embeds, info={"scores": "cumulative FlowCut score of kept tokens"}
        )
