"""HiRED: an anyres budget split between the global view and the sub-images by early attention.

Source: hasanar1f/HiRED — ``transformers/src/transformers/models/llava_next/modeling_llava_next.py``
(``HiRED_token_selection``, ``HiRED_sub_img_budgets``; vision layers 0 and 22 hooked; heads summed;
``accuracy_benchmarks/*.sh``: ``token_budget_rate=0.2``, ``alpha=0.5``). Budget
B = int(crops · V · rate); the global view keeps min(int(B·α), V) tokens by layer-22 [CLS]
attention; the sub-images share the rest in proportion to how many of the global view's layer-0
top int(V·(1−α)) tokens fall in each of ``crops − 1`` **consecutive raster chunks** of the global
view (the code's ``reshape``, not spatial quadrants), floored; each sub-image keeps its own top-k
by layer-22 attention. Tokens are selected per crop *before* unpadding; unpadded-away tokens are
gone anyway and newline tokens always stay, so fewer than B tokens may reach the LM (the record's
``budget`` is what really does; ``exact_budget`` is False). Positions renumbered (the kept
features are packed into the sequence).

vtrlab specifics: ``budget_rate=0`` (default) takes the rate from the requested keep
(``n_keep / n_image_tokens``); a positive value overrides it. LLaVA-NeXT-style anyres towers with a
[CLS] only; one image per sample.
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import Method, NotApplicable, Selection, register
from ..scoring import hired_select
from ._vision import crop_attention, one_to_one, prefetch_attention, require_cls


@register("hired")
class HiRED(Method):
    stage = "projector"
    positions = "renumbered"
    merges = False
    exact_budget = False
    defaults = {"budget_rate": 0.0, "alpha": 0.5, "early_layer": 0, "vision_layer": -2}
    source = "hasanar1f/HiRED: transformers/.../llava_next/modeling_llava_next.py::HiRED_token_selection"

    def check(self, vlm):
        require_cls(vlm, self.name, "it ranks by [CLS] attention")
        if vlm.family not in ("llava_next",):
            raise NotApplicable(
                self.name, vlm.family, "it splits an anyres budget between LLaVA-NeXT's global view and its sub-images"
            )
        if not 0.0 <= float(self.params["alpha"]) <= 1.0:
            raise ValueError(f"hired: alpha={self.params['alpha']}; accepted: a float in [0, 1]")

    def select(self, ctx, n_keep):
        vlm = ctx.vlm
        prefetch_attention(ctx, [int(self.params["early_layer"]), int(self.params["vision_layer"])])
        keep, scores = [], []
        for i, (lay, n) in enumerate(zip(ctx.layouts, n_keep)):
            crop, vpos = one_to_one(lay, vlm.family, self.name)
            vis = lay.vision
            crops = sorted(int(c) for c in vis["crop"].unique())
            if len(set(lay.image[lay.kind == "image"])) != 1:
                raise NotApplicable(self.name, vlm.family, "HiRED selects within one image; this sample holds several")
            rate = float(self.params["budget_rate"]) or n / lay.n_image_tokens
            early = torch.stack([crop_attention(ctx, int(self.params["early_layer"]), i, c) for c in crops])
            late = torch.stack([crop_attention(ctx, int(self.params["vision_layer"]), i, c) for c in crops])
            m_crop = hired_select(early, late, (len(crops) - 1, 1), budget_rate=rate, alpha=float(self.params["alpha"]))
            ci = np.searchsorted(crops, crop)
            keep.append(m_crop.numpy()[ci, vpos - 1])
            scores.append(late.sum(1).numpy()[ci, vpos - 1])
        return Selection(keep=keep, scores=scores)
