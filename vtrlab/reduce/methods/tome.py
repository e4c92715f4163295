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
to that slot (a partition: every patch is in exactly one token). LLaVA-family towers.
``feature_layer=None`` (default): the layer whose output the model's projector receives
(LLaVA-1.5 / NeXT: ``-2``; LLaVA-OneVision: ``-1``).

Anyres (LLaVA-NeXT / LLaVA-OneVision base view + tiles): ToMe has no anyres code (it is a ViT
method); vtrlab applies it per crop, each crop's tower sequence merged on its own (the [CLS] of a
CLIP crop protected, SigLIP crops have none), the budget ``n`` split over the crops in proportion
to their image tokens (largest remainder). The tower merges every patch it runs on, including those
the model then unpads away (LLaVA-NeXT's padding rows/columns of the tile grid); a merged token
reaches the LM iff it holds at least one patch that does (tokens of padding only are unpadded away),
and sits in the slot of its first such patch. With ``r=0`` the schedule's total removal per crop is
the one that leaves exactly the crop's share of LM-reaching tokens (searched from "padding stays
unmerged" upwards; an error names the crop if no schedule does); the merged features keep the
padding patches they absorbed. Tiles' tokens sit in their own slots (raster order of the grid, the
model's newline tokens kept).
"""

from __future__ import annotations

import numpy as np
import torch

from ..context import vision_layer_index
from ..registry import Method, Selection, register
from ..scoring import tome_match, tome_merge, tome_schedule
from ..stages.tower import TowerState, run_tower
from ._vision import (
    PerCropResults,
    crop_tokens,
    per_crop,
    project,
    require_llava_tower,
    single_crop,
    split_budget,
)


@register("tome")
class ToMe(Method):
    stage = "tower"
    positions = "renumbered"
    merges = True
    defaults = {"r": 0, "proportional": True, "feature_layer": None}
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

    def feature_layer(self, vlm) -> int:
        fl = self.params["feature_layer"]
        if fl is None:
            return int(vlm.adapter.vision_feature_layer(vlm.model))
        if isinstance(fl, bool) or not isinstance(fl, (int, np.integer)):
            raise TypeError(f"tome: feature_layer={fl!r}; accepted: None (the model's) or an int vision layer")
        return vision_layer_index(vlm, int(fl))

    def select(self, ctx, n_keep):
        vlm = ctx.vlm
        fl = self.feature_layer(vlm)
        crops = vlm.adapter.vision_crops(vlm.model, ctx.batch.inputs)
        has_cls = bool(vlm.has_cls)
        drop = int(vlm.adapter.features_drop_cls(vlm.model))
        if not has_cls or per_crop(ctx):
            return self.select_anyres(ctx, n_keep, fl, crops, has_cls, drop)
        keep, scores, embeds, groups = [], [], [], []
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crop, order = single_crop(lay, vlm.family, self.name) if has_cls else (None, None)
            V = lay.n_image_tokens
            n0 = V + int(has_cls)
            sched = self.schedule(n0, n + int(has_cls), fl + 1, int(has_cls))

            st = run_tower(
                vlm, crops[crop : crop + 1], fl, _merger(sched, has_cls), proportional=bool(self.params["proportional"])
            )
            feats = st.x[0, drop:]
            members = (st.source[0, drop:, int(has_cls) :] > 0).cpu()  # (tokens, V) patches in vpos order
            first = members.float().argmax(1).numpy()  # first patch of each token
            rep = order[first]
            srt = np.argsort(rep, kind="stable")
            mask = np.zeros(V, dtype=bool)
            mask[rep] = True
            g = np.full(V, -1, dtype=np.int64)
            tok_of_patch = members.float().argmax(0).numpy()
            g[order] = rep[tok_of_patch]
            proj = project(vlm, feats)
            keep.append(mask)
            scores.append(_sizes(V, rep, st.size[0, drop:, 0].float().cpu().numpy()))
            groups.append(g)
            embeds.append(proj[torch.as_tensor(srt, device=proj.device)])
        return Selection(keep=keep, scores=scores, embeds=embeds, group=groups, info={"scores": "merged size"})

    def _run_crop(self, vlm, pixel, fl, has_cls, drop, sched):
        """ToMe with schedule ``sched`` on the crops ``pixel`` (B, ...), one batched tower pass: per crop
        (features, sizes, membership); every crop of the batch merges on its own (batched matching)."""
        st = run_tower(vlm, pixel, fl, _merger(sched, has_cls), proportional=bool(self.params["proportional"]))
        size = st.size[:, drop:, 0].float().cpu()  # one transfer for the batch; membership on the host
        members = (st.source[:, drop:] > 0).cpu()
        return [(st.x[j, drop:], size[j], members[j]) for j in range(st.x.shape[0])]

    def select_anyres(self, ctx, n_keep, fl, pixels, has_cls, drop):
        """Per crop (module doc, "Anyres"); also right for single-crop samples of the batch."""
        vlm = ctx.vlm
        out = PerCropResults()
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crops = crop_tokens(lay, vlm.family, self.name)
            V = lay.n_image_tokens
            sc, g = np.full(V, np.nan), np.full(V, -1, dtype=np.int64)
            outputs = []
            shares = split_budget(n, [len(ct) for ct in crops])
            merged = self._merge_crops(vlm, pixels, fl, has_cls, drop, crops, shares)
            for ct, b in zip(crops, shares):
                if b == 0 and int(self.params["r"]) == 0:
                    outputs.append((np.zeros(0, dtype=np.int64), None))
                    continue
                feats, size, members = merged[ct.crop]
                lm = members[:, torch.as_tensor(ct.vpos)]  # (tokens, LM patches of the crop, vpos order)
                reach = lm.any(1)
                first = lm.float().argmax(1)[reach].numpy()  # first LM patch of each reaching token (host)
                order = np.argsort(first, kind="stable")
                slots = ct.tokens[first[order]]
                tok_of = lm[reach].float().argmax(0).numpy()  # LM patch -> reaching token
                g[ct.tokens] = ct.tokens[first[tok_of]]
                sc[slots] = size[reach].numpy()[order]
                rows = torch.as_tensor(np.flatnonzero(reach.numpy())[order], device=feats.device)
                outputs.append((slots, project(vlm, feats[rows])))
            out.add(lay, crops, outputs, sc, g)
        return out.selection(scores="merged size (tower tokens, padding included)")

    def _first_removal(self, vlm, has_cls, ct, b) -> int:
        """The total removal the search of :meth:`_crop_merge` tries first (0 with a constant r)."""
        if int(self.params["r"]) > 0:
            return 0
        N0 = _tower_tokens(vlm)
        return max(0, N0 - int(has_cls) - b - (N0 - int(has_cls) - len(ct)))

    def _merge_crops(self, vlm, pixels, fl, has_cls, drop, crops, shares) -> dict:
        """:meth:`_crop_merge` of every crop with a share (or constant r), crop -> (features, sizes,
        membership). The crops whose first try has the same schedule go through the tower together
        (one batched pass: ToMe's matching is per sequence); a crop whose first try does not leave
        its share continues the search on its own."""
        N0 = _tower_tokens(vlm)
        todo: dict[int, list] = {}
        for ct, b in zip(crops, shares):
            if b == 0 and int(self.params["r"]) == 0:
                continue
            todo.setdefault(self._first_removal(vlm, has_cls, ct, b), []).append((ct, b))
        out = {}
        for R, group in todo.items():
            sched = self.schedule(N0, N0 - R, fl + 1, int(has_cls))
            idx = torch.as_tensor([ct.crop for ct, _ in group], device=pixels.device)
            for (ct, b), first in zip(group, self._run_crop(vlm, pixels[idx], fl, has_cls, drop, sched)):
                out[ct.crop] = self._crop_merge(vlm, pixels[ct.crop : ct.crop + 1], fl, has_cls, drop, ct, b, first)
        return out

    def _crop_merge(self, vlm, pixel, fl, has_cls, drop, ct, b, first=None):
        """ToMe on one crop, leaving ``b`` tokens that hold an LM patch (``r=0``) or with constant r.
        ``first``: the result of the first try (removal :meth:`_first_removal`), if already run."""
        lm_idx = torch.as_tensor(ct.vpos)
        N0 = _tower_tokens(vlm)

        def reached(R):
            if first is not None and R == self._first_removal(vlm, has_cls, ct, b):
                out = first
            else:
                sched = self.schedule(N0, N0 - R, fl + 1, int(has_cls))
                out = self._run_crop(vlm, pixel, fl, has_cls, drop, sched)[0]
            return out, int(out[2][:, lm_idx].any(1).sum())

        if int(self.params["r"]) > 0:
            return first if first is not None else reached(0)[0]
        pad = N0 - int(has_cls) - len(ct)
        lo = R = max(0, N0 - int(has_cls) - b - pad)
        while True:
            out, K = reached(R)
            if K == b:
                return out
            if K > b:
                lo, R = R, R + (K - b)
                continue
            for R2 in range(lo + 1, R):
                out, K = reached(R2)
                if K == b:
                    return out
            raise RuntimeError(
                f"tome: no merge schedule leaves exactly {b} tokens holding image patches of crop {ct.crop} "
                f"(between {lo} and {R} merges); give another budget"
            )


def _merger(sched: list[int], has_cls: bool):
    """The ``between`` hook of ToMe with schedule ``sched``: match on the block's keys, then merge the
    size-weighted features, the sizes and the membership in one scatter (ToMe's ``merge_wavg`` and
    ``merge_source``: membership is 0/1 and disjoint, so its sum is ToMe's amax)."""

    def between(layer, st):
        r = sched[layer]
        if r == 0:
            return st
        m = tome_match(st.metric, r, protect_first=has_cls)
        D = st.x.shape[-1]
        both = tome_merge(torch.cat([st.x * st.size, st.size, st.source], dim=-1), m)
        size = both[..., D : D + 1]
        return TowerState(x=both[..., :D] / size, size=size, source=both[..., D + 1 :])

    return between


def _tower_tokens(vlm) -> int:
    """Tokens of one crop's tower sequence (patches + [CLS] where there is one)."""
    emb = getattr(vlm.adapter.vision_tower(vlm.model), "vision_model", vlm.adapter.vision_tower(vlm.model)).embeddings
    return int(emb.num_positions)


def _sizes(V: int, rep: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Per layout token: the size of the merged token whose slot it is (NaN for merged-away tokens)."""
    out = np.full(V, np.nan)
    out[rep] = size
    return out
