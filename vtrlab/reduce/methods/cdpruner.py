"""CDPruner: a conditional DPP over the projector outputs, weighted by (negated) text relevance.

Source: Theia-4869/CDPruner — ``llava/model/llava_arch.py::encode_images`` (cosine similarity S of
the projector outputs; relevance = min–max normalised **negated** mean cosine between each
patch's CLIP image embedding and the CLIP text embeddings of the instruction; kernel
L = diag(r)·S·diag(r); greedy MAP inference for T steps; kept tokens re-sorted) and
``llava/model/multimodal_encoder/clip_encoder.py`` (image embeddings: ``visual_projection`` of
``post_layernorm`` of the feature layer's patch tokens; text: ``CLIPTextModelWithProjection`` of the
instruction, cut into segments of the text tower's context length, one embedding per segment).
Budgets 64 / 128 / 192. Positions renumbered (the kept features are concatenated).
Where vtrlab differs: the code normalises relevance over the whole batch tensor (its runs use
batch size 1); vtrlab normalises per sample so results do not depend on batching.

It needs a CLIP text tower aligned with the vision tower, which no supported family ships: attach
one as ``vlm.clip_text = (text_model, tokenizer, visual_projection)`` (a
``CLIPTextModelWithProjection``, its tokenizer, and the vision tower's ``visual_projection``);
otherwise the method is not applicable.
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import Method, NotApplicable, Selection, register
from ..scoring import cdpruner_relevance, cdpruner_select
from ._vision import layer_hidden, one_to_one, require_llava_tower


def clip_text(vlm):
    pair = getattr(vlm, "clip_text", None)
    if pair is None:
        raise NotApplicable(
            "cdpruner",
            vlm.family,
            "it needs a CLIP text tower aligned with the vision tower; this "
            "model has none (attach one as vlm.clip_text = (text_model, tokenizer, visual_projection))",
        )
    return pair


@register("cdpruner")
class CDPruner(Method):
    stage = "projector"
    positions = "renumbered"
    merges = False
    defaults = {"feature_layer": -2}
    source = "Theia-4869/CDPruner: llava/model/llava_arch.py::encode_images, multimodal_encoder/clip_encoder.py"

    def check(self, vlm):
        clip_text(vlm)
        require_llava_tower(vlm, self.name)

    def text_embeds(self, vlm, prompt: str) -> torch.Tensor:
        model, tok, _ = clip_text(vlm)
        ctx_len = int(model.config.max_position_embeddings)
        enc = tok(text=prompt, return_tensors="pt")
        ids, mask = enc["input_ids"], enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
        seg = (ids.shape[1] - 1) // ctx_len + 1
        pad = ctx_len * seg - ids.shape[1]
        ids = torch.cat([ids, ids.new_zeros(1, pad)], 1).reshape(-1, ctx_len)
        mask = torch.cat([mask, mask.new_zeros(1, pad)], 1).reshape(-1, ctx_len)
        dev = next(model.parameters()).device
        with torch.no_grad():
            return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).text_embeds

    def select(self, ctx, n_keep):
        vlm = ctx.vlm
        _, _, vis_proj = clip_text(vlm)
        tower = vlm.adapter.vision_tower(vlm.model)
        post = getattr(tower, "vision_model", tower).post_layernorm
        hidden = layer_hidden(ctx, int(self.params["feature_layer"]))
        keep, scores = [], []
        for i, (lay, k) in enumerate(zip(ctx.layouts, n_keep)):
            crop, vpos = one_to_one(lay, vlm.family, self.name)
            with torch.no_grad():
                img = vis_proj(post(hidden[torch.as_tensor(crop), torch.as_tensor(vpos)])).double()
            rel = cdpruner_relevance(img, self.text_embeds(vlm, ctx.batch.prompts[i]).double())
            idx = cdpruner_select(ctx.image_embeds(i).double(), rel, k)
            m = np.zeros(lay.n_image_tokens, dtype=bool)
            m[idx.cpu().numpy()] = True
            keep.append(m)
            scores.append(rel.cpu().numpy())
        return Selection(keep=keep, scores=scores)
