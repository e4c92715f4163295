"""FasterVLM: keep the image tokens the vision [CLS] attends to most.

Source: Theia-4869/FasterVLM — ``llava/model/multimodal_encoder/clip_encoder.py::feature_select``
(``attentions[select_layer][:, :, 0, 1:]``, ``select_layer = -2``: layer 22 of CLIP-L's 24) and
``llava/model/llava_arch.py::encode_images`` (head mean, ``topk(visual_token_num)``, index mask;
kept tokens in raster order). Defaults: ``vision_layer=-2`` (LLaVA's convention: the
second-to-last layer, whatever the tower's depth); budgets 144 / 58 / 29 of 576 in the paper.

Positions: the LLaVA code concatenates the kept features into the sequence and rebuilds
``position_ids`` as ``arange`` (``prepare_inputs_labels_for_multimodal``), so they are renumbered.
Where code and vtrlab differ: for anyres images (LLaVA-NeXT) the code keeps T tokens per crop before
unpadding; vtrlab ranks all of a sample's image tokens together so the budget is exact. Towers
without a [CLS] (SigLIP, Qwen2-VL) use the field's substitute: the mean attention each patch
receives, averaged over the patches an LM token covers (VisPruner issue #1, LightCompress).
"""

from __future__ import annotations

import numpy as np

from ..context import top_k_mask
from ..registry import Method, Selection, register
from ._vision import token_attention


@register("fastervlm")
class FasterVLM(Method):
    stage = "projector"
    positions = "renumbered"
    merges = False
    defaults = {"vision_layer": -2}
    source = "Theia-4869/FasterVLM: clip_encoder.py::feature_select, llava_arch.py::encode_images"

    def check(self, vlm):
        _ = vlm.vision_layers  # every family has a tower; no-[CLS] towers use the mean-received substitute

    def select(self, ctx, n_keep):
        scores = token_attention(ctx, int(self.params["vision_layer"]), "mean")
        keep = [top_k_mask(s, k) for s, k in zip(scores, n_keep)]
        return Selection(keep=keep, scores=[np.asarray(s) for s in scores])
