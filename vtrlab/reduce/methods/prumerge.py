"""PruMerge and PruMerge+: keep the [CLS]-attention outliers, fold the others into them.

Source: 42Shawn/LLaVA-PruMerge — ``llava/model/multimodal_encoder/clip_encoder.py``
(``token_prune_merge_advanced`` = PruMerge, ``token_prune_merge_advanced_plus`` = PruMerge+, the
one ``forward`` calls). Signal: ``q_proj``/``k_proj`` outputs of vision layer **23** (the last of
CLIP-L's 24; ``vision_layer=-1``) hooked, ``softmax(q_CLS · Kᵀ · C^-1/2)`` over the full width C
(no heads) and all 1+V tokens, patches taken. Adaptive budget: the number of patches above
Q3 + 1.5·IQR; they are taken in attention rank order (``topk``, sorted) — which is also their LM
order. PruMerge+ appends ``arange(0, 575, int(int(1/ratio)/3))`` minus the picked ones (the code
hard-codes 575 = V − 1; step clamped to ≥ 1 here). Merge on the ``hidden_states[-2]`` features
(before the projector): kept token i += Σ of the 32 most key-similar other tokens' features
weighted by their [CLS] attention (no normalisation); one extra token Σ_dropped a·x follows.
Positions renumbered (features concatenated).

vtrlab specifics: ``adaptive=True`` (the code's default) ignores the requested budget (the record
reports what was kept; ``exact_budget`` is False); ``adaptive=False`` keeps the top ``n − 1``
tokens (+ the extra token = n), PruMerge+ then fills with its grid up to that count. The extra
token is no layout token: it is inserted after the last kept image token
(``Selection.info["extra"]``, the keep path's ``extra=``). The kept slots receive the merged tokens in
the method's LM order (attention rank), so with renumbered positions the LM sees the code's
sequence. ``group``: kept tokens point to themselves; the neighbourhoods a kept token absorbs
overlap between kept tokens, so they are not a partition and are not recorded.

Anyres (LLaVA-NeXT base view + tiles): the official code has no anyres path (it hard-codes 576
patches of one crop); vtrlab applies it per crop, each crop its own CLIP sequence: the [CLS]
attention softmax runs over the crop's whole sequence (as its tower computes it), and the outlier
test, the pick, the neighbours and the extra token are over the crop's patches that reach the LM
(patches the model unpads away are no candidates). ``adaptive=True``: each crop keeps its own
outliers plus one extra token; ``adaptive=False``: the budget ``n`` is split over the crops in
proportion to their image tokens (largest remainder) and each crop's share ``n_c`` is ``n_c − 1``
tokens + its extra token (none when ``n_c = 0``), so the LM receives exactly ``n``. The base view
sends its tokens in the method's order with its extra token after them; the tiles' tokens sit in
their own slots (raster order of the grid, the model's newline tokens kept) and their extra tokens
follow the grid's last image token, in tile order.
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import Method, Selection, register
from ..scoring import iqr_outlier_count, prumerge_cls_attention, prumerge_merge, prumerge_plus_grid, rank_desc
from ._vision import (
    PerCropResults,
    crop_tokens,
    feature_layer_or,
    hidden_module,
    layer_hidden,
    layer_proj,
    per_crop,
    proj_module,
    project,
    require_cls,
    scoring_device,
    single_crop,
    split_budget,
    vision_forward,
)


@register("prumerge")
class PruMerge(Method):
    stage = "projector"
    positions = "renumbered"
    merges = True
    exact_budget = False
    plus = False
    defaults = {"vision_layer": -1, "feature_layer": None, "adaptive": True, "n_neighbors": 32}
    source = "42Shawn/LLaVA-PruMerge: llava/model/multimodal_encoder/clip_encoder.py::token_prune_merge_advanced"

    def check(self, vlm):
        require_cls(vlm, self.name, "its signal is the [CLS] query's attention")
        if int(self.params["n_neighbors"]) < 1:
            raise ValueError(f"{self.name}: n_neighbors={self.params['n_neighbors']}; accepted: an int >= 1")

    def picked(self, attn: torch.Tensor, n: int, attn_host: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_host``: ``attn`` already copied to the host (its outlier count is read there, no sync)."""
        V = attn.shape[0]
        rank = rank_desc(attn)
        outliers = iqr_outlier_count(attn if attn_host is None else attn_host)
        if bool(self.params["adaptive"]):
            ratio = outliers / V
            idx = rank[: int(V * ratio)]
            if self.plus:
                if outliers == 0:
                    raise ValueError(
                        f"{self.name}: no [CLS]-attention outliers; the code's grid step 1/ratio is undefined"
                    )
                idx = torch.cat([idx, prumerge_plus_grid(idx, ratio, V)])
            return idx
        left = max(0, n - 1)
        if not self.plus:
            return rank[:left]
        idx = rank[: min(outliers, left)]
        idx = torch.cat([idx, prumerge_plus_grid(idx, max(outliers, 1) / V, V)])[:left]
        if idx.numel() < left:
            rest = rank[~torch.isin(rank, idx)]
            idx = torch.cat([idx, rest[: left - idx.numel()]])
        return idx

    def select(self, ctx, n_keep):
        vlm = ctx.vlm
        lq = int(self.params["vision_layer"])
        lf = feature_layer_or(vlm, self.params["feature_layer"], self.name, "feature_layer")
        vision_forward(
            ctx,
            tensors=dict(
                [
                    proj_module(vlm, lq, "q_proj", self.name),
                    proj_module(vlm, lq, "k_proj", self.name),
                    hidden_module(vlm, lf),
                ]
            ),
        )
        dev = scoring_device(ctx)  # the merge (float64) runs where the model runs; one copy back per crop
        q = layer_proj(ctx, int(self.params["vision_layer"]), "q_proj").to(dev)
        k = layer_proj(ctx, int(self.params["vision_layer"]), "k_proj").to(dev)
        feats_all = layer_hidden(ctx, lf).to(dev)
        if per_crop(ctx):
            return self.select_anyres(ctx, n_keep, q, k, feats_all)
        keep, scores, embeds, groups, extra = [], [], [], [], []
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crop, order = single_crop(lay, vlm.family, self.name)
            qc, kc = q[crop].double(), k[crop].double()
            attn = prumerge_cls_attention(qc[0], kc)
            attn_host = attn.cpu()  # one copy: the scores and the outlier count
            picked = self.picked(attn, n, attn_host)
            res = prumerge_merge(attn, kc[1:], feats_all[crop][1:].double(), picked, int(self.params["n_neighbors"]))
            V = lay.n_image_tokens
            src = res.sources.cpu().numpy()
            patch_rows = np.flatnonzero(src >= 0)
            m = np.zeros(V, dtype=bool)
            m[order[src[patch_rows]]] = True
            g = np.full(V, -1, dtype=np.int64)
            g[order[src[patch_rows]]] = order[src[patch_rows]]
            s = np.zeros(V)
            s[order] = attn_host.numpy()
            proj = project(vlm, res.embeds)
            keep.append(m)
            scores.append(s)
            groups.append(g)
            embeds.append(proj[torch.as_tensor(patch_rows, device=proj.device)])
            extra.append(proj[torch.as_tensor(np.flatnonzero(src < 0), device=proj.device)])
        return Selection(
            keep=keep,
            scores=scores,
            embeds=embeds,
            group=groups,
            info={"extra": [("end", e) for e in extra], "embeds_order": "method (LM) order"},
        )

    def select_anyres(self, ctx, n_keep, q, k, feats_all):
        """Per crop (module doc, "Anyres"); also right for single-crop samples of the batch."""
        vlm = ctx.vlm
        adaptive = bool(self.params["adaptive"])
        out = PerCropResults()
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crops = crop_tokens(lay, vlm.family, self.name)
            V = lay.n_image_tokens
            s, g = np.zeros(V), np.full(V, -1, dtype=np.int64)
            shares = [None] * len(crops) if adaptive else split_budget(n, [len(ct) for ct in crops])
            # every crop's [CLS] attention first, then ONE copy to the host (scores and outlier counts read
            # there): no device sync per crop for them
            attns, keys = [], []
            for ct in crops:
                kc = k[ct.crop].double()
                cols = torch.as_tensor(ct.columns, device=kc.device)
                attns.append(prumerge_cls_attention(q[ct.crop, 0].double(), kc)[cols])
                keys.append(kc)
            host = torch.cat(attns).cpu().split([a.shape[0] for a in attns])
            merged = []
            for ct, n_c, attn, a_host, kc in zip(crops, shares, attns, host, keys):
                s[ct.tokens] = a_host.numpy()
                if n_c == 0:
                    merged.append(None)
                    continue
                picked = self.picked(attn, n_c, a_host)
                rows = torch.as_tensor(ct.vpos, device=kc.device)
                merged.append(
                    prumerge_merge(
                        attn, kc[rows], feats_all[ct.crop][rows].double(), picked, int(self.params["n_neighbors"])
                    )
                )
            done = [res for res in merged if res is not None]
            lens = [len(r.sources) for r in done]
            srcs = iter(torch.cat([r.sources for r in done]).cpu().split(lens) if done else [])
            outputs = []
            for ct, res in zip(crops, merged):
                if res is None:
                    outputs.append((np.zeros(0, dtype=np.int64), None))
                    continue
                src = next(srcs).numpy()
                tok = np.where(src >= 0, ct.tokens[np.clip(src, 0, None)], -1)
                g[tok[tok >= 0]] = tok[tok >= 0]
                outputs.append((tok, project(vlm, res.embeds)))
            out.add(lay, crops, outputs, s, g)
        return out.selection(extra=True)


@register("prumerge_plus")
class PruMergePlus(PruMerge):
    plus = True
    source = "42Shawn/LLaVA-PruMerge: llava/model/multimodal_encoder/clip_encoder.py::token_prune_merge_advanced_plus"
