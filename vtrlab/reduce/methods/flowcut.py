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
(LLaVA concatenates the kept features).

Anyres (LLaVA-NeXT base view + tiles, ``flowcut/main.py`` with ``image_aspect_ratio == 'anyres'``,
``llava_arch.py::prepare_inputs_labels_for_multimodal_flowcut``): the code prunes every crop in
the tower to ``target_num / 2`` (+1 for the [CLS]), lays the tiles' kept tokens out in raster order
of the grid, drops those in the unpadded-away region (``unpad_mask``), adds no newline tokens, and
prunes again **inside the LM at layer 1** to ``target_num`` (``modeling_llama_flowcut.py``: last
instruction token's query/value → image keys/values). vtrlab implements the tower stage per crop and
not the second, in-LM stage: the budget ``n`` is split over the crops in proportion to their image
tokens (largest remainder) and each crop runs the single-crop rule with a tower budget of its share
``n_c`` plus its patches the model unpads away (which the LM never sees); at the last step the
crop keeps its top ``n_c`` patches that reach the LM (the code keeps the top ones and then unpads),
so exactly ``n`` image tokens reach the LM. A crop with ``n_c = 0`` sends nothing. The tiles' kept
tokens sit in their own slots (raster order of the grid) and the model's newline tokens stay.
"""

from __future__ import annotations

import numpy as np
import torch

from ..context import vision_layer_index
from ..registry import Method, NotApplicable, Selection, register
from ..scoring import flowcut_prune_count, flowcut_score, top_k
from ..stages.tower import TowerState, run_tower
from ._vision import (
    PerCropResults,
    crop_tokens,
    feature_layer_or,
    per_crop,
    project,
    require_cls,
    require_llava_tower,
    single_crop,
    split_budget,
)


def flowcut_step(
    st: TowerState, layer: int, select_layer: int, target: int, lm: torch.Tensor | None = None, final: int = 0
) -> TowerState:
    """One FlowCut update after block ``layer`` (batch of one crop sequence with [CLS] first).
    ``lm`` (anyres): bool over the crop's original tower tokens, the patches that reach the LM; the
    last step then keeps the top ``final`` of those (the others are unpadded away)."""
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
        if lm is not None and rpl == 0:
            reach = lm.to(st.source.device)[st.source[0, 1:].argmax(-1)]
            keep = top_k(cum[0].masked_fill(~reach, -torch.inf), final)
        else:
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
    defaults = {"feature_layer": None}
    source = (
        "TungChintao/FlowCut: flowcut/modeling_clip_flowcut.py (CLIPEncoderLayer_forward), "
        "flowcut/utils_flowcut.py (compute_score, adaptive_prune_ratio)"
    )

    def check(self, vlm):
        require_llava_tower(vlm, self.name)
        require_cls(vlm, self.name, "its score and its entropy read the [CLS] attention and value")
        fl = vision_layer_index(vlm, feature_layer_or(vlm, self.params["feature_layer"], self.name, "feature_layer"))
        if fl < 1:
            n = len(vlm.vision_layers)
            raise NotApplicable(
                self.name,
                vlm.family,
                f"model {getattr(vlm, 'name', '?')!r}: its feature layer is vision layer {fl} of {n}, and FlowCut "
                "prunes after the blocks BEFORE it (the last step one block before, where rpl = 0), so no block is "
                "left to prune in — too few tower layers for its layer choice (needs a feature layer >= 1; "
                "pass feature_layer= on a deeper tower)",
            )

    def select(self, ctx, n_keep):
        vlm = ctx.vlm
        fl = vision_layer_index(vlm, feature_layer_or(vlm, self.params["feature_layer"], self.name, "feature_layer"))
        crops = vlm.adapter.vision_crops(vlm.model, ctx.batch.inputs)
        if per_crop(ctx):
            return self.select_anyres(ctx, n_keep, fl, crops)
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

    def select_anyres(self, ctx, n_keep, fl, pixels):
        """Per crop (module doc, "Anyres"); also right for single-crop samples of the batch."""
        vlm = ctx.vlm
        out = PerCropResults()
        for lay, n in zip(ctx.layouts, n_keep):
            crops = crop_tokens(lay, vlm.family, self.name)
            V = lay.n_image_tokens
            sc = np.full(V, np.nan)
            outputs = []
            for ct, b in zip(crops, split_budget(n, [len(ct) for ct in crops])):
                if b == 0:
                    outputs.append((np.zeros(0, dtype=np.int64), None))
                    continue
                pixel = pixels[ct.crop : ct.crop + 1]
                n_patches = _tower_patches(vlm)
                lm = torch.zeros(n_patches + 1, dtype=torch.bool)
                lm[torch.as_tensor(ct.vpos)] = True
                target = b + 1 + (n_patches - len(ct))  # [CLS] + share + patches unpadded away
                st = run_tower(
                    vlm,
                    pixel,
                    fl,
                    lambda li, s, t=target, lm=lm, b=b: flowcut_step(s, li, fl, t, lm=lm, final=b),
                    want_cls=True,
                    where="block",
                )
                vp = (st.source[0, 1:] > 0).float().argmax(1).cpu().numpy()  # kept patches' vpos
                if not lm[torch.as_tensor(vp)].all() or len(vp) != b:
                    raise RuntimeError(f"flowcut: crop {ct.crop} kept {len(vp)} patches, not {b} reaching the LM")
                tok = ct.tokens[np.searchsorted(ct.vpos, vp)]
                order = np.argsort(tok, kind="stable")
                if st.extra and st.extra.get("cum") is not None:
                    sc[tok] = st.extra["cum"][0].float().cpu().numpy()
                outputs.append((tok[order], project(vlm, st.x[0, 1:])[torch.as_tensor(order)]))
            out.add(lay, crops, outputs, sc)
        return out.selection()


def _tower_patches(vlm) -> int:
    """Patches of one crop's tower sequence (no [CLS])."""
    tower = vlm.adapter.vision_tower(vlm.model)
    return int(getattr(tower, "vision_model", tower).embeddings.num_patches)
