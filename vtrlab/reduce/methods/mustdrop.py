"""MustDrop: merge similar neighbours in the tower, protect a [CLS] key set, drop by text attention in the LM.

Source: liuting20/MustDrop (Liu et al., 2024, "Multi-Stage Vision Token Dropping"), a fork of the
SparseVLMs code base: ``llava/model/multimodal_encoder/clip_encoder.py`` (``CLIPVisionModelAcc.custom_forward``),
``llava/model/multimodal_encoder/local_merge.py`` (``conditional_pooling``, ``merge_wavg``),
``llava/model/llava_arch.py`` (``prepare_sparse_inputs_labels_for_multimodal``: image features concatenated,
``position_ids = arange``), ``llava/model/language_model/modelling_sparse_llama.py``
(``LlamaDynamicvitModel.forward``, ``dual_attention_filter``, the KV-cache pruning after prefill) and
``scripts/v1_5/eval/textvqa_{64,128,192}.sh`` (the thresholds). What the code computes, per image:

1. **Vision stage, layer 0** (after the whole block): the patch grid is cut into non-overlapping
   ``window`` x ``window`` windows (3 x 3), raster order. A window's similarity is the mean cosine
   similarity of its tokens' hidden states over all ordered pairs of distinct tokens; every window
   with similarity ``>= sim_threshold`` (0.8) merges into one token, the size-weighted mean of its
   tokens (all sizes 1: the plain mean). The tower then runs on ``[CLS], merged tokens (windows by
   descending similarity), unmerged tokens (raster)`` — no proportional attention, sizes dropped.
2. **Vision stage, key set**: at layer 23 (the last layer of CLIP-L's 24, ``key_layer=-1`` here; the
   features the LM receives come from the model's own projector layer, ``mm_vision_select_layer`` —
   ``hidden_states[-2]`` in LLaVA-1.5 — ``feature_layer=None`` here: the model's
   ``vision_feature_layer``; an int overrides it) the
   head-mean [CLS] -> patch attention picks the top ``ceil(key_rate · N)`` tokens (``key_rate`` 0.08;
   N the tokens after the merge, 576 -> 47 without merges): the "key set", never dropped later.
3. **Prefill stage, inside the LM** after layers 2, 6, 10, 14 (so ``layers=(3, 7, 11, 15)`` here: K is
   the first layer without the dropped tokens, as for SparseVLM): with ``A`` the layer's attention
   probabilities from every token after the image block ("text": question and answer prompt) to the
   image tokens still present, head mean, a token is dropped when ``Σ_text A < global_thr · Σ_image Σ_text A``
   **and** ``max_text A < individual_thr`` — unless it is in the key set. Position ids are
   **renumbered** after every drop (the code narrows ``position_ids`` to ``arange`` of the new length).
4. **Decoding stage**: after the prefill the code prunes the KV cache of the layers from the first
   pruning layer on (2 .. 14) to the final kept set (and decodes with per-layer cache lengths as
   positions). Not implemented here (see below).

Thresholds per budget as the scripts set them (``setting``): "64" -> (0.011, 0.01), "128" ->
(0.0012, 0.001), "192" -> (0.001, 0.001) (global, individual) for TextVQA; ``vizwiz_64.sh`` uses
(0.005, 0.001) — the code's thresholds are per budget *and* per dataset, and the budget is whatever
they leave (the argparse defaults 1.0 / 0.0 drop nothing in the LM).

**How ``keep`` maps to thresholds** (``adaptive=False``, the default): vtrlab's interface takes a
budget, so the drop counts are chosen to make the final count equal ``keep`` exactly and the
thresholds decide *which* tokens go. A token's score is ``max(share / global_thr, max_text A /
individual_thr)`` (``share`` = its ``Σ_text A`` over the total): the code drops it exactly when the
score is < 1, and dropping the lowest scores is the code's rule with both thresholds scaled by one
factor (their ratio from ``setting``), chosen so that the stage's count is met. The counts step
geometrically from the tokens entering the LM to ``keep`` over the stages (``LMMethod.lm_schedule``).
For the budget to be reachable, at most ``(V - keep) // (window² - 1)`` windows merge (the most
similar ones) and the key set has at most ``keep`` tokens. ``adaptive=True`` is the code as it runs:
the thresholds alone decide, the merge and key set are uncapped, and the record reports what is left
(``keep`` only labels the run). ``global_thr`` / ``individual_thr`` override the setting's pair.

The record: ``stage_layer = -1`` is the LM input (merged-away tokens dropped; ``group`` maps each patch
of a merged window to the window's last patch, the code's ``dst`` token, whose slot the merged token
takes; score = the key-layer [CLS] attention), then one row per LM stage (score as above, < 1:
the code's thresholds would drop it). ``Selection.info["protected"]`` holds the key set.

Where vtrlab differs from the code: the LM receives the image tokens in the code's order (merged
windows first), held in the kept layout slots in that order (``info["content"]`` maps slots to the
token they hold), positions renumbered — the same sequence as the code. Each image is its own batch
of one (the code takes the merge count as the minimum over a batch; its evaluation uses batches of
one). Grids that the window does not divide (the code asserts they do) merge the windows of the
top-left ``⌊H/w⌋·w x ⌊W/w⌋·w`` part; the other patches stay unmerged. The decoding stage is left out:
after the prefill the code cuts the KV cache of layers 2 .. 14 to the final kept set and gives each
generated token, per layer, the length of that layer's cache as its position (the full length in layers
0-1, the final renumbered length from layer 2 on); vtrlab decodes over each layer's prefill cache (the
tokens that layer saw) with the renumbered positions of that layer's stage. The first generated token
(the prefill's logits) is the code's; later ones see more keys in layers 2 .. 14 and other positions in
layers 2 .. 14 (the code's cut needs per-layer cache surgery in the shared decode path). The paper
names an "output-aware cache policy" for the decode stage; what the code does is this cut.
LLaVA-1.5-style towers: one CLIP crop with a [CLS] per image (the code's anyres path flattens the
crops without the model's unpadding and newline tokens); other families raise NotApplicable.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..context import top_k_mask, vision_layer_index
from ..registry import NotApplicable, Selection, register
from ..stages.lm import LMMethod
from ..stages.tower import TowerState, run_tower
from ._vision import project, require_cls, require_llava_tower, single_crop

THRESHOLDS = {"64": (0.011, 0.01), "128": (0.0012, 0.001), "192": (0.001, 0.001)}


def window_members(height: int, width: int, window: int) -> np.ndarray:
    """(n_windows, window²) raster indices of the patches of each non-overlapping window of an
    ``height`` x ``width`` grid, windows in raster order, patches row-major inside a window (the
    code's ``unfold``); windows cover the top-left part the window divides."""
    gh, gw = height // window, width // window
    out = np.empty((gh * gw, window * window), dtype=np.int64)
    for a in range(gh):
        for b in range(gw):
            rows = a * window + np.arange(window)
            cols = b * window + np.arange(window)
            out[a * gw + b] = (rows[:, None] * width + cols[None, :]).reshape(-1)
    return out


def window_similarity(feat: torch.Tensor, members: np.ndarray) -> torch.Tensor:
    """Mean cosine similarity over ordered pairs of distinct tokens of each window, float64 (n_windows,),
    computed on ``feat``'s device (the model's: as :func:`._vision.scoring_device`; on the host, 576 x 1024
    float64 pairs take ~0.1 s on one core)."""
    if members.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=feat.device)
    x = feat.double()[torch.as_tensor(members, device=feat.device)]  # (nw, m, D)
    m = members.shape[1]
    sims = F.cosine_similarity(x[:, :, None], x[:, None, :], dim=-1)  # (nw, m, m)
    off = 1 - torch.eye(m, dtype=sims.dtype, device=sims.device)
    return (sims * off).sum((-1, -2)) / (m * (m - 1))


def merge_plan(sim: torch.Tensor, threshold: float, cap: int | None) -> np.ndarray:
    """Indices of the windows that merge, by descending similarity (ties: lower window first): those with
    similarity >= ``threshold`` (at most ``cap`` when given)."""
    r = int((sim >= threshold).sum())
    if cap is not None:
        r = max(min(r, cap), 0)
    return np.argsort(-sim.numpy(), kind="stable")[:r]


def dual_scores(attn: np.ndarray, global_thr: float, individual_thr: float) -> np.ndarray:
    """MustDrop's dual-attention filter as a score: ``attn`` (text rows, image tokens), head-mean
    probabilities. ``max(Σ_t A / (g · Σ A), max_t A / i)``; the code drops a token iff its score is < 1
    (a zero threshold never drops: infinite score)."""
    attn = np.asarray(attn, dtype=np.float64)
    n = attn.shape[1]
    if attn.shape[0] == 0 or n == 0:
        return np.full(n, np.inf)
    col = attn.sum(0)
    total = col.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        share = col / (total * global_thr) if total > 0 and global_thr > 0 else np.full(n, np.inf)
        peak = attn.max(0) / individual_thr if individual_thr > 0 else np.full(n, np.inf)
    return np.maximum(share, peak)


@register("mustdrop")
class MustDrop(LMMethod):
    positions = "renumbered"
    merges = True
    needs_prev_rows = True
    has_pre_lm = True
    defaults = {
        "layers": (3, 7, 11, 15),
        "setting": "128",
        "global_thr": None,
        "individual_thr": None,
        "adaptive": False,
        "window": 3,
        "sim_threshold": 0.8,
        "merge_layer": 0,
        "key_layer": -1,
        "key_rate": 0.08,
        "feature_layer": None,
    }
    source = (
        "liuting20/MustDrop: llava/model/multimodal_encoder/clip_encoder.py + local_merge.py (tower), "
        "llava/model/language_model/modelling_sparse_llama.py (dual_attention_filter; prune after 2, 6, 10, 14)"
    )

    def thresholds(self) -> tuple[float, float]:
        setting = str(self.params["setting"])
        if setting not in THRESHOLDS:
            raise ValueError(f"mustdrop setting={setting!r}; accepted: {', '.join(THRESHOLDS)}")
        g, i = THRESHOLDS[setting]
        if self.params["global_thr"] is not None:
            g = float(self.params["global_thr"])
        if self.params["individual_thr"] is not None:
            i = float(self.params["individual_thr"])
        if g < 0 or i < 0:
            raise ValueError(f"mustdrop: thresholds ({g}, {i}) must be >= 0")
        return g, i

    def feature_layer(self, vlm) -> int:
        """0-indexed vision layer whose output feeds the projector (the model's own unless overridden)."""
        if self.params["feature_layer"] is None:
            return int(vlm.adapter.vision_feature_layer(vlm.model))
        return vision_layer_index(vlm, int(self.params["feature_layer"]))

    def check(self, vlm):
        require_llava_tower(vlm, self.name)
        if isinstance(getattr(vlm.model.config, "vision_feature_layer", None), (list, tuple)):
            raise NotApplicable(self.name, vlm.family, "the projector reads several vision layers concatenated")
        require_cls(vlm, self.name, "its key set is the [CLS] attention's top tokens")
        if int(vlm.adapter.features_drop_cls(vlm.model)) != 1:
            raise NotApplicable(self.name, vlm.family, "the projector receives the [CLS] feature too (cls_patch)")
        self.thresholds()
        if int(self.params["window"]) < 2:
            raise ValueError(f"mustdrop: window={self.params['window']}; accepted: an int >= 2")
        if not 0.0 <= float(self.params["key_rate"]) <= 1.0:
            raise ValueError(f"mustdrop: key_rate={self.params['key_rate']}; accepted: a float in [0, 1]")
        merge = vision_layer_index(vlm, int(self.params["merge_layer"]))
        key = vision_layer_index(vlm, int(self.params["key_layer"]))
        feat = self.feature_layer(vlm)
        if not merge < key or feat < merge:
            raise ValueError(
                f"mustdrop: merge_layer={merge} must come before key_layer={key} and not after feature_layer={feat}"
            )
        self.exact_budget = not bool(self.params["adaptive"])

    # ---------------------------------------------------------------- vision stages (before the LM)
    def pre_select(self, ctx, n_keep):
        vlm = ctx.vlm
        merge_l = vision_layer_index(vlm, int(self.params["merge_layer"]))
        key_l = vision_layer_index(vlm, int(self.params["key_layer"]))
        feat_l = self.feature_layer(vlm)
        ws = int(self.params["window"])
        adaptive = bool(self.params["adaptive"])
        crops = vlm.adapter.vision_crops(vlm.model, ctx.batch.inputs)
        out = {k: [] for k in ("keep", "scores", "embeds", "group", "content", "protected", "merged")}
        for lay, n in zip(ctx.layouts, n_keep):
            crop, order = single_crop(lay, vlm.family, self.name)
            V = lay.n_image_tokens
            side = math.isqrt(V)
            if side * side != V:
                raise NotApplicable(self.name, vlm.family, f"the crop's {V} patches are no square grid")
            members = window_members(side, side, ws)
            cap = None if adaptive else (V - int(n)) // (ws * ws - 1)
            got: dict = {}

            def between(li, st, members=members, cap=cap, got=got):
                if li == merge_l:
                    st = self._merge(st, members, cap, got)
                if li == feat_l:
                    got["feats"] = st.x[0, 1:]
                if li == key_l:
                    got["cls"] = st.attn_cls[0, :, 1:].float().mean(0).cpu()  # (N,) head mean
                return st

            run_tower(vlm, crops[crop : crop + 1], max(key_l, feat_l), between, want_cls=True, where="block")
            windows = got["windows"]
            merged = np.zeros(V, dtype=bool)
            merged[members[windows].reshape(-1)] = True
            rest = np.flatnonzero(~merged)
            rep_raster = np.concatenate([members[windows, -1], rest])  # the code's order: dst tokens, then unmerged
            rep = order[rep_raster]
            n_key = math.ceil(float(self.params["key_rate"]) * len(rep))
            if not adaptive:
                n_key = min(n_key, int(n))
            cls = got["cls"].double().numpy()
            key = np.argsort(-cls, kind="stable")[:n_key]
            keep = np.zeros(V, dtype=bool)
            keep[rep] = True
            protected = np.zeros(V, dtype=bool)
            protected[rep[key]] = True
            content = np.full(V, -1, dtype=np.int64)
            content[np.sort(rep)] = rep  # kept slot (layout order) -> the token it holds (code order)
            group = np.full(V, -1, dtype=np.int64)
            for w in windows:
                group[order[members[w]]] = order[members[w, -1]]
            score = np.full(V, np.nan)
            score[rep] = cls
            out["keep"].append(keep)
            out["scores"].append(score)
            out["embeds"].append(project(vlm, got["feats"]))
            out["group"].append(group)
            out["content"].append(content)
            out["protected"].append(protected)
            out["merged"].append(int(len(windows)))
        info = {k: out[k] for k in ("content", "protected", "merged")}
        info["scores"] = "head-mean [CLS] attention at the key layer (after the merge)"
        return Selection(keep=out["keep"], scores=out["scores"], embeds=out["embeds"], group=out["group"], info=info)

    def _merge(self, st: TowerState, members: np.ndarray, cap: int | None, got: dict) -> TowerState:
        """The code's ``conditional_pooling`` + ``merge_wavg`` on one crop sequence ([CLS] first)."""
        if st.x.shape[0] != 1:
            raise ValueError("mustdrop merges one crop sequence at a time")
        feat = st.x[0, 1:]
        sim = window_similarity(feat.detach(), members).cpu()  # on the model's device, one copy back
        windows = merge_plan(sim, float(self.params["sim_threshold"]), cap)
        got["windows"] = windows
        V = feat.shape[0]
        merged = np.zeros(V, dtype=bool)
        merged[members[windows].reshape(-1)] = True
        rest = torch.as_tensor(np.flatnonzero(~merged), device=feat.device)
        idx = torch.as_tensor(members[windows], device=feat.device)  # (r, m)

        def pool(t):
            body = t[:, 1:]
            groups = body[:, idx].sum(2)  # (1, r, C): the code's scatter_reduce sum of src into dst
            return torch.cat([t[:, :1], groups, body[:, rest]], dim=1)

        size = pool(st.size)
        return TowerState(x=pool(st.x * st.size) / size, size=size, source=pool(st.source).clamp(max=1))

    # ---------------------------------------------------------------- LM stages
    def lm_layers(self, vlm):
        return [int(k) for k in self.params["layers"]]

    def lm_schedule(self, n_image, n_final):
        if self.params["adaptive"]:
            return [n_image] * len(self._layers)  # unused: the thresholds decide
        return super().lm_schedule(n_image, n_final)

    def query_rows(self, state):
        """Every real prompt token after the last image token still present (the code's ``text_seq``)."""
        cols = state.cols.cpu().numpy()
        real = (state.valid & state.real_cols.gather(1, state.cols)).cpu().numpy()
        out = []
        for i in range(cols.shape[0]):
            c = cols[i]
            in_prompt = c < state.prompt_len
            img = np.zeros(c.shape, dtype=bool)
            img[in_prompt] = state.col_image[i, c[in_prompt]] >= 0
            img &= real[i]
            last = np.flatnonzero(img).max() if img.any() else -1
            out.append(np.flatnonzero((np.arange(c.shape[0]) > last) & in_prompt & real[i]))
        return out

    def lm_score(self, probe, stage):
        g, ind = self.thresholds()
        p = probe.prev_rows_all().mean(1).double().cpu().numpy()  # (B, R, L) head mean; NaN pad rows
        out = []
        for i, cols in enumerate(probe.image_columns):
            rows = p[i][~np.isnan(p[i][:, 0])] if p.shape[1] else p[i]
            out.append(dual_scores(rows[:, cols], g, ind))
        return out

    def lm_keep(self, probe, stage, scores, n_keep):
        prot = probe.state.pre.info["protected"]
        out = []
        for i, (s, k) in enumerate(zip(scores, n_keep)):
            protected = prot[i][probe.image_tokens[i]]
            if self.params["adaptive"]:
                out.append((np.asarray(s) >= 1.0) | protected)
            else:
                out.append(top_k_mask(np.where(protected, np.inf, s), k))
        return out
