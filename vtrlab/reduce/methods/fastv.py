"""FastV: at LM layer K, drop the image tokens the last prompt token attended least at layer K-1.

Source: pkunlp-icler/FastV, ``src/FastV/llava-hf/.../modeling_llama.py`` (the HF-LLaVA port).
The code scores with the attention **of the last prompt token** (row -1 of layer K-1's softmax,
head mean) over the image tokens and keeps the top ones; the paper describes the average over
all tokens (FastV issue #14). Prunes before layer K (paper K=2; the HF demo's ``fastv_k=3``
reads layer 2's attention): ``layer`` here is K, the first layer that runs without the dropped
tokens. Position ids: kept (the original ones). Default budget: R=50% dropped (``keep=0.5``).
Paper/code defaults assume a 32-layer LM; tiny test models need ``layer=1``.
"""

from __future__ import annotations

from ..registry import register
from ..stages.lm import LMMethod


@register("fastv")
class FastV(LMMethod):
    positions = "kept"
    merges = False
    needs_prev_rows = True
    defaults = {"layer": 2}
    source = "pkunlp-icler/FastV src/FastV/llava-hf/.../modeling_llama.py (last-token row; paper: all tokens)"

    def lm_layers(self, vlm):
        return [int(self.params["layer"])]

    def lm_score(self, probe, stage):
        return probe.image_scores(probe.prev_rows().mean(1))
