"""PyramidDrop: drop image tokens in stages inside the LM, ranked by the last instruction token.

Source: Cooperx521/PyramidDrop, ``modeling_llama_pdrop.py`` (cross-checked with ModelTC/LightCompress
``llmc/compression/token_reduction/pyramiddrop.py``). At each stage layer K (default 8, 16, 24
of LLaVA's 32) the layer's own attention of the last instruction token is recomputed on the
hidden states entering layer K — one query row, ``softmax(q_last·Kᵀ/√d)`` with RoPE, head mean —
and the image tokens with the highest weight survive into layer K. Each stage keeps λ = 0.5 of the
image tokens (576 → 288 → 144 → 72). Position ids are **renumbered** over the survivors (the code
rebuilds ``position_ids`` with ``arange`` after each drop), so RoPE distances shrink; undefined for
multi-axis (mRoPE) positions, where the method raises NotApplicable unless ``positions="kept"``.

Budget: ``keep`` is the number left after the last stage; the stages step geometrically there
(λ = keep^(1/stages): keep=0.125 over 3 stages gives the code's 0.5 per stage).
"""

from __future__ import annotations

from ..registry import NotApplicable, register
from ..stages.lm import LMMethod, uses_mrope


@register("pyramiddrop")
class PyramidDrop(LMMethod):
    positions = "renumbered"
    merges = False
    defaults = {"layers": (8, 16, 24)}
    source = "Cooperx521/PyramidDrop modeling_llama_pdrop.py (last instruction token, head mean, renumbered)"

    def check(self, vlm):
        if uses_mrope(vlm) and self.params.get("positions") != "kept":
            why = "renumbered position ids are undefined for mRoPE (3-D) positions; pass positions='kept' to run it"
            raise NotApplicable(self.name, vlm.family, why)

    def lm_layers(self, vlm):
        return [int(k) for k in self.params["layers"]]

    def lm_score(self, probe, stage):
        return probe.image_scores(probe.rows()[:, :, 0].mean(1))
