"""VTC-CLS: keep the tokens with the largest [CLS] attention summed over vision layers.

Source: THU-MIG/VTC-CLS — ``llava/model/multimodal_encoder/clip_encoder.py::cls_token_only``
(Σ over ``attentions[start_layer:-1]`` of the head-mean [CLS]→patch attention, i.e. layers
``start_layer`` .. 22 of CLIP-L's 24) and ``llava/model/llava_arch.py::encode_images`` (top
``token_num``, re-sorted into raster order, features concatenated: positions renumbered).
``start_layer`` and ``token_num`` are command-line arguments of its scripts (no default in the
code); vtrlab's default ``start_layer=0`` sums every layer up to the second-to-last.
Towers without a [CLS] use the mean attention each patch receives (see ``fastervlm``).
"""

from __future__ import annotations

import numpy as np

from ..context import top_k_mask, vision_layer_index
from ..registry import Method, Selection, register
from ._vision import prefetch_attention, token_attention


@register("vtc_cls")
class VTCCLS(Method):
    stage = "projector"
    positions = "renumbered"
    merges = False
    defaults = {"start_layer": 0, "end_layer": -2}
    source = "THU-MIG/VTC-CLS: clip_encoder.py::cls_token_only, llava_arch.py::encode_images"

    def layers(self, vlm) -> list[int]:
        lo = vision_layer_index(vlm, int(self.params["start_layer"]))
        hi = vision_layer_index(vlm, int(self.params["end_layer"]))
        if lo > hi:
            raise ValueError(
                f"vtc_cls: start_layer={self.params['start_layer']} is after end_layer="
                f"{self.params['end_layer']} (vision layers {lo} > {hi})"
            )
        return list(range(lo, hi + 1))

    def check(self, vlm):
        self.layers(vlm)

    def select(self, ctx, n_keep):
        layers = self.layers(ctx.vlm)
        prefetch_attention(ctx, layers)
        per_layer = [token_attention(ctx, layer, "mean") for layer in layers]
        scores = [np.sum([p[i] for p in per_layer], axis=0) for i in range(len(ctx.layouts))]
        keep = [top_k_mask(s, k) for s, k in zip(scores, n_keep)]
        return Selection(keep=keep, scores=scores)
