"""VisionZip: dominant tokens by summed [CLS] attention, plus contextual tokens merged by key similarity.

Source: dvlab-research/VisionZip — ``visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward``
(layer ``-2``: ``attentions[-2]``, ``hidden_states[-2]`` and that layer's raw keys averaged over
heads, ``utils.py::CLIPAttention_forward``), ``visionzip/main.py`` (``dominant - 1`` patches go to the
tower: the [CLS] token itself is the remaining dominant token). Released budgets: 54+10 / 108+20 /
162+30 (dominant incl. [CLS] + contextual) for 64 / 128 / 192 tokens; vtrlab splits any budget
in the same proportion (contextual = round(n · 10/64)) unless ``dominant``/``contextual`` are given.
Heads are **summed** for the ranking. Contextual: the remaining patches (raster order), targets
evenly spaced, every other remaining patch assigned to its most key-similar target; a target's
token is its own feature plus the mean of those assigned. Merging is in tower-feature space;
the projector is applied afterwards, as the code does. LM order: [CLS], dominant (raster),
contextual (raster); positions renumbered (the features are concatenated).

vtrlab specifics: the kept image-token slots (layout order) receive the method's tokens in the
method's LM order, so with renumbered positions the LM sees exactly the code's sequence. The
[CLS] token VisionZip sends first is no layout token: it is inserted before the first kept image
token (``Selection.info["extra"]``, the keep path's ``extra=``), so the LM receives exactly ``n``
tokens: the [CLS], ``dominant − 1`` patches and ``contextual`` merged tokens; the record's
``budget`` counts the ``n − 1`` layout tokens kept (``cls_token=False`` spends the [CLS] slot on one
more dominant patch).

Anyres (LLaVA-NeXT: a base view and tiles, each its own CLIP sequence with its own [CLS]) follows
the code's LLaVA-NeXT path (``visionzip/llava_arch.py::prepare_inputs_labels_for_multimodal_visionzip``,
``restore_image_features_sorted``): the single-crop selection and merge run **per crop**, each crop
sending its own [CLS], dominant and contextual tokens. The code gives every crop the same
(dominant, contextual); vtrlab splits the budget ``n`` over the crops in proportion to each crop's
image tokens (largest remainder; equal when no patch is unpadded away, as in the code, where every
crop has 576) and each crop's share ``n_c`` into ``dominant + contextual`` as above (the crop's
[CLS] counts in its dominant part), so the LM receives exactly ``n`` tokens. The base view keeps the
code's order ([CLS], dominant, contextual; its [CLS] inserted before its run of tokens). The code
then lays the tiles' dominant tokens out in raster order of the whole grid (as vtrlab does: each in
its own slot), appends the tiles' [CLS] tokens, then their contextual tokens. Where vtrlab differs:
(a) the code neither unpads the grid nor adds newline tokens; vtrlab keeps the model's layout —
patches unpadded away by the model are no candidates (neither dominant nor merged: they never reach
the LM) and the newline tokens stay, as in every keep path; (b) so that the newlines stay at row
ends, each tile's contextual token sits in its target's slot (raster order) instead of after the
[CLS] tokens; the tiles' [CLS] tokens follow the grid's last image token, in tile order.

Towers without a [CLS] (SigLIP in LLaVA-OneVision / Idefics3 / SmolVLM / Gemma3, Qwen's ViT): the
substitute follows ModelTC/LightCompress ``token_reduction/visionzip.py``'s Qwen2.5-VL port — the
dominant tokens are the top ``n − C`` by the **mean attention each patch receives** at
``no_cls_layer`` (default ``-1``, the last block, as the port reads it; head mean), averaged over
the patches an LM token covers (pooled as the merger pools); the metric for the contextual
assignment is that layer's head-mean keys pooled the same way (the port's keys are after the
vision RoPE; here before it, ``k_proj`` / the key third of ``qkv``); contextual tokens are merged
in the LM input-embedding space (projector outputs: target + mean(assigned), as the port does)
and sit in their target's slot; no [CLS] token is sent, all of a sample's image tokens are ranked
together, and the kept tokens keep their position ids (the port slices ``position_ids``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import Method, Selection, register
from ..scoring import visionzip_merge, visionzip_split
from ._vision import (
    PerCropResults,
    crop_attention,
    crop_tokens,
    feature_layer_or,
    heads_mean,
    hidden_module,
    layer_hidden,
    layer_keys,
    layer_proj,
    n_vision_heads,
    per_crop,
    proj_module,
    project,
    scoring_device,
    single_crop,
    split_budget,
    token_attention,
    token_vectors,
    vision_forward,
)


@register("visionzip")
class VisionZip(Method):
    stage = "projector"
    positions = "renumbered"
    merges = True
    exact_budget = False
    defaults = {"vision_layer": None, "dominant": 0, "contextual": 0, "cls_token": True, "no_cls_layer": -1}
    source = (
        "dvlab-research/VisionZip: visionzip/clip_encoder.py, visionzip/utils.py, visionzip/main.py; no [CLS]: "
        "ModelTC/LightCompress llmc/compression/token_reduction/visionzip.py (Qwen2.5-VL port)"
    )

    def check(self, vlm):
        self.no_cls = not vlm.has_cls
        self.positions = "kept" if self.no_cls else "renumbered"
        if (int(self.params["dominant"]) > 0) != (int(self.params["contextual"]) > 0):
            raise ValueError("visionzip: give both dominant and contextual (> 0), or neither (split from the budget)")

    def split(self, n: int) -> tuple[int, int]:
        if int(self.params["dominant"]) > 0:
            return int(self.params["dominant"]), int(self.params["contextual"])
        return visionzip_split(n)

    def select(self, ctx, n_keep):
        if getattr(self, "no_cls", False):
            return self.select_no_cls(ctx, n_keep)
        vlm = ctx.vlm
        layer = feature_layer_or(vlm, self.params["vision_layer"], self.name, "vision_layer")
        needs = dict([hidden_module(vlm, layer), proj_module(vlm, layer, "k_proj", self.name)])
        vision_forward(ctx, attention=[layer], tensors=needs)
        hidden = layer_hidden(ctx, layer)
        keys = layer_proj(ctx, layer, "k_proj")
        heads = n_vision_heads(vlm, layer)
        use_cls = bool(self.params["cls_token"])
        dev = scoring_device(ctx)  # the merge runs where the model runs (float64), one copy back per crop
        if per_crop(ctx):
            return self.select_anyres(ctx, n_keep, hidden, keys, heads, use_cls)
        keep, scores, embeds, groups, extra = [], [], [], [], []
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crop, order = single_crop(lay, vlm.family, self.name)
            dominant, contextual = self.split(n)
            attn = crop_attention(ctx, layer, i, crop).to(dev)
            h = hidden[crop].to(dev).double()
            kk = heads_mean(keys[crop].to(dev).double(), heads)
            if not use_cls:
                h, kk = h[1:], kk[1:]
            res = visionzip_merge(attn, h, kk, dominant, contextual, has_cls=use_cls)
            V = lay.n_image_tokens
            src, gv, sc = (t.cpu().numpy() for t in (res.sources, res.group, res.scores))
            patch_rows = np.flatnonzero(src >= 0)
            m = np.zeros(V, dtype=bool)
            m[order[src[patch_rows]]] = True
            g = np.full(V, -1, dtype=np.int64)
            g[order] = np.where(gv >= 0, order[np.clip(gv, 0, None)], -1)
            s = np.zeros(V)
            s[order] = sc
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
            info={"extra": [("start", e) for e in extra], "embeds_order": "method (LM) order"},
        )

    def select_anyres(self, ctx, n_keep, hidden, keys, heads, use_cls):
        """Per crop (module doc, "Anyres"); also right for single-crop samples of the batch."""
        vlm = ctx.vlm
        dev = scoring_device(ctx)
        layer = feature_layer_or(vlm, self.params["vision_layer"], self.name, "vision_layer")
        if int(self.params["dominant"]) > 0:
            raise ValueError(
                "visionzip: dominant/contextual are per-sample counts of one crop; on anyres samples give the "
                "budget (keep=) and vtrlab splits it over the crops"
            )
        out = PerCropResults()
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crops = crop_tokens(lay, vlm.family, self.name)
            V = lay.n_image_tokens
            s, g = np.zeros(V), np.full(V, -1, dtype=np.int64)
            outputs = []
            for ct, n_c in zip(crops, split_budget(n, [len(ct) for ct in crops])):
                attn = crop_attention(ctx, layer, i, ct.crop)[:, ct.columns]
                s[ct.tokens] = attn.sum(0).numpy()
                if n_c == 0:
                    outputs.append((np.zeros(0, dtype=np.int64), None))
                    continue
                rows = torch.as_tensor(np.concatenate([[0], ct.vpos]) if use_cls else ct.vpos, device=dev)
                h = hidden[ct.crop].to(dev).double()[rows]
                kk = heads_mean(keys[ct.crop].to(dev).double(), heads)[rows]
                res = visionzip_merge(attn.to(dev), h, kk, *visionzip_split(n_c), has_cls=use_cls)
                src, gv = res.sources.cpu().numpy(), res.group.cpu().numpy()
                g[ct.tokens] = np.where(gv >= 0, ct.tokens[np.clip(gv, 0, None)], -1)
                outputs.append((np.where(src >= 0, ct.tokens[np.clip(src, 0, None)], -1), project(vlm, res.embeds)))
            out.add(lay, crops, outputs, s, g)
        return out.selection(extra=True)

    def select_no_cls(self, ctx, n_keep):
        """The substitute on towers without a [CLS] (module doc): LM-embedding space, kept positions."""
        vlm = ctx.vlm
        layer = int(self.params["no_cls_layer"])
        vision_forward(ctx, attention=[layer])
        attn = token_attention(ctx, layer, "mean")
        keys = layer_keys(ctx, layer, self.name)
        heads = n_vision_heads(vlm, layer)
        keep, scores, embeds, groups = [], [], [], []
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            dominant, contextual = self.split(n)
            if dominant + contextual != n and int(self.params["dominant"]) == 0:
                raise RuntimeError(f"visionzip: split {dominant}+{contextual} != budget {n}")
            kk = heads_mean(token_vectors(ctx, keys, i), heads)
            emb = ctx.image_embeds(i).double().cpu()
            a = torch.as_tensor(attn[i], dtype=torch.float64)[None]
            res = visionzip_merge(a, emb, kk, dominant, contextual, has_cls=False)
            V = lay.n_image_tokens
            src = res.sources.numpy()
            m = np.zeros(V, dtype=bool)
            m[src] = True
            order = np.argsort(src, kind="stable")  # kept positions: each token in its own (target's) slot
            keep.append(m)
            scores.append(np.asarray(attn[i], dtype=float))
            groups.append(res.group.numpy())
            embeds.append(res.embeds[torch.as_tensor(order)])
        return Selection(
            keep=keep,
            scores=scores,
            embeds=embeds,
            group=groups,
            info={"signal": "mean attention received (no [CLS])", "merged_in": "LM input embeddings"},
        )
