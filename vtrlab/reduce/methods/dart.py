"""DART: keep image tokens that *differ* from a few pivot tokens (duplication-aware), inside the LM.

Source: DART (Wen et al. 2025, "Stop looking for important tokens..."), ``modeling_llama_self.py::
get_retained_image_token`` (cross-checked with ModelTC/LightCompress ``token_reduction/dart.py``).
At layer K (default 2) the method reads layer K-1's keys (post-RoPE, heads concatenated): the 4
image tokens and the 4 text tokens *after the image block* with the largest key L1 norm are pivots.
With the hidden states entering layer K passed through the LM's final RMS norm, each pivot in turn
adds the image tokens least cosine-similar to it among those not yet chosen. Kept: the image
pivots and every added token (text pivots only select). Position ids: kept.

Differences from the code, stated: the code gives every pivot ``int(V·keep/8)`` tokens, so it keeps
``4 + 8·int(V·keep/8)`` (e.g. 132 for a budget of 128); here the budget is exact — the remaining
``budget - 4`` tokens are split over the pivots as evenly as possible, earlier pivots first. The code
walks its pivots in Python ``set`` order; here image pivots come first, then text pivots, each group
by descending key norm. Needs ``budget >= image pivots``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import register
from ..stages.lm import LMMethod


def dart_select(
    keys_l1: np.ndarray,
    img_cols: np.ndarray,
    text_cols: np.ndarray,
    normed: torch.Tensor,
    n_keep: int,
    pivot_image: int,
    pivot_text: int,
) -> np.ndarray:
    """Bool over ``img_cols``: the DART kept set (see module doc). ``keys_l1`` and ``normed`` are per column.

    On ``normed``'s device with one host copy at the end: the cosines of every pivot to every image
    token are one broadcast ``cosine_similarity`` (float64, as before); each pivot then takes its
    least-similar tokens among those not chosen yet (chosen ones masked to +inf; a stable sort keeps
    index order on ties, as the per-pivot sort over the remaining tokens did)."""
    n = len(img_cols)
    p_img = min(pivot_image, n, n_keep)
    img_order = img_cols[np.argsort(-keys_l1[img_cols], kind="stable")][:p_img]
    txt_order = text_cols[np.argsort(-keys_l1[text_cols], kind="stable")][:pivot_text]
    pivots = np.concatenate([img_order, txt_order]).astype(np.int64)
    chosen_np = np.isin(img_cols, img_order)
    extra = n_keep - p_img
    share = [extra // len(pivots) + (1 if j < extra % len(pivots) else 0) for j in range(len(pivots))]
    dev = normed.device
    cand = normed[torch.as_tensor(img_cols, dtype=torch.long, device=dev)].double()
    piv = normed[torch.as_tensor(pivots, dtype=torch.long, device=dev)].double()
    sim = torch.nn.functional.cosine_similarity(piv[:, None, :], cand[None, :, :], dim=-1)  # (P, n)
    chosen = torch.as_tensor(chosen_np, device=dev)
    left = n - int(chosen_np.sum())
    for j, take in enumerate(share):
        take = min(take, left)
        if take <= 0:
            continue
        s = sim[j].masked_fill(chosen, float("inf"))
        chosen[torch.argsort(s, stable=True)[:take]] = True  # least similar first
        left -= take
    return chosen.cpu().numpy()


@register("dart")
class Dart(LMMethod):
    positions = "kept"
    merges = False
    needs_prev_input = True
    defaults = {"layer": 2, "pivot_image": 4, "pivot_text": 4}
    source = "DART modeling_llama_self.py::get_retained_image_token (key-L1 pivots, least-cosine duplicates)"

    def lm_layers(self, vlm):
        return [int(self.params["layer"])]

    def lm_score(self, probe, stage):
        self._keys_l1 = probe.prev_keys().float().abs().sum(-1).cpu().numpy()  # (B, L_cur)
        self._normed = probe.final_normed()
        self._text = probe.text_after_image()
        return [self._keys_l1[i, c] for i, c in enumerate(probe.image_columns)]

    def lm_keep(self, probe, stage, scores, n_keep):
        out = []
        for i, (cols, k) in enumerate(zip(probe.image_columns, n_keep)):
            if k < min(int(self.params["pivot_image"]), len(cols)):
                raise ValueError(f"dart: budget {k} is below pivot_image={self.params['pivot_image']}")
            out.append(
                dart_select(
                    self._keys_l1[i],
                    cols,
                    self._text[i],
                    self._normed[i],
                    k,
                    int(self.params["pivot_image"]),
                    int(self.params["pivot_text"]),
                )
            )
        return out
