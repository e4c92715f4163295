"""VisPruner: half the budget by [CLS] attention, the other half by removing near-duplicates.

Source: Theia-4869/VisPruner — ``llava/model/llava_arch.py::encode_images``: head-mean [CLS]
attention of the selected vision layer (``-2``, layer 22 of CLIP-L); the top
``int(T · important_ratio)`` tokens (``important_ratio = 0.5``) are kept; the rest of the ranking
is deduplicated on the same layer's normalised patch features (before the projector): split into
even/odd positions of the ranking, drop the ``min(8, excess)`` even-position tokens most similar
to any odd-position token, repeat until ``T − important`` remain. Kept tokens stay in raster order
and the sequence is rebuilt with ``arange`` positions (renumbered). Budgets 64 / 128 / 192 of 576.
Where vtrlab differs: anyres images (LLaVA-NeXT) — the code keeps T per crop; vtrlab ranks a
sample's image tokens together so the budget is exact.

Towers without a [CLS] (SigLIP in LLaVA-OneVision / Idefics3 / SmolVLM / Gemma3, Qwen's ViT): the
substitute is the **mean attention each patch receives** (head mean; VisPruner issue #1 and
ModelTC/LightCompress ``token_reduction/vispruner.py``'s Qwen2.5-VL port), read at ``no_cls_layer``
(default ``-1``, the last block, as that port reads it), averaged over the patches an LM token
covers (pooled as the merger pools). Where LM tokens and tower patches are 1:1 in a LLaVA-family
tower (OneVision) the duplicates are found on that layer's patch features as above; elsewhere
(tokens that merge several patches) on the projector outputs — the LM input embeddings, as the
Qwen2.5-VL port does — and the kept tokens keep their position ids (the port slices
``position_ids``; renumbering is undefined for mRoPE).
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import Method, Selection, register
from ..scoring import vispruner_select
from ._vision import hidden_module, layer_hidden, one_to_one, scoring_device, token_attention, vision_forward

LLAVA_TOWERS = ("llava", "llava_next", "llava_onevision")


@register("vispruner")
class VisPruner(Method):
    stage = "projector"
    positions = "renumbered"
    merges = False
    defaults = {"vision_layer": -2, "important_ratio": 0.5, "no_cls_layer": -1}
    source = (
        "Theia-4869/VisPruner: llava/model/llava_arch.py::encode_images; no [CLS]: mean attention received "
        "(VisPruner issue #1, ModelTC/LightCompress token_reduction/vispruner.py Qwen2.5-VL port)"
    )

    def check(self, vlm):
        r = float(self.params["important_ratio"])
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"vispruner: important_ratio={r}; accepted: a float in [0, 1]")
        # tower features per patch (LLaVA towers) or the LM input embeddings (towers whose tokens merge patches)
        self.on_embeds = vlm.family not in LLAVA_TOWERS
        self.positions = "kept" if self.on_embeds else "renumbered"

    def layer(self, vlm) -> int:
        return int(self.params["vision_layer"] if vlm.has_cls else self.params["no_cls_layer"])

    def select(self, ctx, n_keep):
        layer = self.layer(ctx.vlm)
        dev = scoring_device(ctx)  # the dedup loop's cosines (float64) run where the model runs
        if getattr(self, "on_embeds", False):
            vision_forward(ctx, attention=[layer])
            scores = token_attention(ctx, layer, "mean")
            keep = []
            for i, (lay, k) in enumerate(zip(ctx.layouts, n_keep)):
                feats = ctx.image_embeds(i).to(dev).double()
                a = torch.as_tensor(scores[i], device=dev)
                idx = vispruner_select(a, feats, k, float(self.params["important_ratio"]))
                m = np.zeros(lay.n_image_tokens, dtype=bool)
                m[idx.cpu().numpy()] = True
                keep.append(m)
            return Selection(
                keep=keep,
                scores=[np.asarray(s) for s in scores],
                info={"signal": "mean attention received (no [CLS])", "duplicates_on": "projector outputs"},
            )
        vision_forward(ctx, attention=[layer], tensors=dict([hidden_module(ctx.vlm, layer)]))
        scores = token_attention(ctx, layer, "mean")
        hidden = layer_hidden(ctx, layer)
        keep = []
        for i, (lay, k) in enumerate(zip(ctx.layouts, n_keep)):
            crop, vpos = one_to_one(lay, ctx.vlm.family, self.name)
            feats = hidden.to(dev)[torch.as_tensor(crop, device=dev), torch.as_tensor(vpos, device=dev)].double()
            a = torch.as_tensor(scores[i], device=dev)
            idx = vispruner_select(a, feats, k, float(self.params["important_ratio"]))
            m = np.zeros(lay.n_image_tokens, dtype=bool)
            m[idx.cpu().numpy()] = True
            keep.append(m)
        return Selection(keep=keep, scores=[np.asarray(s) for s in scores])
