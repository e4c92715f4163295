"""Deletion and insertion curves: does removing (or adding) image tokens in a signal's order change the answer?

A *signal* is just a per-image-token score per sample (aligned with ``layout.image_positions``): attention
at a layer (``vtrlab.capture`` → :func:`vtrlab.analysis.attention.token_values`), vision [CLS] attention,
saliency, rollout, logit lens, reconstruction error, a reduction method's ``score``
(``vtrlab.reduce.apply(...)["score"]``), ground truth (:func:`ground_truth_signal`) or random
(:func:`random_signal`). :func:`deletion_curves` answers through the keep-mask path (``vtrlab.reduce``) with

* **deletion**: the top ``fraction`` of image tokens by the signal removed (a good signal makes the
  answer fail fast: low area under the curve);
* **insertion**: only the top ``fraction`` kept (a good signal recovers the answer fast: high area).

Ties in a signal are broken by a seeded random order (never by position, which would smuggle in a raster
bias). Conditions that keep very few image tokens (``0 < kept share < ood_below``) are far outside what the
model saw in training and are flagged ``out_of_distribution``; deletion at 0 and insertion at 1 are the full
model, deletion at 1 and insertion at 0 the no-image answer.

:func:`curve_table` and :func:`area_table` are the pure table builders (means with bootstrap CIs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vtrlab.metrics import controls

MODES = ("deletion", "insertion")
FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
ACCURACY = ("greedy", "teacher_forced")
OOD_BELOW = 0.1  # kept share of image tokens under which a condition is flagged out of distribution


def token_order(scores, seed: int | Sequence[int] = 0) -> np.ndarray:
    """Indices of the tokens from the highest score to the lowest; ties in a seeded random order."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"a signal is one score per image token; got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("signal contains NaN; give every image token a score (e.g. 0 for tokens no row sees)")
    tiebreak = np.random.default_rng(seed).permutation(s.size)
    return np.lexsort((tiebreak, -s))


def keep_mask(scores, fraction: float, mode: str, seed: int | Sequence[int] = 0) -> np.ndarray:
    """Bool keep mask over the image tokens: ``deletion`` drops the top round(fraction · n) tokens by
    ``scores``, ``insertion`` keeps only them."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; accepted: {MODES}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction={fraction!r}; accepted: a share of image tokens in [0, 1]")
    order = token_order(scores, seed)
    k = int(round(float(fraction) * order.size))
    top = np.zeros(order.size, dtype=bool)
    top[order[:k]] = True
    return ~top if mode == "deletion" else top


def random_signal(n_tokens: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """One uniform random score per image token per sample (sample i has ``n_tokens[i]`` tokens), seeded."""
    return [np.random.default_rng([seed, i]).random(int(n)) for i, n in enumerate(n_tokens)]


def ground_truth_signal(layouts: Sequence, records: Sequence) -> list[np.ndarray | None]:
    """Per sample: the covered fraction of each image token's pixel box by the ground truth
    (:func:`vtrlab.data.groundtruth.token_relevance`, NaN → 0); None for records without ground truth."""
    from vtrlab.data.groundtruth import token_relevance

    out = []
    for lay, rec in zip(layouts, records):
        cov = token_relevance(lay, rec)
        out.append(None if cov is None else np.nan_to_num(cov, nan=0.0))
    return out


def _correct(prediction: str, sample: Any) -> bool:
    from vtrlab.data.answers import answer_accuracy

    return answer_accuracy(prediction, list(getattr(sample, "answers", None) or [sample.answer])) == 1.0


def deletion_curves(
    vlm: Any,
    data: Sequence[Any],
    signals: Mapping[str, Sequence[np.ndarray | None]],
    fractions: Sequence[float] = FRACTIONS,
    modes: Sequence[str] = MODES,
    batch_size: int = 16,
    max_new_tokens: int = 6,
    seed: int = 0,
    ood_below: float = OOD_BELOW,
    progress: bool = False,
    accuracy: str = "greedy",
) -> pd.DataFrame:
    """Answers of ``vlm`` on ``data`` (records with image, question, answer(s), family or group) as image
    tokens are removed (``deletion``) or added (``insertion``) in each signal's order.

    ``signals[name][i]``: the scores of sample i's image tokens (None: the sample is skipped for that
    signal, e.g. no ground truth). One row per sample, signal, mode and fraction: sample, family, signal,
    mode, fraction, kept (image tokens kept), kept_share, out_of_distribution, prediction, correct, logprob
    (log p of the reference answer by teacher forcing). Identical keep masks (e.g. the endpoints) are
    answered once per batch and shared between signals.
    """
    import torch

    from vtrlab.metrics.fidelity import answer_logprob
    from vtrlab.reduce import answer, decoder_inputs, logits

    from .reduction_sweep import _gold_ids

    fractions = [float(f) for f in fractions]
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"fractions {fractions}; accepted: shares of image tokens in [0, 1]")
    if accuracy not in ACCURACY:
        raise ValueError(f"accuracy={accuracy!r}; accepted: {ACCURACY}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes {bad}; accepted: {MODES}")
    if not signals:
        raise ValueError("no signals given; pass {name: per-sample score arrays}")
    for name, per in signals.items():
        if len(per) != len(data):
            raise ValueError(f"signal {name!r} has {len(per)} entries for {len(data)} samples; need one per sample")
    rows = []
    for start in range(0, len(data), batch_size):
        chunk = list(data[start : start + batch_size])
        batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        n = [lay.n_image_tokens for lay in batch.layouts]
        dec = decoder_inputs(vlm, batch)
        gold = _gold_ids(vlm, [s.answer for s in chunk])
        tok = getattr(vlm.processor, "tokenizer", vlm.processor)
        targets = torch.zeros(len(chunk), max(len(g) for g in gold), dtype=torch.long)
        for i, g in enumerate(gold):
            targets[i, : len(g)] = torch.tensor(g)
        plans: list[tuple[str, str, float, list[np.ndarray | None]]] = []
        for name, per in signals.items():
            scores = list(per[start : start + len(chunk)])
            for i, sc in enumerate(scores):
                if sc is not None and np.asarray(sc).shape != (n[i],):
                    raise ValueError(
                        f"signal {name!r}, sample {start + i}: {np.asarray(sc).shape} scores for {n[i]} image tokens"
                    )
            for mode in modes:
                for f in fractions:
                    plans.append(
                        (
                            name,
                            mode,
                            f,
                            [
                                None if sc is None else keep_mask(sc, f, mode, seed=[seed, start + i])
                                for i, sc in enumerate(scores)
                            ],
                        )
                    )
        cache: dict[bytes, tuple[list[str], np.ndarray]] = {}
        for name, mode, f, masks in plans:
            full = [np.ones(k, dtype=bool) if m is None else m for m, k in zip(masks, n)]  # skipped: any mask
            key = b"|".join(m.tobytes() for m in full)
            if key not in cache:
                red = logits(vlm, batch, keep=full, append=gold, decoder_inputs=dec)
                tg = targets.to(red.appended.device)
                lp = answer_logprob(red.appended, tg, red.appended_mask)
                if accuracy == "greedy":
                    preds = answer(vlm, batch, keep=full, max_new_tokens=max_new_tokens, decoder_inputs=dec)
                    ok = [_correct(p, s) for p, s in zip(preds, chunk)]
                else:
                    top = red.appended.argmax(-1)
                    hit = ((top == tg) | ~red.appended_mask).all(-1).cpu().numpy()
                    preds = [tok.decode(t[m].tolist()) for t, m in zip(top.cpu(), red.appended_mask.cpu())]
                    ok = [bool(h) for h in hit]
                cache[key] = (preds, ok, lp.cpu().numpy())
            preds, ok, lp = cache[key]
            for i, (s, m) in enumerate(zip(chunk, masks)):
                if m is None:
                    continue
                share = m.sum() / max(n[i], 1)
                rows.append(
                    {
                        "sample": start + i,
                        "family": getattr(s, "family", None),
                        "signal": name,
                        "mode": mode,
                        "fraction": f,
                        "kept": int(m.sum()),
                        "kept_share": float(share),
                        "out_of_distribution": bool(0 < share < ood_below),
                        "prediction": preds[i],
                        "correct": ok[i],
                        "logprob": float(lp[i]),
                    }
                )
    return pd.DataFrame(rows)


def curve_table(
    curves: pd.DataFrame, by: Sequence[str] = ("signal", "mode", "fraction"), n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Mean accuracy and answer log-prob per signal, mode and fraction with bootstrap 95% CIs over samples.
    Columns: <by>, metric (accuracy, logprob), mean, low, high, n, out_of_distribution (any sample's
    condition flagged)."""
    by = list(by)
    d = curves.assign(accuracy=curves["correct"].astype(np.float64))
    t = controls.ci_table(d, by, ["accuracy", "logprob"], n_boot=n_boot, seed=seed)
    ood = d.groupby(by, sort=True)["out_of_distribution"].any().reset_index()
    return t.merge(ood, on=by, how="left")


def curve_areas(curves: pd.DataFrame) -> pd.DataFrame:
    """Per sample, signal and mode: the area under the accuracy and log-prob curves over the fractions
    (trapezoid rule; fractions span [0, 1], so an area is a mean over the curve). Columns: sample, family,
    signal, mode, auc_accuracy, auc_logprob."""
    rows = []
    for (sample, signal, mode), g in curves.groupby(["sample", "signal", "mode"], sort=True):
        g = g.sort_values("fraction")
        x = g["fraction"].to_numpy(dtype=np.float64)
        span = x[-1] - x[0] if x.size > 1 else np.nan
        area = {
            f"auc_{c}": float(np.trapezoid(g[v].to_numpy(dtype=np.float64), x) / span) if x.size > 1 else np.nan
            for c, v in (("accuracy", "correct"), ("logprob", "logprob"))
        }
        rows.append({"sample": sample, "family": g["family"].iloc[0], "signal": signal, "mode": mode, **area})
    return pd.DataFrame(rows, columns=["sample", "family", "signal", "mode", "auc_accuracy", "auc_logprob"])


def area_table(
    curves: pd.DataFrame, by: Sequence[str] = ("signal", "mode"), n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Mean area under each curve (:func:`curve_areas`) with bootstrap 95% CIs: the causal ranking of
    signals (deletion: lower is better; insertion: higher is better). Columns: <by>, metric, mean, low,
    high, n."""
    return controls.ci_table(curve_areas(curves), list(by), ["auc_accuracy", "auc_logprob"], n_boot=n_boot, seed=seed)


def area_ci(curves: pd.DataFrame, n_boot: int = 1000, seed: int = 0, by_family: bool = True) -> pd.DataFrame:
    """:func:`area_table` per family and signal and mode, plus family ``"all"`` (every sample pooled).
    Columns: family, signal, mode, metric, mean, low, high, n."""
    by = ["family", "signal", "mode"]
    areas = curve_areas(curves)
    parts = [
        controls.ci_table(areas.assign(family="all"), by, ["auc_accuracy", "auc_logprob"], n_boot=n_boot, seed=seed)
    ]
    if by_family and areas["family"].notna().any():
        parts.insert(0, controls.ci_table(areas, by, ["auc_accuracy", "auc_logprob"], n_boot=n_boot, seed=seed))
    return pd.concat(parts, ignore_index=True)


def area_summary(ci: pd.DataFrame) -> dict:
    """Metrics to log from :func:`area_ci`: ``causal_<metric>/<mode>/<family>/<signal>`` with ``_low``,
    ``_high`` and ``_n``; JSON-ready."""
    out: dict = {}
    for _, r in ci.iterrows():
        key = f"causal_{r['metric']}/{r['mode']}/{r['family']}/{r['signal']}"
        out |= {key: float(r["mean"]), f"{key}_low": float(r["low"]), f"{key}_high": float(r["high"])}
        out[f"{key}_n"] = int(r["n"])
    return out


def area_prose(metrics: Mapping, metric: str = "auc_accuracy", top: int = 3) -> list[str]:
    """Per family, the causal ranking of signals from :func:`area_summary` values (e.g. read back from
    metrics.json): the ``top`` best signals under deletion (lowest area: removing their top tokens breaks
    the answer fastest) and insertion (highest area), each with its 95% CI, and where ``random`` sits;
    a signal counts as better than random only when the CIs do not overlap."""
    lines = []
    prefix = f"causal_{metric}/"
    keys = [k for k in metrics if k.startswith(prefix) and not k.endswith(("_low", "_high", "_n"))]
    fams = list(dict.fromkeys(k.split("/")[2] for k in keys))
    if fams:
        lines.append(f"Causal ranking of signals (area under the {metric.removeprefix('auc_')} curve, 95% CI):")
    for fam in fams:
        parts = []
        for mode, sign in (("deletion", 1.0), ("insertion", -1.0)):
            vals = {
                k.split("/", 3)[3]: (float(metrics[k]), float(metrics[k + "_low"]), float(metrics[k + "_high"]))
                for k in keys
                if k.split("/")[1] == mode and k.split("/")[2] == fam
            }
            if not vals:
                continue
            order = sorted(vals, key=lambda s: sign * vals[s][0])
            rnd = vals.get("random")
            shown = ", ".join(f"{sig} {_ci3(vals[sig])}{_mark(vals[sig], rnd, sign)}" for sig in order[:top])
            txt = f"{mode} ({'lower' if sign > 0 else 'higher'} is better): {shown}"
            if rnd is not None:
                txt += f"; random {_ci3(rnd)} (rank {order.index('random') + 1}/{len(order)})"
            parts.append(txt)
        ns = [int(metrics[k + "_n"]) for k in keys if k.split("/")[2] == fam and k + "_n" in metrics]
        n = max(ns) if ns else "?"
        lines.append(f"  {fam} (n={n}): " + " | ".join(parts))
    if fams:
        lines.append("  (* = CI clear of random's)")
    return lines


def _ci3(v: tuple[float, float, float]) -> str:
    return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def _mark(v: tuple[float, float, float], rnd: tuple[float, float, float] | None, sign: float) -> str:
    """ " *" when the CI of ``v`` lies clear of random's on the good side (sign 1: lower is better)."""
    if rnd is None or v is rnd:
        return ""
    return " *" if (v[2] < rnd[1] if sign > 0 else v[1] > rnd[2]) else ""
