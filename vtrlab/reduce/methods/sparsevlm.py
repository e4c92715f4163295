"""SparseVLM: text "raters" choose the image tokens, in three stages inside the LM.

Source: Gumpest/SparseVLMs, ``llava/model/language_model/score.py`` and
``modelling_sparse_llama.py`` (cross-checked with ModelTC/LightCompress ``sparsevlm.py``).
Raters (computed once, on the LM's input embeddings): with V the image tokens and T the prompt tokens
after the image block, ``r = mean_over_V softmax_over_T(V · Tᵀ)``; the raters are the text tokens
with ``r > mean(r)``. At each pruning layer l (default 2, 6, 15) the layer's attention of the raters
(head mean, then mean over raters) ranks the image tokens and the top ones continue after layer l —
so here the stage layer K is l + 1 and the rows are recorded during layer l's own forward (one row
per rater, never eager). Per-stage counts follow the code's lists (576 → 303 → 110 → 36 for its
"128" setting) scaled so that the last stage keeps the budget ``keep``. Position ids: kept (v2 code
keeps them; v1's renumbering and recycling — merging 30% of the dropped tokens into cluster
centres — are not implemented here). Raters are computed in float32 as the code does; when no text token
is above the mean (all equal), every text token after the image rates (the code would rank by NaN).
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import register
from ..stages.lm import LMMethod

SCHEDULES = {"192": (300, 200, 110), "128": (303, 110, 36), "64": (66, 30, 17)}


@register("sparsevlm")
class SparseVLM(LMMethod):
    positions = "kept"
    merges = False
    needs_prev_rows = True
    defaults = {"layers": (3, 7, 16), "schedule": "128"}
    source = "Gumpest/SparseVLMs llava/model/language_model/score.py (text raters; layers 2, 6, 15 -> prune after)"

    def lm_layers(self, vlm):
        return [int(k) for k in self.params["layers"]]

    def lm_schedule(self, n_image, n_final):
        name = str(self.params["schedule"])
        if name not in SCHEDULES:
            raise ValueError(f"sparsevlm schedule={name!r}; accepted: {', '.join(SCHEDULES)}")
        ref = SCHEDULES[name][-len(self._layers) :] if len(self._layers) <= 3 else None
        if ref is None:
            raise ValueError(f"sparsevlm has at most 3 stages; got layers {self._layers}")
        out, prev = [], n_image
        for r in ref:
            n = min(prev, max(n_final, int(round(n_final * r / ref[-1]))))
            out.append(n)
            prev = n
        out[-1] = n_final
        return out

    def raters(self, state) -> list[np.ndarray]:
        """Per sample: run columns of the rater text tokens (on the LM input embeddings)."""
        if getattr(state, "_raters", None) is not None:
            return state._raters
        emb = state.inputs_embeds
        real = state.real_cols.cpu().numpy()
        out = []
        for i in range(emb.shape[0]):
            img = np.flatnonzero(state.col_image[i] >= 0)
            txt = np.arange(img.max() + 1, state.prompt_len)
            txt = txt[real[i, txt]]
            v, t = emb[i, img].float(), emb[i, txt].float()
            r = torch.softmax(v @ t.T, dim=-1).mean(0)
            above = (r > r.mean()).cpu().numpy()
            out.append(txt[above] if above.any() else txt)  # all equal (no rater above the mean): all rate
        state._raters = out
        return out

    def query_rows(self, state):
        cols = state.cols.cpu().numpy()
        return [np.flatnonzero(np.isin(cols[i], r)) for i, r in enumerate(self.raters(state))]

    def lm_score(self, probe, stage):
        p = probe.prev_rows_all().mean(1)  # (B, R, L) head mean
        return probe.image_scores(torch.nanmean(p, dim=1))  # mean over raters (NaN pad rows ignored)
