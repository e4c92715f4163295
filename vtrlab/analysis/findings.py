"""The field's claims about visual tokens, tested on a model with ground truth: one function per claim.

Each claim function takes ``(vlm, samples, *, cache=None, ...)`` — ``samples`` are records with image,
question, answer, family and a patch-grid ``relevance`` mask (the organism's synthetic samples) — and
returns one JSON-ready **record**::

    {claim, title, source, measure, value, ci: [low, high], n, threshold, direction, verdict, why,
     parts: [...], data: {...}}

``value`` is the claim's statistic on these samples, ``ci`` its percentile-bootstrap 95% interval over
samples (:func:`vtrlab.metrics.controls.bootstrap_ci`), ``verdict`` one of :data:`VERDICTS`, computed
from the numbers by the rule in the function's docstring, never typed; ``why`` says it in words,
with the numbers. A claim with several parts (e.g. "A, and so does B") lists them in ``parts`` (each
with its own value, CI and verdict) and combines them by :func:`combine`; the headline ``value`` is
the first part's. ``data`` holds the small arrays its figure draws (:mod:`vtrlab.plots.findings`).

The verdict rule (:func:`verdict_of`): a claim states that a statistic lies above (``>``) or below
(``<``) a threshold. **replicated** when the whole 95% CI lies on the claimed side, **refuted** when it
lies wholly on the other side, **inconclusive** when it contains the threshold (or cannot be computed:
too few samples). **not applicable here** when the model lacks what the claim is about (no [CLS]
token, no high-norm tokens, no question after the image, a task it has not learnt), with the reason.

Every per-sample computation runs once per :class:`FindingsCache` (one capture forward with vision
attention and tower norms, one knockout sweep, the keep-mask answers, one reduction sweep over the
union of the methods and budgets the claims ask for) and is shared between claims. :func:`run_all`
runs every claim; :func:`markdown_table` and :func:`render_readme` turn the records into the README's
table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vtrlab.metrics import agreement, controls
from vtrlab.organism.realism import HIGH_NORM

VERDICTS = ("replicated", "refuted", "inconclusive", "not applicable here")
N_BOOT = 1000
REFERENCE_DEPTH = 32  # LM depth (LLaVA-1.5-7B) the papers' layer numbers refer to
KNOWN_TASK = 0.8  # a family counts as learnt when the full model's accuracy on it is at least this
REDUCTION_METHODS = (
    "random",
    "selector",
    "pooling",
    "fastv",
    "sparsevlm",
    "pyramiddrop",
    "fastervlm",
    "visionzip",
    "divprune",
    "dart",
)
REDUCTION_BUDGETS = (0.3, 0.5)
NOT_METHODS = ("full", "random", "oracle")  # rows of a sweep that are no reduction method to rank


# --------------------------------------------------------------------------------------------- verdicts
def verdict_of(low: float, high: float, threshold: float, direction: str) -> str:
    """``replicated`` when the CI [low, high] lies wholly on the claimed side of ``threshold``
    (``direction`` ``">"``: above it, ``"<"``: below it), ``refuted`` when it lies wholly on the other
    side (touching the threshold counts as the other side), ``inconclusive`` otherwise (the CI contains
    the threshold, or a bound is NaN)."""
    if direction not in (">", "<"):
        raise ValueError(f"direction={direction!r}; accepted: '>' or '<'")
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if low > high:
        raise ValueError(f"CI [{low}, {high}] has low > high")
    claimed_above = direction == ">"
    if (low > threshold) if claimed_above else (high < threshold):
        return "replicated"
    if (high <= threshold) if claimed_above else (low >= threshold):
        return "refuted"
    return "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim of several parts: ``not applicable here`` if any part is, else
    ``refuted`` if any part is refuted, ``replicated`` if every part is, else ``inconclusive``."""
    bad = [v for v in verdicts if v not in VERDICTS]
    if bad or not verdicts:
        raise ValueError(f"verdicts {list(verdicts)}; each must be one of {VERDICTS}")
    if "not applicable here" in verdicts:
        return "not applicable here"
    if "refuted" in verdicts:
        return "refuted"
    if all(v == "replicated" for v in verdicts):
        return "replicated"
    return "inconclusive"


def _fmt(x: float) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.3f}"


def part(name: str, measure: str, stat: tuple[float, float, float], n: int, threshold: float, direction: str) -> dict:
    """One tested statement: ``stat`` = (value, low, high) from :func:`boot`; its verdict by :func:`verdict_of`."""
    value, low, high = (float(v) for v in stat)
    return {
        "name": name,
        "measure": measure,
        "value": value,
        "ci": [low, high],
        "n": int(n),
        "threshold": float(threshold),
        "direction": direction,
        "verdict": verdict_of(low, high, threshold, direction),
    }


def part_text(p: Mapping) -> str:
    """'<name>: <value> [<low>, <high>] (claimed <dir> <threshold>): <verdict>' — from the numbers."""
    lo, hi = p["ci"]
    return (
        f"{p['name']}: {_fmt(p['value'])} [{_fmt(lo)}, {_fmt(hi)}] "
        f"(claimed {p['direction']} {p['threshold']:g}, n={p['n']}): {p['verdict']}"
    )


def make_record(claim: str, parts: Sequence[Mapping], data: Mapping | None = None, note: str = "") -> dict:
    """The record of a tested claim (see the module docstring): headline from the first part, verdict
    by :func:`combine`, ``why`` listing every part with its numbers (plus ``note``)."""
    info = CLAIMS[claim]
    first = parts[0]
    why = "; ".join(part_text(p) for p in parts) + (f". {note}" if note else "")
    return _jsonable(
        {
            "claim": claim,
            "title": info["title"],
            "source": info["source"],
            "measure": first["measure"],
            "value": first["value"],
            "ci": list(first["ci"]),
            "n": first["n"],
            "threshold": first["threshold"],
            "direction": first["direction"],
            "verdict": combine([p["verdict"] for p in parts]),
            "why": why,
            "parts": [dict(p) for p in parts],
            "data": data or {},
        }
    )


def not_applicable(claim: str, why: str, measure: str = "", n: int = 0, data: Mapping | None = None) -> dict:
    """The record of a claim this model cannot test: verdict ``not applicable here``, no value."""
    info = CLAIMS[claim]
    return {
        "claim": claim,
        "title": info["title"],
        "source": info["source"],
        "measure": measure,
        "value": None,
        "ci": [None, None],
        "n": int(n),
        "threshold": None,
        "direction": None,
        "verdict": "not applicable here",
        "why": why,
        "parts": [],
        "data": _jsonable(data or {}),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def boot(
    stat: Callable[[np.ndarray], float], n: int, n_boot: int = N_BOOT, seed: int = 0, max_undefined: float = 0.05
) -> tuple[float, float, float]:
    """(stat(all samples), low, high): percentile bootstrap 95% CI of ``stat(idx)`` over resampled sample
    indices ``idx`` (an int array with repeats; resamples drawn as in
    :func:`vtrlab.metrics.controls.bootstrap_ci`). Resamples where the statistic is undefined (NaN, e.g.
    a ratio whose denominator vanished) are left out when they are at most ``max_undefined`` of them;
    otherwise the interval is NaN (too few samples for a CI)."""
    if n < 1:
        return float("nan"), float("nan"), float("nan")
    point = float(stat(np.arange(n)))
    if n < 2:
        return point, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    stats = np.array([float(stat(i)) for i in idx])
    ok = np.isfinite(stats)
    if ok.mean() < 1 - max_undefined:
        return point, float("nan"), float("nan")
    lo, hi = np.quantile(stats[ok], [0.025, 0.975])
    return point, float(lo), float(hi)


def _mean_boot(values, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    return controls.bootstrap_ci(np.asarray(values, dtype=np.float64), n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------------------------- the cache
def _sample_key(s) -> tuple:
    return (getattr(s, "seed", None), getattr(s, "index", None), getattr(s, "family", None), s.question, s.answer)


class FindingsCache:
    """Per-sample computations shared between claims, bound to one model and one list of samples.

    ``get(name, compute)`` returns the stored value or computes and stores it. A cache used with
    another model or other samples raises (a silently mixed result is the worst defect)."""

    def __init__(self, batch_size: int = 16, seed: int = 0):
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._owner: tuple | None = None
        self._store: dict[str, Any] = {}

    def bind(self, vlm, samples: Sequence) -> FindingsCache:
        owner = (id(vlm), tuple(_sample_key(s) for s in samples))
        if self._owner is None:
            self._owner = owner
        elif self._owner != owner:
            raise ValueError(
                "this FindingsCache holds results of another model or other samples; use one cache per (model, samples)"
            )
        return self

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self._store:
            self._store[name] = compute()
        return self._store[name]

    def __contains__(self, name: str) -> bool:
        return name in self._store


def _cache(cache: FindingsCache | None, vlm, samples) -> FindingsCache:
    return (cache or FindingsCache()).bind(vlm, samples)


def _batches(samples: Sequence, size: int):
    for start in range(0, len(samples), size):
        yield start, list(samples[start : start + size])


def _gold_first(vlm, samples) -> np.ndarray:
    from .reduction_sweep import _gold_ids

    return np.asarray([g[0] for g in _gold_ids(vlm, [s.answer for s in samples])], dtype=np.int64)


def _relevant_tokens(layout, sample) -> np.ndarray:
    from vtrlab.data.groundtruth import relevant_tokens

    rel = relevant_tokens(layout, sample)
    if rel is None:
        raise ValueError(f"sample {_sample_key(sample)[:3]} has no ground truth; the claims need relevant patches")
    return rel


def tower_norms_and_capture(vlm, samples, cache: FindingsCache) -> dict:
    """One forward per batch: the last prompt row's attention (mean over heads) at every LM layer and,
    when the model has a [CLS] token, [CLS] attention at every tower layer plus the norm of every tower
    token after every tower layer. Per sample: ``lm`` (layers, image tokens), ``first`` / ``image_share``
    (layers,), ``n_visible`` (real positions), ``relevant`` (image tokens), and with a tower ``cls``
    (vision layers, patches), ``norm`` (vision layers, patches)."""

    def compute():
        from vtrlab.models.hooks import record
        from vtrlab.probes import capture

        vision = bool(getattr(vlm, "has_cls", False))
        out = []
        vis_mods = {f"v{i}": m for i, m in enumerate(vlm.vision_layers)} if vision else {}
        for _, chunk in _batches(samples, cache.batch_size):
            batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])

            def run(batch=batch):
                return capture(vlm, batch, queries="last", layers="all", vision=vision, head_mean=True)

            if vis_mods:
                with record(outputs=vis_mods, transform=lambda t: t.float().norm(dim=-1).cpu().numpy()) as seen:
                    ds = run()
            else:
                ds, seen = run(), {}
            att = ds.lm_attn.values[:, :, 0, :].astype(np.float64)  # (B, L, key)
            for b, (lay, s) in enumerate(zip(batch.layouts, chunk)):
                img = np.asarray(lay.image_positions)
                valid = np.asarray(lay.valid_positions)
                row = {
                    "lm": att[b][:, img],
                    "image_share": att[b][:, img].sum(1),
                    "first": att[b][:, valid[0]],
                    "n_visible": int(valid.size),
                    "n_image": int(img.size),
                    "relevant": _relevant_tokens(lay, s),
                }
                if vision:
                    crop = ds.vision_key_crop.values[b]
                    vpos = ds.vision_key_vpos.values[b]
                    patch = ds.vision_key_row.values[b] >= 0  # [CLS] and padding have no grid row
                    c = int(crop[patch][0])
                    va = ds.vision_attn.values[b]
                    va = va.mean(1) if va.ndim == 3 else va  # (vision_layer, vision_key)
                    row["cls"] = va[:, patch].astype(np.float64)
                    row["norm"] = np.stack([seen[f"v{i}"][c][vpos[patch]] for i in range(len(vis_mods))])
                out.append(row)
        return out

    return cache.get("capture", compute)


# --------------------------------------------------------------------------------------------- claims
CLAIMS: dict[str, dict[str, str]] = {
    "fastv": {
        "title": "Attention to image tokens collapses after layer 2",
        "source": "FastV (Chen et al., 2024)",
    },
    "feather": {
        "title": "Last-token attention favours late (bottom) image tokens, and so does FastV's selection",
        "source": "FEATHER (Endo et al., 2024)",
    },
    "zhang": {
        "title": "Image -> question flow in lower layers, question -> last in middle layers",
        "source": "Zhang et al., 2024",
    },
    "neo": {
        "title": "Object information is localised in the object's patches and decodable by the logit lens late",
        "source": "Neo et al., 2024",
    },
    "kaduri": {
        "title": "Blocking image -> generated tokens leaves the answer: the question tokens already read the image",
        "source": "Kaduri et al., 2024",
    },
    "wen": {
        "title": "Random pruning beats most methods at moderate keep ratios; reading (OCR) is most fragile",
        "source": "UniPruneBench (2025); Wen et al., 2025",
    },
    "when_less": {
        "title": "The learned selector beats random on reading at <= 50% keep; random 30% ~ full on scenes",
        "source": "When Less is Enough (Allakhverdov et al., 2025)",
    },
    "gsearch": {
        "title": "Token rankings agree across layers except the first",
        "source": "G-Search (2025)",
    },
    "darcet": {
        "title": "High-norm tower tokens absorb [CLS] attention",
        "source": "Darcet et al., 2024",
    },
    "haurum": {
        "title": "Kept-set similarity to the best method predicts accuracy",
        "source": "Haurum et al., 2023",
    },
}


def scaled_layer(layer: int, n_layers: int) -> int:
    """Layer ``layer`` of a 32-layer LM mapped to an LM of ``n_layers`` (round(layer * n / 32), in range)."""
    return int(min(max(round(layer * n_layers / REFERENCE_DEPTH), 0), n_layers - 1))


def fastv(
    vlm,
    samples,
    *,
    cache: FindingsCache | None = None,
    shallow: int = 2,
    threshold: float = 0.5,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """FastV: the last prompt row's attention share on image tokens in layers >= ``shallow`` over its share in
    layers < ``shallow`` (a ratio of means over samples). FastV reports image tokens getting far less attention
    from layer 2 on than in the two shallow layers. Rule: replicated when the ratio's CI lies below
    ``threshold`` (0.5: deep layers give image tokens less than half their shallow share), refuted when it
    lies at or above it. Not applicable with fewer than ``shallow`` + 1 LM layers. ``data``: per-layer image
    share and first-token share (mean and CI), and the image tokens' share of positions (uniform attention)."""
    cache = _cache(cache, vlm, samples)
    n_layers = len(vlm.lm_layers)
    if n_layers <= shallow:
        return not_applicable("fastv", f"the LM has {n_layers} layers; the claim is about layers >= {shallow}")
    cap = tower_norms_and_capture(vlm, samples, cache)
    share = np.stack([r["image_share"] for r in cap])  # (n, L)
    first = np.stack([r["first"] for r in cap])
    deep, shal = share[:, shallow:].mean(1), share[:, :shallow].mean(1)
    stat = boot(lambda i: deep[i].mean() / shal[i].mean(), len(cap), n_boot, seed)
    p = part(
        "deep / shallow image share",
        f"last row's attention share on image tokens, layers >= {shallow} over layers < {shallow}",
        stat,
        len(cap),
        threshold,
        "<",
    )
    data = {
        "layers": list(range(n_layers)),
        "image_share": [_mean_boot(share[:, j], n_boot, seed) for j in range(n_layers)],
        "first_share": [_mean_boot(first[:, j], n_boot, seed) for j in range(n_layers)],
        "uniform_image_share": float(np.mean([r["n_image"] / r["n_visible"] for r in cap])),
        "shallow": shallow,
    }
    note = (
        f"first token (FastV's sink) gets {_fmt(first[:, shallow:].mean())} of the last row's attention in layers "
        f">= {shallow}; image tokens are {_fmt(data['uniform_image_share'])} of the positions"
    )
    return make_record("fastv", [p], data, note)


def _raster_spearman(scores: np.ndarray) -> float:
    return float(agreement.spearman(scores, np.arange(scores.shape[-1], dtype=np.float64)))


def feather(
    vlm,
    samples,
    *,
    cache: FindingsCache | None = None,
    keep: float = REDUCTION_BUDGETS[0],
    methods: Sequence[str] = REDUCTION_METHODS,
    budgets: Sequence[float] = REDUCTION_BUDGETS,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """FEATHER: Spearman correlation of the last prompt row's attention over the image tokens with their
    sequence (raster) order — positive: later, lower tokens get more — at FastV's selection layer (its
    default, scaled to this LM's depth), and the same correlation for FastV's kept set at ``keep``
    (1 = kept, 0 = dropped, from the shared reduction sweep). Rule, for each part: replicated when the
    mean's CI lies above 0, refuted when it lies at or below 0; the claim combines both parts.
    ``data``: the attention correlation per layer (mean, CI)."""
    from .reduction_sweep import depth_scaled_params

    cache = _cache(cache, vlm, samples)
    cap = tower_norms_and_capture(vlm, samples, cache)
    n_layers = len(vlm.lm_layers)
    from vtrlab.reduce import get

    layer = int(depth_scaled_params(vlm, "fastv").get("layer", get("fastv").defaults["layer"]))
    rho = np.array([[_raster_spearman(r["lm"][j]) for j in range(n_layers)] for r in cap])  # (n, L)
    p1 = part(
        f"attention vs raster order, layer {layer}",
        f"Spearman of the last row's attention over image tokens with their raster index (LM layer {layer}, "
        "FastV's layer)",
        _mean_boot(rho[:, layer], n_boot, seed),
        len(cap),
        0.0,
        ">",
    )
    _, tokens = reduction_sweep_cached(vlm, samples, cache, ["fastv"], [keep], methods, budgets)
    t = tokens[(tokens["method"] == "fastv") & np.isclose(tokens["budget"], keep)]
    kept_rho = np.array(
        [_raster_spearman(g.sort_values("token")["kept"].to_numpy(np.float64)) for _, g in t.groupby("sample")]
    )
    p2 = part(
        f"FastV's kept set vs raster order ({keep:.0%} keep)",
        "Spearman of FastV's keep indicator with the image tokens' raster index",
        _mean_boot(kept_rho, n_boot, seed),
        len(kept_rho),
        0.0,
        ">",
    )
    data = {
        "layers": list(range(n_layers)),
        "spearman": [_mean_boot(rho[:, j], n_boot, seed) for j in range(n_layers)],
        "fastv_layer": layer,
        "fastv_kept_spearman": list(_mean_boot(kept_rho, n_boot, seed)),
    }
    return make_record("feather", [p1, p2], data)


def zhang(
    vlm,
    samples,
    *,
    cache: FindingsCache | None = None,
    window: int | None = None,
    min_effect: float = 0.1,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Zhang et al.: cut image -> question and question -> last attention edges in non-overlapping windows of
    ``window`` consecutive LM layers (default: their 9 of 32, scaled to this depth) with
    :func:`vtrlab.flow.knockout_sweep`;
    the effect of a window is the mean drop of p(model's answer), -relative change. Parts: (1) and (2) each
    edge matters somewhere: its largest mean effect over windows has a CI above ``min_effect``; (3) the
    order: the effect-weighted mean layer (centre of each window, weights = positive effects) of
    question -> last minus that of image -> question, claimed > 0 (the image reaches the question earlier
    than the question reaches the last position). Not applicable when no question token follows the image
    (nothing for the image to flow into). ``data``: the effect per window for both edges (mean, CI)."""
    from vtrlab.flow import EDGES, knockout_sweep

    cache = _cache(cache, vlm, samples)
    n_layers = len(vlm.lm_layers)
    window = window or max(1, round(9 * n_layers / REFERENCE_DEPTH))
    probe = vlm.prepare([samples[0].image], [samples[0].question]).layouts[0]
    if not (np.asarray(probe.question_positions).size and probe.question_positions.min() > probe.image_positions.max()):
        return not_applicable("zhang", "no question token follows the image: image -> question flow cannot occur")
    edges = {k: EDGES[k] for k in ("image→question", "question→last")}

    def compute():
        parts = []
        for start, chunk in _batches(samples, cache.batch_size):
            batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
            sw = knockout_sweep(vlm, batch, edges=edges, window=window, stride=window)
            parts.append(-sw.relative_change.values)  # (edge, window, B)
            mids = (sw.window_start.values + sw.window_stop.values - 1) / 2
        return np.concatenate(parts, axis=2), mids

    eff, mids = cache.get(f"knockout_sweep/{window}", compute)  # (2, W, n)
    n = eff.shape[2]

    def peak(e):
        return lambda i: eff[e][:, i].mean(1).max()

    def centroid(e, i):
        w = np.clip(eff[e][:, i].mean(1), 0, None)
        return float((w * mids).sum() / w.sum()) if w.sum() > 0 else float("nan")

    p1 = part(
        "image->question peak effect",
        "largest mean drop of p(answer) when image->question is cut",
        boot(peak(0), n, n_boot, seed),
        n,
        min_effect,
        ">",
    )
    p2 = part(
        "question->last peak effect",
        "largest mean drop of p(answer) when question->last is cut",
        boot(peak(1), n, n_boot, seed),
        n,
        min_effect,
        ">",
    )
    p3 = part(
        "layer order (question->last minus image->question)",
        "effect-weighted mean layer of the question->last cut minus that of the image->question cut",
        boot(lambda i: centroid(1, i) - centroid(0, i), n, n_boot, seed),
        n,
        0.0,
        ">",
    )
    data = {
        "window": window,
        "window_mid": mids,
        "edges": list(edges),
        "effect": [[_mean_boot(eff[e, w], n_boot, seed) for w in range(eff.shape[1])] for e in range(2)],
    }
    return make_record("zhang", [p3, p1, p2], data)


def _answers(vlm, samples, cache: FindingsCache, name: str, masks_of: Callable) -> np.ndarray:
    """Greedy exact match per sample with keep masks ``masks_of(layouts, chunk, start)`` (per sample bool over
    the image tokens; None = all), answered through the keep-mask path, cached under ``name``."""

    def compute():
        from vtrlab.metrics.answers import answer_accuracy
        from vtrlab.reduce import answer, decoder_inputs

        from .reduction_sweep import _gold_ids

        out = []
        for start, chunk in _batches(samples, cache.batch_size):
            batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
            width = max(len(g) for g in _gold_ids(vlm, [s.answer for s in chunk])) + 1
            masks = masks_of(list(batch.layouts), chunk, start)
            pred = answer(vlm, batch, keep=masks, max_new_tokens=width, decoder_inputs=decoder_inputs(vlm, batch))
            out.extend(answer_accuracy(p, [s.answer]) == 1.0 for p, s in zip(pred, chunk))
        return np.asarray(out, dtype=np.float64)

    return cache.get(f"answers/{name}", compute)


def _drop_relevant(layouts, chunk, start):
    return [~_relevant_tokens(lay, s) for lay, s in zip(layouts, chunk)]


def _drop_matched_random(seed: int):
    def masks(layouts, chunk, start):
        out = []
        for i, (lay, s) in enumerate(zip(layouts, chunk)):
            rel = _relevant_tokens(lay, s)
            other = np.flatnonzero(~rel)
            rng = np.random.default_rng([seed, start + i])
            drop = rng.choice(other, size=min(int(rel.sum()), other.size), replace=False)
            keep = np.ones(rel.size, dtype=bool)
            keep[drop] = False
            out.append(keep)
        return out

    return masks


def neo(
    vlm, samples, *, cache: FindingsCache | None = None, top_k: int = 5, n_boot: int = N_BOOT, seed: int = 0
) -> dict:
    """Neo et al.: (1) localisation — accuracy with as many random non-object tokens removed as the
    question's object has, minus accuracy with the object's (relevant) tokens removed, claimed > 0;
    (2) decodable late — the share of samples whose gold answer token is among the logit lens' top
    ``top_k`` at some relevant image token in some layer of the later half of the LM, claimed > 0.5;
    (3) localised in the lens — AUROC of the gold token's lens probability (max over the later half)
    separating relevant from other image tokens, claimed > 0.5. Rule per part as in :func:`verdict_of`;
    samples whose mask is empty or covers every token are left out. ``data``: accuracies (full,
    random removed, object removed) and the top-k hit rate at relevant tokens per layer."""
    from vtrlab.flow import logit_lens

    cache = _cache(cache, vlm, samples)
    full = _answers(vlm, samples, cache, "full", lambda layouts, chunk, start: None)
    obj = _answers(vlm, samples, cache, "drop_relevant", _drop_relevant)
    rnd = _answers(vlm, samples, cache, f"drop_matched_random/{cache.seed}", _drop_matched_random(cache.seed))
    n_layers = len(vlm.lm_layers)
    late = list(range(n_layers // 2, n_layers))

    def compute_lens():
        hit, au = [], []
        gold = _gold_first(vlm, samples)
        for start, chunk in _batches(samples, cache.batch_size):
            batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
            ds = logit_lens(
                vlm,
                batch,
                queries="image",
                layers="all",
                targets=[int(g) for g in gold[start : start + len(chunk)]],
                top_k=top_k,
            )
            for b, (lay, s) in enumerate(zip(batch.layouts, chunk)):
                rel = _relevant_tokens(lay, s)
                m = int(lay.n_image_tokens)
                rank = ds.target_rank.values[b, :, :m, 0]  # (L, tokens), layout order
                prob = ds.target_prob.values[b, :, :m, 0]
                hit.append((rank[:, rel] < top_k).any(1) if rel.any() else np.full(n_layers, np.nan))
                ok = rel.any() and not rel.all()
                au.append(float(agreement.auroc(prob[late].max(0), rel)) if ok else np.nan)
        return np.asarray(hit, dtype=np.float64), np.asarray(au)

    hit, au = cache.get(f"logit_lens/{top_k}", compute_lens)
    ok = np.isfinite(au)
    diff = rnd - obj
    p1 = part(
        "localisation (random minus object removed)",
        "accuracy with matched random non-object tokens removed minus accuracy with the object's tokens removed",
        _mean_boot(diff[ok], n_boot, seed),
        int(ok.sum()),
        0.0,
        ">",
    )
    late_hit = np.nanmax(hit[:, late], axis=1)
    p2 = part(
        f"gold token in the lens' top-{top_k} at the object, late layers",
        f"share of samples whose gold token is in the logit lens' top {top_k} at a relevant token, layers "
        f"{late[0]}-{late[-1]}",
        _mean_boot(late_hit[ok], n_boot, seed),
        int(ok.sum()),
        0.5,
        ">",
    )
    p3 = part(
        "lens localised (AUROC, relevant vs other tokens)",
        "AUROC of the gold token's lens probability (max over late layers), relevant vs other image tokens",
        _mean_boot(au[ok], n_boot, seed),
        int(ok.sum()),
        0.5,
        ">",
    )
    data = {
        "accuracy": {
            k: list(_mean_boot(v[ok], n_boot, seed))
            for k, v in (("full", full), ("random removed", rnd), ("object removed", obj))
        },
        "layers": list(range(n_layers)),
        "hit_rate": [_mean_boot(hit[ok, j], n_boot, seed) for j in range(n_layers)],
        "late_layers": late,
        "top_k": top_k,
    }
    return make_record("neo", [p1, p2, p3], data)


def kaduri(
    vlm,
    samples,
    *,
    cache: FindingsCache | None = None,
    min_gap: float = 0.2,
    threshold: float = 0.5,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Kaduri et al.: with :func:`vtrlab.knockout` at every LM layer, the first answer token's accuracy (argmax
    at the last prompt position = the gold answer's first token) (a) plain, (b) with image -> last cut,
    (c) with image -> every text position cut (blind: the image can reach the answer by no path). The
    statistic is the share of the image's contribution that survives cutting image -> last:
    (acc_b - acc_c) / (acc_a - acc_c); claimed > ``threshold`` (the answer mostly survives because the
    question and template tokens already read the image). Not applicable when the image barely matters
    (acc_a - acc_c < ``min_gap``). ``data``: the three accuracies."""
    from vtrlab.flow import knockout

    cache = _cache(cache, vlm, samples)

    def compute():
        gold = _gold_first(vlm, samples)
        rows = []
        for start, chunk in _batches(samples, cache.batch_size):
            batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
            tgt = [int(g) for g in gold[start : start + len(chunk)]]
            last = knockout(vlm, batch, keys="image", queries="last", layers="all", target=tgt)
            blind = knockout(vlm, batch, keys="image", queries="text", layers="all", target=tgt)
            g = np.asarray(tgt)
            rows.append(
                np.stack(
                    [
                        last.logprobs_clean.values.argmax(-1) == g,
                        last.logprobs.values.argmax(-1) == g,
                        blind.logprobs.values.argmax(-1) == g,
                    ],
                    1,
                )
            )
        return np.concatenate(rows).astype(np.float64)  # (n, 3): plain, image->last cut, blind

    acc = cache.get("kaduri", compute)
    n = len(acc)
    a, b, c = acc.mean(0)
    data = {
        "accuracy": {
            k: list(_mean_boot(acc[:, j], n_boot, seed))
            for j, k in enumerate(("plain", "image->last cut", "image->text cut (blind)"))
        }
    }
    if a - c < min_gap:
        return not_applicable(
            "kaduri",
            f"the image barely matters to the first answer token: plain {_fmt(a)} vs blind {_fmt(c)} (gap < {min_gap})",
            n=n,
            data=data,
        )

    def retained(i):
        x = acc[i].mean(0)
        gap = x[0] - x[2]
        return (x[1] - x[2]) / gap if gap > 0 else float("nan")

    p = part(
        "share of the image's contribution left after cutting image->last",
        "(acc with image->last cut - blind acc) / (plain acc - blind acc), first answer token, all LM layers",
        boot(retained, n, n_boot, seed),
        n,
        threshold,
        ">",
    )
    return make_record("kaduri", [p], data)


# --------------------------------------------------------------------------------------------- reduction
def reduction_sweep_cached(
    vlm,
    samples,
    cache: FindingsCache,
    methods: Sequence[str],
    budgets: Sequence[float],
    all_methods: Sequence[str] = REDUCTION_METHODS,
    all_budgets: Sequence[float] = REDUCTION_BUDGETS,
):
    """The shared :func:`vtrlab.analysis.reduction_sweep.reduction_sweep` (random with two seeds) over the union of
    ``all_methods`` and ``all_budgets`` with what this claim needs, run once per cache; returns its
    ``(answers, tokens)`` restricted to ``methods`` (+ full) at ``budgets``."""
    from .reduction_sweep import reduction_sweep

    want_m = list(dict.fromkeys([*all_methods, *methods]))
    want_b = sorted({float(b) for b in (*all_budgets, *budgets)})
    done = cache.get("sweep", lambda: {"answers": [], "tokens": [], "have": set()})
    missing_m = sorted({m for m in want_m for b in want_b if (m, b) not in done["have"]})
    if missing_m:
        seeds = (cache.seed, cache.seed + 1)
        ans, tok = reduction_sweep(
            vlm, samples, missing_m, want_b, seeds=seeds, batch_size=cache.batch_size, progress=False
        )
        if done["answers"]:
            ans = ans[ans["method"] != "full"]
        done["answers"].append(ans)
        done["tokens"].append(tok)
        done["have"] |= {(m, b) for m in missing_m for b in want_b}
    answers = pd.concat(done["answers"], ignore_index=True)
    tokens = pd.concat(done["tokens"], ignore_index=True)
    keep_m = set(methods) | {"full"}
    bud = np.asarray([float(b) for b in budgets])
    sel_a = answers["method"].isin(keep_m) & (
        answers["method"].eq("full") | np.isclose(answers["budget"].to_numpy()[:, None], bud).any(1)
    )
    sel_t = tokens["method"].isin(keep_m) & np.isclose(tokens["budget"].to_numpy()[:, None], bud).any(1)
    return answers[sel_a].reset_index(drop=True), tokens[sel_t].reset_index(drop=True)


def accuracy_matrix(answers: pd.DataFrame, budget: float | None = None) -> pd.DataFrame:
    """Exact match per sample (rows) and method (columns) at ``budget`` (full: always), random averaged
    over its seeds."""
    a = answers if budget is None else answers[answers["method"].eq("full") | np.isclose(answers["budget"], budget)]
    return a.assign(correct=a["correct"].astype(np.float64)).pivot_table(
        index="sample", columns="method", values="correct", aggfunc="mean"
    )


def _known_families(answers: pd.DataFrame, samples) -> list[str]:
    full = answers[answers["method"] == "full"].groupby("family")["correct"].mean()
    return [f for f in dict.fromkeys(s.family for s in samples) if full.get(f, 0.0) >= KNOWN_TASK]


def wen(
    vlm,
    samples,
    *,
    cache: FindingsCache | None = None,
    budget: float = 0.5,
    methods: Sequence[str] = REDUCTION_METHODS,
    budgets: Sequence[float] = REDUCTION_BUDGETS,
    fragile: str = "reading",
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """UniPruneBench / Wen et al.: (1) the share of reduction methods (every method of the sweep but random
    and the oracle) whose accuracy at keep ratio ``budget`` is below random keep's (mean over seeds),
    claimed > 0.5 ("most"); (2) reading is the most fragile: its relative accuracy drop at ``budget``
    (1 - reduced / full, mean over methods and random) minus the largest drop of another family, claimed
    > 0. Only families the model has learnt (full accuracy >= KNOWN_TASK) are compared; not applicable
    when reading is not among them or fewer than two methods ran. ``data``: accuracy per method and
    relative drop per family."""
    cache = _cache(cache, vlm, samples)
    answers, _ = reduction_sweep_cached(vlm, samples, cache, methods, [budget], methods, budgets)
    acc = accuracy_matrix(answers, budget)
    ranked = [m for m in acc.columns if m not in NOT_METHODS]
    if "random" not in acc.columns or len(ranked) < 2:
        return not_applicable("wen", f"the sweep has {len(ranked)} methods besides random; need random and >= 2")
    A = acc[ranked].to_numpy()
    R = acc["random"].to_numpy()
    n = len(acc)
    p1 = part(
        f"share of methods below random ({budget:.0%} keep)",
        f"share of the {len(ranked)} methods whose accuracy at {budget:.0%} keep is below random keep's",
        boot(lambda i: float((A[i].mean(0) < R[i].mean()).mean()), n, n_boot, seed),
        n,
        0.5,
        ">",
    )
    fams = np.asarray([s.family for s in samples])[acc.index.to_numpy()]
    known = _known_families(answers, samples)
    red_cols = [*ranked, "random"]
    D = acc[red_cols].to_numpy()
    F = acc["full"].to_numpy()
    data = {
        "budget": budget,
        "methods": [*ranked, "random", "full"],
        "accuracy": [list(_mean_boot(acc[m].to_numpy(), n_boot, seed)) for m in [*ranked, "random", "full"]],
        "families": known,
    }

    def drop(i, fam):
        sel = i[fams[i] == fam]
        f = F[sel].mean() if sel.size else float("nan")
        return 1 - D[sel].mean() / f if sel.size and f > 0 else float("nan")

    data["drop"] = [list(boot(lambda i, f=f: drop(i, f), n, n_boot, seed)) for f in known]
    if fragile not in known or len(known) < 2:
        note = f"{fragile} is not among the learnt families {known}: its fragility cannot be compared"
        return make_record("wen", [p1], data, note)

    others = [f for f in known if f != fragile]
    p2 = part(
        f"{fragile} drop minus the largest other drop",
        f"relative accuracy drop of {fragile} at {budget:.0%} keep (mean over methods) minus the largest among "
        f"{', '.join(others)}",
        boot(lambda i: drop(i, fragile) - max(drop(i, f) for f in others), n, n_boot, seed),
        n,
        0.0,
        ">",
    )
    return make_record("wen", [p1, p2], data)


def when_less(
    vlm,
    samples,
    *,
    cache: FindingsCache | None = None,
    reading: str = "reading",
    reading_budgets: Sequence[float] = REDUCTION_BUDGETS,
    scene_budget: float = 0.3,
    margin: float = 0.05,
    methods: Sequence[str] = REDUCTION_METHODS,
    budgets: Sequence[float] = REDUCTION_BUDGETS,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """ "When Less is Enough": (1) on reading, the learned selector's accuracy minus random keep's (mean over
    seeds), averaged over the keep ratios ``reading_budgets`` (all <= 0.5), claimed > 0; (2) on scenes (every
    learnt family but reading), full accuracy minus random keep's at ``scene_budget``, claimed < ``margin``
    (random 30% ~ full: within 5 points). Families the model has not learnt (full accuracy < KNOWN_TASK)
    are left out of (2). ``data``: per budget, selector and random accuracy on reading, and full vs random
    on each scene family."""
    cache = _cache(cache, vlm, samples)
    if any(b > 0.5 for b in reading_budgets):
        raise ValueError(f"reading_budgets={list(reading_budgets)}: the claim is about keep ratios <= 0.5")
    need = sorted({*reading_budgets, scene_budget})
    answers, _ = reduction_sweep_cached(vlm, samples, cache, ["selector", "random"], need, methods, budgets)
    fams_all = np.asarray([s.family for s in samples])
    parts, data = [], {"reading_budgets": list(reading_budgets), "scene_budget": scene_budget}
    rd = np.flatnonzero(fams_all == reading)
    if rd.size:
        mats = [accuracy_matrix(answers, b).loc[rd] for b in reading_budgets]
        diff = np.mean([m["selector"].to_numpy() - m["random"].to_numpy() for m in mats], axis=0)
        parts.append(
            part(
                f"{reading}: selector minus random (keep {', '.join(f'{b:.0%}' for b in reading_budgets)})",
                f"accuracy of the selector minus random keep on {reading}, mean over keep ratios",
                _mean_boot(diff, n_boot, seed),
                rd.size,
                0.0,
                ">",
            )
        )
        data["reading"] = {
            m: [list(_mean_boot(x[m].to_numpy(), n_boot, seed)) for x in mats] for m in ("selector", "random")
        }
    scenes = [f for f in _known_families(answers, samples) if f != reading]
    sc = np.flatnonzero(np.isin(fams_all, scenes))
    if sc.size:
        m = accuracy_matrix(answers, scene_budget).loc[sc]
        gap = m["full"].to_numpy() - m["random"].to_numpy()
        parts.append(
            part(
                f"scenes: full minus random {scene_budget:.0%}",
                f"full accuracy minus random keep at {scene_budget:.0%} on {', '.join(scenes)}",
                _mean_boot(gap, n_boot, seed),
                sc.size,
                margin,
                "<",
            )
        )
        fam_sc = fams_all[sc]
        data["scenes"] = {
            f: {k: list(_mean_boot(m[k].to_numpy()[fam_sc == f], n_boot, seed)) for k in ("full", "random")}
            for f in scenes
        }
    if not parts:
        return not_applicable("when_less", f"no {reading} sample and no learnt scene family among the samples")
    return make_record("when_less", parts, data)


def gsearch(
    vlm, samples, *, cache: FindingsCache | None = None, agree: float = 0.5, n_boot: int = N_BOOT, seed: int = 0
) -> dict:
    """G-Search: per sample, Spearman between every pair of LM layers' rankings of the image tokens by the last
    prompt row's attention. (1) the mean over pairs of layers >= 1 is claimed > ``agree`` (the rankings
    agree); (2) that mean minus the mean correlation of layer 0 with layers >= 1 is claimed > 0 (the first
    layer is the exception). ``data``: the layer x layer mean correlation."""
    cache = _cache(cache, vlm, samples)
    cap = tower_norms_and_capture(vlm, samples, cache)
    n_layers = len(vlm.lm_layers)
    if n_layers < 3:
        return not_applicable("gsearch", f"the LM has {n_layers} layers; need >= 3 to compare later layers")
    mats = np.stack([agreement.spearman(r["lm"][:, None], r["lm"][None, :]) for r in cap])  # (n, L, L)
    iu = np.triu_indices(n_layers - 1, k=1)
    later = np.nanmean(mats[:, 1:, 1:][:, iu[0], iu[1]], axis=1)
    first = np.nanmean(mats[:, 0, 1:], axis=1)
    p1 = part(
        "agreement among layers >= 1",
        "mean Spearman between the image-token rankings of every pair of layers >= 1",
        _mean_boot(later, n_boot, seed),
        len(cap),
        agree,
        ">",
    )
    p2 = part(
        "later-layer agreement minus layer 0's",
        "mean Spearman among layers >= 1 minus mean Spearman of layer 0 with them",
        _mean_boot(later - first, n_boot, seed),
        len(cap),
        0.0,
        ">",
    )
    return make_record("gsearch", [p1, p2], {"matrix": np.nanmean(mats, axis=0)})


def darcet(
    vlm, samples, *, cache: FindingsCache | None = None, factor: float = HIGH_NORM, n_boot: int = N_BOOT, seed: int = 0
) -> dict:
    """Darcet et al.: tower tokens whose norm after a layer exceeds ``factor`` x the median norm of their
    picture's patches (high-norm tokens, as in the organism's realism record) and the share of the next
    layer's [CLS] attention they take, over their share of the patches (lift; 1 = no preference), claimed
    > 1. Not applicable when the model has no [CLS] token, or when no tower token in any sample is high-norm
    (then nothing can absorb attention; the largest norm / median is reported). ``data``: per tower layer
    the largest norm / median and the count of high-norm tokens per picture."""
    cache = _cache(cache, vlm, samples)
    if not getattr(vlm, "has_cls", False):
        return not_applicable("darcet", "the vision tower has no [CLS] token")
    cap = tower_norms_and_capture(vlm, samples, cache)
    ratio = np.stack([r["norm"] / np.median(r["norm"], axis=1, keepdims=True) for r in cap])  # (n, V, P)
    high = ratio > factor
    data = {
        "factor": factor,
        "max_ratio": ratio.max(axis=(0, 2)),
        "high_per_image": high.sum(2).mean(0),
        "ratio_hist": np.histogram(ratio.ravel(), bins=40, range=(0, max(factor * 1.5, float(ratio.max()))))[0],
        "hist_range": [0, max(factor * 1.5, float(ratio.max()))],
    }
    if not high[:, :-1].any():
        return not_applicable(
            "darcet",
            f"no tower token exceeds {factor:g}x the median norm of its picture (largest ratio {_fmt(ratio.max())}): "
            "the high-norm tokens Darcet et al. find in large, long-trained ViTs do not form here",
            measure=f"tokens with norm > {factor:g}x median",
            n=len(cap),
            data=data,
        )
    lifts = []
    for r, h in zip(cap, high):
        for v in range(h.shape[0] - 1):  # high-norm after layer v -> [CLS] attention at layer v + 1
            if h[v].any():
                cls = r["cls"][v + 1] / r["cls"][v + 1].sum()
                lifts.append(float(controls.relevant_lift(cls, h[v])))
    p = part(
        "[CLS] attention lift on high-norm tokens",
        "share of [CLS] attention on high-norm tokens over their share of the patches",
        _mean_boot(lifts, n_boot, seed),
        len(lifts),
        1.0,
        ">",
    )
    return make_record("darcet", [p], data)


def haurum(
    vlm,
    samples,
    *,
    cache: FindingsCache | None = None,
    methods: Sequence[str] = REDUCTION_METHODS,
    budgets: Sequence[float] = REDUCTION_BUDGETS,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Haurum et al.: at each keep ratio, the reduction methods (random seeds as separate entries, no oracle)
    are ranked by accuracy; the best one is the reference; for every other entry, the mean Jaccard index
    of its kept set with the reference's and its accuracy. The statistic is Spearman's correlation between
    the two across entries, averaged over keep ratios; claimed > 0 (closer to the best method's kept set,
    more accurate). The best method is chosen again in every bootstrap resample. ``data``: the (Jaccard,
    accuracy) points per keep ratio."""
    cache = _cache(cache, vlm, samples)
    _, tokens = reduction_sweep_cached(vlm, samples, cache, methods, budgets, methods, budgets)
    answers, _ = reduction_sweep_cached(vlm, samples, cache, methods, budgets, methods, budgets)
    t = tokens[tokens["method"] != "oracle"]
    a = answers[~answers["method"].isin(("full", "oracle"))]
    n = len(samples)
    per_budget = {}
    for b in sorted(t["budget"].unique()):
        tb, ab = t[np.isclose(t["budget"], b)], a[np.isclose(a["budget"], b)]
        labels = sorted({(m, s) for m, s in zip(tb["method"], tb["seed"])})
        if len(labels) < 4:
            continue
        kept = np.stack(
            [
                np.stack(
                    [
                        g.sort_values("token")["kept"].to_numpy(bool)
                        for _, g in tb[(tb["method"] == m) & (tb["seed"] == s)].groupby("sample", sort=True)
                    ]
                )
                for m, s in labels
            ]
        )  # (E, n, T)
        corr = np.stack(
            [
                ab[(ab["method"] == m) & (ab["seed"] == s)].sort_values("sample")["correct"].to_numpy(np.float64)
                for m, s in labels
            ]
        )  # (E, n)
        inter = (kept[:, None] & kept[None, :]).sum(-1)
        union = (kept[:, None] | kept[None, :]).sum(-1)
        jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # (E, E, n)
        per_budget[float(b)] = (labels, jac, corr)
    if not per_budget:
        return not_applicable("haurum", "fewer than 4 reduction entries per keep ratio: no correlation to compute")

    def stat(i, detail=False):
        rhos, pts = [], {}
        for b, (labels, jac, corr) in per_budget.items():
            acc = corr[:, i].mean(1)
            best = int(np.argmax(acc))
            others = [e for e in range(len(labels)) if e != best]
            j = jac[best][:, i].mean(1)[others]
            x = acc[others]
            if np.ptp(j) > 0 and np.ptp(x) > 0:
                rhos.append(float(agreement.spearman(j, x)))
            pts[b] = {
                "best": "{}{}".format(*labels[best][:1], "" if labels[best][1] < 0 else f":{labels[best][1]}"),
                "jaccard": j,
                "accuracy": x,
                "labels": [labels[e][0] + ("" if labels[e][1] < 0 else f":{labels[e][1]}") for e in others],
            }
        return pts if detail else (float(np.mean(rhos)) if rhos else float("nan"))

    p = part(
        "Spearman(Jaccard to the best method, accuracy)",
        "Spearman across methods of the kept set's Jaccard with the most accurate method's and the accuracy, "
        "mean over keep ratios",
        boot(stat, n, n_boot, seed),
        n,
        0.0,
        ">",
    )
    return make_record("haurum", [p], {"points": stat(np.arange(n), detail=True)})


CLAIM_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "fastv": fastv,
    "feather": feather,
    "zhang": zhang,
    "neo": neo,
    "kaduri": kaduri,
    "wen": wen,
    "when_less": when_less,
    "gsearch": gsearch,
    "darcet": darcet,
    "haurum": haurum,
}


def run_all(
    vlm,
    samples,
    *,
    claims: Sequence[str] | None = None,
    cache: FindingsCache | None = None,
    methods: Sequence[str] = REDUCTION_METHODS,
    budgets: Sequence[float] = REDUCTION_BUDGETS,
    n_boot: int = N_BOOT,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Every claim (or those named in ``claims``) on ``samples``, sharing one cache; records in order. The reduction
    claims use ``budgets``: FEATHER's kept set at the smallest, Wen et al. at the largest, "When Less is Enough"
    on reading at those <= 0.5 and on scenes at the one nearest 0.3."""
    names = list(CLAIM_FUNCTIONS) if claims is None else list(claims)
    bad = [c for c in names if c not in CLAIM_FUNCTIONS]
    if bad:
        raise ValueError(f"claims {bad} are not known; accepted: {', '.join(CLAIM_FUNCTIONS)}")
    cache = _cache(cache or FindingsCache(seed=seed), vlm, samples)
    out = []
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="claims", disable=not progress):
        kw: dict[str, Any] = {"cache": cache, "n_boot": n_boot, "seed": seed}
        if name in ("feather", "wen", "when_less", "haurum"):
            kw |= {"methods": methods, "budgets": budgets}
        if name == "feather":
            kw["keep"] = min(budgets)
        if name == "wen":
            kw["budget"] = max(b for b in budgets)
        if name == "when_less":
            low = [b for b in budgets if b <= 0.5]
            if not low:
                out.append(not_applicable(name, f"no keep ratio <= 50% among budgets {list(budgets)}"))
                continue
            kw |= {"reading_budgets": low, "scene_budget": min(budgets, key=lambda b: abs(b - 0.3))}
        out.append(CLAIM_FUNCTIONS[name](vlm, samples, **kw))
    return out


# --------------------------------------------------------------------------------------------- tables
def findings_frame(records: Sequence[Mapping]) -> pd.DataFrame:
    """One row per claim: claim, source, title, measure, value, low, high, n, verdict, why."""
    return pd.DataFrame(
        [
            {
                "claim": r["claim"],
                "source": r["source"],
                "title": r["title"],
                "measure": r["measure"],
                "value": r["value"],
                "low": r["ci"][0],
                "high": r["ci"][1],
                "n": r["n"],
                "verdict": r["verdict"],
                "why": r["why"],
            }
            for r in records
        ]
    )


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(records: Sequence[Mapping]) -> str:
    """The findings as a markdown table (claim, value [95% CI], n, verdict, why), every number from the records."""
    lines = ["| claim (source) | measure | value [95% CI] | n | verdict | why |", "|---|---|---|---|---|---|"]
    for r in records:
        if r["value"] is None:
            val = "-"
        else:
            lo, hi = r["ci"]
            val = f"{_fmt(r['value'])} [{_fmt(lo)}, {_fmt(hi)}]"
        lines.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (
                    f"{r['title']} ({r['source']})",
                    r["measure"] or "-",
                    val,
                    r["n"],
                    f"**{r['verdict']}**",
                    r["why"],
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


START = "<!-- findings:start -->"
END = "<!-- findings:end -->"


def render_between_markers(text: str, table: str, header: str = "") -> str:
    """``text`` with everything between :data:`START` and :data:`END` replaced by ``header`` + ``table``;
    refuses text without exactly one pair of markers in order."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the text needs exactly one {START!r} followed by one {END!r}")
    pre, rest = text.split(START)
    _, post = rest.split(END)
    body = (header.rstrip() + "\n\n" if header else "") + table
    return f"{pre}{START}\n{body}{END}{post}"


def load_findings(path) -> dict:
    """A findings.json written by notebook 05: {"records": [...], "provenance": {...}}; refuses anything else."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        p = p / "findings.json"
    if not p.is_file():
        raise FileNotFoundError(f"no findings.json at {str(p)!r}; run notebooks/05_findings.ipynb (make figures)")
    doc = json.loads(p.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise ValueError(f"{p}: not a findings record (needs a 'records' list)")
    for r in doc["records"]:
        if r.get("verdict") not in VERDICTS:
            raise ValueError(f"{p}: claim {r.get('claim')!r} has verdict {r.get('verdict')!r}; accepted: {VERDICTS}")
    return doc


def provenance_line(doc: Mapping) -> str:
    """One sentence naming where a findings.json came from (model, samples, seed, commit)."""
    p = doc.get("provenance", {})
    bits = [
        f"model `{p.get('model', '?')}`",
        f"{p.get('n_samples', '?')} held-out samples ({p.get('per_family', '?')} "
        f"per family, data seed {p.get('seed', '?')})",
        f"{p.get('n_boot', '?')} bootstrap resamples",
    ]
    if p.get("git_commit"):
        bits.append(
            f"commit {str(p['git_commit'])[:10]}" + (" (with uncommitted changes)" if p.get("git_dirty") else "")
        )
    return "Generated by `notebooks/05_findings.ipynb` from `findings.json`: " + ", ".join(bits) + "."
