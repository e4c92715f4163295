"""SparseVLM: text "raters" choose the image tokens, in three stages inside the LM.

Source: Gumpest/SparseVLMs (main and ``v1.5`` branches), ``llava/model/language_model/score.py``
(``attn_postprocess_topk``, the per-layer lists) and ``modelling_sparse_llama.py`` (raters, stages,
recycling), ``utils.py`` (``cluster_and_merge``); cross-checked with ModelTC/LightCompress ``sparsevlm.py``.
Raters (computed once, on the LM's input embeddings): with V the image tokens and T the prompt tokens
after the image block, ``r = mean_over_V softmax_over_T(V · Tᵀ)``; the raters are the text tokens
with ``r > mean(r)``. At each pruning layer l (default 2, 6, 15) the layer's attention probabilities
of the raters (head mean, then mean over raters) rank the image tokens and the top ones continue
after layer l — so here the stage layer K is l + 1 and the rows are recorded during layer l's own
forward (one row per rater, never eager). Per-stage counts follow the code's lists (576 → 303 → 110
→ 36 for its "128" setting) scaled so that the last stage keeps the budget ``keep``.

What the default is, precisely: the v1.0/v1.5 scoring and lists, with the two changes SparseVLM+
(``USE_VERSION=2_0``) makes to the pipeline — no recycling ("Cancel Merge") and the original position
ids kept ("Keep Position ID"). SparseVLM+'s own scoring changes (attention divided by a RoPE-only
"gravity" map, the 14 text-to-visual heads of largest sum, its lists 238/108/60 for "128") are not
implemented. ``recycle=True`` is the v1.0/v1.5 code: at each stage the dropped image tokens with the
top 30 % (+1) relevance are clustered (DPC-KNN on the layer's output hidden states, distance / √C,
density from the ``c`` nearest, ``c = int(n / 10) + 1`` centres of largest distance·density) and each
cluster's mean (the code's ``1 / (count + 1e-6)`` weights) is appended after the kept image tokens,
positions renumbered (the code's ``position_ids[:, :n]``). Here the merged tokens stand in their
centres' layout slots (``group`` maps the members to them); the code's 1e-6 random density noise is
left out (ties: the lower index). With recycling the record's ``budget`` counts the merged tokens too
(more than ``keep``: the code keeps its list's count and adds the clusters); LLaVA-1.5-style layouts
(one contiguous image block; 1-D positions) only. Raters are computed in float32 as the code does;
when no text token is above the mean (all equal), every text token after the image rates.
"""

from __future__ import annotations

import numpy as np
import torch

from ..context import top_k_mask
from ..registry import NotApplicable, register
from ..stages.lm import LMMethod, uses_mrope

SCHEDULES = {"192": (300, 200, 110), "128": (303, 110, 36), "64": (66, 30, 17)}


@register("sparsevlm")
class SparseVLM(LMMethod):
    positions = "kept"
    merges = False
    needs_prev_rows = True
    defaults = {"layers": (3, 7, 16), "schedule": "128", "recycle": False}
    source = "Gumpest/SparseVLMs llava/model/language_model/score.py (text raters; layers 2, 6, 15 -> prune after)"

    def check(self, vlm):
        self.exact_budget = not bool(self.params["recycle"])
        if self.params["recycle"]:
            if self.params.get("positions") == "kept":
                raise ValueError(
                    "sparsevlm: recycle=True appends merged tokens (v1.5 code) and needs renumbered positions"
                )
            if uses_mrope(vlm):
                raise NotApplicable(self.name, vlm.family, "recycling renumbers positions, undefined for mRoPE")
            self.positions = "renumbered"

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

    def lm_keep(self, probe, stage, scores, n_keep):
        if not self.params["recycle"]:
            return super().lm_keep(probe, stage, scores, n_keep)
        # the code keeps min(list, present - 1) by score
        return [top_k_mask(s, min(k, max(len(s) - 1, 0))) for s, k in zip(scores, n_keep)]

    def lm_recycle(self, probe, stage, scores, keep):
        """Per sample (centres, merged hidden states, members per centre): v1.5's recycling (module doc)."""
        if not self.params["recycle"]:
            return None
        hidden = probe.hidden
        out = []
        for i, (s, m) in enumerate(zip(scores, keep)):
            s = np.asarray(s, dtype=np.float64)
            dropped = np.flatnonzero(~np.asarray(m, dtype=bool))
            if dropped.size == 0:
                out.append(None)
                continue
            n_sel = int(dropped.size * 0.3) + 1
            sel = dropped[np.argsort(-s[dropped], kind="stable")[:n_sel]]  # topk order (relevance)
            x = hidden[i, torch.as_tensor(probe.image_columns[i][sel], device=hidden.device)].double().cpu()
            centres, merged, members = cluster_and_merge(x, int(n_sel / 10) + 1)
            out.append((sel[centres], merged, [sel[mm] for mm in members]))
        return out


def cluster_and_merge(x: torch.Tensor, k: int):
    """SparseVLM's DPC-KNN merge (``utils.py::cluster_and_merge``) of ``x`` (n, C), float64, without the
    random density noise: (centre indices in the code's order, (k, C) merged tokens, members per centre)."""
    n, C = x.shape
    k = min(k, n)
    dist = torch.cdist(x[None], x[None])[0] / C**0.5
    near = torch.sort(dist, dim=-1, stable=True).values[:, :k]
    density = torch.exp(-(near**2).mean(-1))
    higher = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    dmax = dist.max()
    parent_dist = torch.where(higher, dist, dmax).min(-1).values
    score = parent_dist * density
    centres = torch.sort(score, descending=True, stable=True).indices[:k]
    assign = dist[centres].argmin(0)  # nearest centre of every token (first on ties)
    assign[centres] = torch.arange(k)
    counts = torch.bincount(assign, minlength=k).to(x.dtype)
    merged = torch.zeros(k, C, dtype=x.dtype).index_add_(0, assign, x / (counts[assign] + 1e-6)[:, None])
    members = [np.flatnonzero(assign.numpy() == c) for c in range(k)]
    return centres.numpy(), merged, members
