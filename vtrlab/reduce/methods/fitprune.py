"""FitPrune: a per-layer pruning recipe fitted on calibration data, applied inside the LM.

Source: ywh187/FitPrune — ``LLaVA_1.5/llava/model/language_model/modeling_llama.py``
(``LlamaAttention.forward``, the ``# fitprune`` block: inference) and
``LLaVA_1.5/llava/eval/statistical_analysis.py`` (``compute_attention_weights``, ``fit_model``,
``rest_flops``, ``calculate_origin_flops``: the calibration). Paper: "Fit and Prune" (Ye et al. 2024).

Inference, at every LM layer l whose recipe count ``d_l`` is > 0: with A the layer's attention
probabilities **maxed over heads**, I the image tokens still present and T the tokens after the
image block, each image token j scores ``cross_j · self_j`` with ``cross_j = Σ_{t∈T} A[t, j]`` and
``self_j = Σ_{i∈I} A[i, j] / |I|``; the ``d_l`` lowest are deleted **after layer l's attention**
(the code drops their rows from the attention output, so they are keys of layer l and gone from
layer l + 1 on: here the stage layer is K = l + 1 and the rows are recorded during layer l's
own forward, never eager). Position ids: kept (the code slices ``position_ids``).

Calibration (:func:`calibrate`, the code's ``statistical_analysis.py``): on the unpruned model,
per sample and layer, ``W_cross = Σ_{t,j} A[t, j] / |T|`` and ``W_self = Σ_{i,j} A[i, j] / |I|``.
For a threshold α, layer by layer, each sample deletes the tokens that are in both "bottom" sets:
the most tokens of lowest ``cross_j / |T|`` whose removal keeps ``Σ cross/|T|`` at or above
``(1 − α) · W_cross``, and likewise for ``self``; the recipe ``d_l`` is the mean over samples
(floored). Layers stop being pruned once the FLOPs already spent plus the forecast for the rest
(LLaMA FLOPs formula of the code, with the LM's own hidden/intermediate sizes and depth, counting
image tokens only, as the code does) reach ``(1 − reduction_ratio)`` of the unpruned model's.
α is found by bisection on [0, 1] to a width of 0.01; the recipe returned is the one of the last
α tried (as the code prints it).

Where vtrlab differs, stated: (1) the budget is exact — the recipe gives the *shape* (how many per
layer), its counts are rescaled so that ``n_image − keep`` are deleted in all (largest remainder,
earlier layers first); ``keep = n_image − sum(scheme)`` reproduces the recipe's counts exactly
(:func:`native_keep`). (2) A pruning count at the LM's last layer changes no output and is not
applied (every published recipe has 0 there); calibration fits layers ``0 .. N−2``. (3) When a
bottom-set search never crosses the threshold the code reuses a stale loop variable; here it then
deletes all but one token. (4) Ties in the ascending sorts are broken by the lower index.
Defaults: the published LLaVA-1.5-7B recipes (``reduction_ratio`` 10..90 %, the code's table; the
example script uses 60) on 32-layer LMs; other depths need ``scheme=calibrate(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..registry import register
from ..stages.lm import LMMethod, _gather_seq

# the code's recipes for LLaVA-1.5-7B (modeling_llama.py), layer -> tokens deleted after it, keyed by
# reduction_ratio in percent
_PUBLISHED = {
    10: "0 0 1 2 1 0 1 4 5 5 11 4 2 2 0 0 1 1 2 4 2 10 1 1 1 2 1 1 0 1 0 0",
    20: "0 0 3 3 1 1 4 16 14 15 24 4 2 3 2 0 6 0 5 13 4 19 2 1 1 1 1 1 2 1 0 0",
    30: "0 0 7 6 4 5 16 40 24 21 24 4 2 3 4 0 16 0 11 26 6 32 3 1 0 1 2 2 4 0 0 0",
    40: "0 1 21 13 14 11 41 53 29 15 14 5 1 4 5 1 26 1 13 28 6 27 2 1 0 0 1 1 2 0 0 0",
    50: "3 7 49 24 29 17 59 41 26 8 10 6 2 5 7 2 30 3 13 27 5 23 2 1 0 0 1 1 2 0 0 0",
    55: "6 17 69 31 34 19 59 30 23 6 8 7 2 5 8 2 29 4 12 25 4 19 2 1 0 0 1 0 1 0 0 0",
    60: "14 33 89 36 36 20 55 21 18 4 7 5 2 5 7 4 26 5 11 24 4 18 2 1 0 0 1 0 1 0 0 0",
    70: "48 79 118 41 33 17 36 9 9 2 3 2 1 3 4 8 18 7 8 20 4 13 2 1 0 0 1 0 1 0 0 0",
    80: "128 127 118 35 26 8 13 3 2 1 0 0 0 2 1 8 7 8 5 11 2 6 1 1 0 0 0 1 0 0 0 0",
    90: "262 153 80 19 13 1 2 0 0 0 0 0 0 0 0 1 1 2 1 2 0 1 0 0 0 0 0 1 0 0 0 0",
}
PUBLISHED = {k: tuple(int(x) for x in v.split()) for k, v in _PUBLISHED.items()}


def scale_scheme(scheme: Sequence[int], n_delete: int) -> list[int]:
    """Per-layer counts proportional to ``scheme`` summing to ``n_delete`` (largest remainder,
    earlier layers first on ties); the scheme itself when its sum already is ``n_delete``."""
    base = np.asarray(scheme, dtype=np.float64)
    total = base.sum()
    if n_delete == 0:
        return [0] * len(base)
    if total <= 0:
        raise ValueError("fitprune: the recipe deletes no token anywhere; it cannot reach a smaller budget")
    exact = base * (n_delete / total)
    out = np.floor(exact).astype(np.int64)
    rest = n_delete - int(out.sum())
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:rest]] += 1
    return [int(x) for x in out]


def native_keep(scheme: Sequence[int], n_image: int) -> int:
    """The budget at which the recipe's own counts are applied unchanged."""
    return max(n_image - int(sum(scheme)), 0)


def rows_image_text(state) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per sample, the current columns of (image tokens present, real prompt tokens after the last one)."""
    cols = state.cols.cpu().numpy()
    valid = state.valid.cpu().numpy()
    real = _gather_seq(state.real_cols, state.cols, 1, 0).cpu().numpy()
    img_rows, txt_rows = [], []
    for i in range(cols.shape[0]):
        c = cols[i]
        in_prompt = c < state.prompt_len
        img = np.zeros(c.shape, dtype=bool)
        img[in_prompt] = state.col_image[i, c[in_prompt]] >= 0
        img &= valid[i]
        at = np.flatnonzero(img)
        after = np.arange(len(c)) > at.max()
        img_rows.append(at)
        txt_rows.append(np.flatnonzero(after & valid[i] & real[i] & in_prompt))
    return img_rows, txt_rows


class _FitPruneSignal(LMMethod):
    """Shared: record the attention rows of the image tokens and the tokens after them, head max."""

    positions = "kept"
    merges = False
    needs_prev_rows = True

    def query_rows(self, state):
        img, txt = rows_image_text(state)
        self._rows = (img, txt)
        return [np.concatenate([a, b]) for a, b in zip(img, txt)]

    def cross_self(self, probe) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sample (Σ_text A[t, j], Σ_image A[i, j] / |I|) over the present image tokens, head max."""
        # on the device: max over heads (exact in any precision), the image columns gathered there, sums in
        # float64; only the two (n_image,) vectors per sample come to the host (the full (R, L) rows at
        # every stage layer were 70 MB a layer at LLaVA-NeXT's 2,969 tokens)
        p = probe.prev_rows_all().amax(1)  # (B, R, L) max over heads
        img_rows, txt_rows = self._rows
        out = []
        for i, cols in enumerate(probe.image_columns):
            ni, nt = len(img_rows[i]), len(txt_rows[i])
            a = p[i, : ni + nt][:, torch.as_tensor(cols, dtype=torch.long, device=p.device)].double()
            cross, self_ = a[ni:].sum(0), a[:ni].sum(0) / max(ni, 1)
            out.append((cross, self_))
        host = [t.cpu().numpy() for pair in out for t in pair]
        return [(host[2 * i], host[2 * i + 1]) for i in range(len(out))]


@register("fitprune")
class FitPrune(_FitPruneSignal):
    defaults = {"scheme": (), "reduction_ratio": 60}
    source = (
        "ywh187/FitPrune LLaVA_1.5/llava/model/language_model/modeling_llama.py (inference, head max), "
        "llava/eval/statistical_analysis.py (calibration)"
    )

    def resolve_scheme(self, vlm: Any) -> list[int]:
        n = len(vlm.lm_layers)
        scheme = [int(x) for x in self.params["scheme"]]
        if not scheme:
            ratio = int(self.params["reduction_ratio"])
            if ratio not in PUBLISHED:
                raise ValueError(
                    f"fitprune: reduction_ratio={ratio} has no published recipe; accepted: "
                    f"{', '.join(map(str, PUBLISHED))}, or pass scheme=calibrate(vlm, batches, ratio)"
                )
            if n != len(PUBLISHED[ratio]):
                raise ValueError(
                    f"fitprune: the published recipes are for 32-layer LLaVA-1.5-7B; this LM has {n} layers — "
                    "fit one with scheme=vtrlab.reduce.methods.fitprune.calibrate(vlm, batches, reduction_ratio)"
                )
            scheme = list(PUBLISHED[ratio])
        if len(scheme) != n or any(x < 0 for x in scheme):
            raise ValueError(f"fitprune: scheme has {len(scheme)} counts (need {n}, one per LM layer, each >= 0)")
        return scheme[: n - 1]  # a count at the last layer changes no output

    def lm_layers(self, vlm):
        self._scheme = self.resolve_scheme(vlm)
        layers = [li + 1 for li, d in enumerate(self._scheme) if d > 0]
        if not layers:
            raise ValueError("fitprune: the recipe deletes no token before the last layer")
        return layers

    def lm_schedule(self, n_image, n_final):
        counts = [d for d in self._scheme if d > 0]
        per = scale_scheme(counts, n_image - n_final)
        left, out = n_image, []
        for d in per:
            left -= d
            out.append(left)
        return out

    def lm_score(self, probe, stage):
        return [c * s for c, s in self.cross_self(probe)]


class _Fit(_FitPruneSignal):
    """Calibration pass: at every layer 0..N-2 record the stats (alpha None) or delete by the threshold rule."""

    name = "fitprune-calibration"
    exact_budget = False

    def __init__(self, n_layers: int, alpha: float | None, stats: list | None):
        super().__init__()
        self.n_layers, self.alpha, self.stats = n_layers, alpha, stats
        self.record: list[dict] = []  # per stage: per sample (n_present, n_deleted, W_cross, W_self)

    def lm_layers(self, vlm):
        return list(range(1, self.n_layers))

    def lm_schedule(self, n_image, n_final):
        return [n_image] * (self.n_layers - 1)

    def lm_score(self, probe, stage):
        self._cs = self.cross_self(probe)
        img_rows, txt_rows = self._rows
        self._nt = [max(len(t), 1) for t in txt_rows]
        return [c * s for c, s in self._cs]

    def lm_keep(self, probe, stage, scores, n_keep):
        out, rec = [], []
        for i, (cross, self_) in enumerate(self._cs):
            focus = cross / self._nt[i]
            n = len(focus)
            if self.alpha is None:
                rec.append((n, 0, float(focus.sum()), float(self_.sum())))
                out.append(np.ones(n, dtype=bool))
                continue
            w_cross, w_self = self.stats[i][stage]
            d_c = _bottom(focus, w_cross, self.alpha)
            d_s = _bottom(self_, w_self, self.alpha)
            both = np.intersect1d(d_c, d_s)
            m = np.ones(n, dtype=bool)
            m[both] = False
            rec.append((n, len(both), float(focus.sum()), float(self_.sum())))
            out.append(m)
        self.record.append(rec)
        return out


def _bottom(values: np.ndarray, total: float, alpha: float) -> np.ndarray:
    """Indices of the lowest values deletable while the remaining sum stays >= (1 - alpha) · total:
    the code's loop (first i whose removal drops below, delete max(i - 1, 0); never: all but one)."""
    order = np.argsort(values, kind="stable")
    s = values.sum()
    removed = np.concatenate([[0.0], np.cumsum(values[order])])
    below = np.flatnonzero(s - removed[: len(values)] < total - total * alpha)
    n_del = max(int(below[0]) - 1, 0) if below.size else max(len(values) - 1, 0)
    return order[:n_del]


def _lm_dims(vlm) -> tuple[int, int, int]:
    cfg = vlm.model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.hidden_size), int(text.intermediate_size), len(vlm.lm_layers)


def flops(vlm) -> dict:
    """The code's LLaMA FLOPs formulas with this LM's sizes: per-layer attention part, o_proj+FFN part."""
    D, F, N = _lm_dims(vlm)

    def attn(t):
        return t * D * D * 3 + t * t * D * 2

    def tail(t):
        return t * D * D + 3 * F * D * t

    def layer(t):
        return t * D * D * 3 + t * t * D + t * D * t + t * D * D + D * F * t * 3

    def rest(t, li):
        return tail(t) + layer(t) * (N - 1 - li)

    return {"attn": attn, "tail": tail, "layer": layer, "rest": rest, "n_layers": N}


def _run(vlm, batch, method: _Fit) -> list:
    from ..apply import lm_record

    lm_record(vlm, batch, method, 1.0)
    return method.record


def calibrate(vlm, batches, reduction_ratio: float = 0.6, tol: float = 0.01, return_info: bool = False):
    """Fit FitPrune's recipe on calibration ``batches`` (a :class:`Batch` or a list of them) for a FLOPs
    reduction ``reduction_ratio`` in (0, 1) (the code's ``--reduction_ratio 0.6``). Returns the per-layer
    delete counts (one per LM layer; pass as ``scheme=``), or ``(scheme, info)`` with ``return_info``
    (alpha, whether the budget was reached, the bisection trace)."""
    from ...models.base import Batch

    if not 0.0 < float(reduction_ratio) < 1.0:
        raise ValueError(f"fitprune.calibrate: reduction_ratio={reduction_ratio}; accepted: a float in (0, 1)")
    batches = [batches] if isinstance(batches, Batch) else list(batches)
    if not batches:
        raise ValueError("fitprune.calibrate needs at least one calibration batch")
    fl = flops(vlm)
    N = fl["n_layers"]
    if N < 2:
        raise ValueError(f"fitprune.calibrate: the LM has {N} layer(s); pruning needs at least 2")
    stats = []
    for b in batches:
        rec = _run(vlm, b, _Fit(N, None, None))  # per stage, per sample (n, 0, W_cross, W_self)
        stats.append([[(rec[j][i][2], rec[j][i][3]) for j in range(N - 1)] for i in range(len(b))])
    n_image = [lay.n_image_tokens for b in batches for lay in b.layouts]
    origin = float(np.mean([fl["layer"](v) * N for v in n_image]))

    def fit(alpha):
        left, dels = [], []
        for b, st in zip(batches, stats):
            rec = _run(vlm, b, _Fit(N, alpha, st))
            for i in range(len(b)):
                left.append([rec[j][i][0] for j in range(N - 1)] + [None])
                dels.append([rec[j][i][1] for j in range(N - 1)] + [0])
        S = len(left)
        cur = list(n_image)
        used, scheme, reached = 0.0, [0] * N, False
        for li in range(N):
            forecast = 0.0
            for s in range(S):
                used += fl["attn"](cur[s])
                forecast += fl["rest"](cur[s], li)
            if (used + forecast) / S <= origin * (1 - reduction_ratio):
                reached = True
                break
            for s in range(S):
                if left[s][li] is not None and left[s][li] != cur[s]:
                    raise RuntimeError(f"fitprune.calibrate: token count mismatch at layer {li} ({left[s][li]})")
                scheme[li] += dels[s][li]
                cur[s] -= dels[s][li]
                used += fl["tail"](cur[s])
        return reached, [x // S for x in scheme]

    lo, hi, trace = 0.0, 1.0, []
    scheme, reached, mid = [0] * N, False, None
    while hi - lo > tol + 1e-6:
        mid = (lo + hi) / 2
        reached, scheme = fit(mid)
        trace.append({"alpha": mid, "reached": reached, "deleted": int(sum(scheme))})
        if reached:
            hi = mid
        else:
            lo = mid
    scheme = tuple(int(x) for x in scheme)
    if return_info:
        return scheme, {"alpha": mid, "reached": reached, "trace": trace, "origin_flops": origin}
    return scheme
