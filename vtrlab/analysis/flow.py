"""Information-flow tables (pure: frames in, tables out): knockout-window effects and signals vs ground truth.

Inputs are tidy frames built by :mod:`vtrlab.analysis.flow_experiments`:

* sweep frame: one row per (edge, window_start, sample): ``family``, ``relative_change``, ``correct``;
* token frame: one row per (signal, sample, layer, image token): ``family``, ``score``, ``relevant``
  (the token's patch holds a relevant pixel), ``object`` (it holds a pixel of any object).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vtrlab.metrics import agreement


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (NaN dropped; resampling items with replacement)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _summarise(df: pd.DataFrame, by: list[str], values: list[str], n_boot: int, seed: int) -> pd.DataFrame:
    missing = [c for c in by + values if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the frame; have {list(df.columns)}")
    rows = []
    for key, g in df.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n"] = len(g)
        for v in values:
            x = g[v].to_numpy(dtype=float)
            lo, hi = bootstrap_ci(x, n_boot, seed)
            row[v], row[f"{v}_lo"], row[f"{v}_hi"] = float(np.nanmean(x)) if np.isfinite(x).any() else np.nan, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_summary(sweep: pd.DataFrame, n_boot: int = 1000, seed: int = 0, by_family: bool = True) -> pd.DataFrame:
    """Mean relative change of p(answer) and accuracy per edge, window (and family), bootstrap CIs over samples."""
    df = sweep.assign(correct=sweep["correct"].astype(float))
    by = ["edge", "window_start"] + (["family"] if by_family else [])
    return _summarise(df, by, ["relative_change", "correct"], n_boot, seed)


def token_scores_vs_truth(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per (signal, sample, layer): AUROC of ``score`` against ``relevant``; AUROC among object tokens only
    (does the signal pick the *relevant* objects, not just objects?); lift over uniform (mean score on
    relevant tokens / mean score on all tokens; 1 = uniform); and per sample the objectness baseline
    (AUROC of the map "every object token" against relevance). Samples whose ``has_truth`` is False are
    left out; where ``has_objects`` is False the two object controls are NaN."""
    need = ["signal", "sample", "family", "layer", "score", "relevant", "object"]
    missing = [c for c in need if c not in tokens.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the token frame; have {list(tokens.columns)}")
    if "has_truth" in tokens.columns:
        tokens = tokens[tokens["has_truth"].astype(bool)]
    out = []
    for (signal, sample, layer), g in tokens.groupby(["signal", "sample", "layer"], sort=True):
        s = g["score"].to_numpy(dtype=float)
        rel = g["relevant"].to_numpy(dtype=bool)
        obj = g["object"].to_numpy(dtype=bool)
        known = bool(g["has_objects"].iloc[0]) if "has_objects" in g.columns else True
        inside = obj
        total = np.nanmean(s)
        out.append(
            {
                "signal": signal,
                "sample": sample,
                "family": g["family"].iloc[0],
                "layer": layer,
                "auroc": float(agreement.auroc(s, rel)),
                "auroc_objects": float(agreement.auroc(s[inside], rel[inside])) if known and inside.any() else np.nan,
                "lift": float(np.nanmean(s[rel]) / total) if rel.any() and total > 0 else np.nan,
                "objectness_auroc": float(agreement.auroc(obj.astype(float), rel)) if known else np.nan,
            }
        )
    return pd.DataFrame(out)


def truth_summary(per_sample: pd.DataFrame, n_boot: int = 1000, seed: int = 0, by_family: bool = True) -> pd.DataFrame:
    """Per signal, layer (and family): mean AUROC, AUROC among objects, lift and the objectness baseline,
    each with a bootstrap CI over samples."""
    by = ["signal", "layer"] + (["family"] if by_family else [])
    return _summarise(per_sample, by, ["auroc", "auroc_objects", "lift", "objectness_auroc"], n_boot, seed)


def headline(sweep_sum: pd.DataFrame, truth_sum: pd.DataFrame | None) -> dict:
    """Headline numbers (pooled over families): per edge, the window whose cut lowers p(answer) most and
    that change; per signal, the layer with the highest AUROC and that AUROC (none when ``truth_sum`` is None:
    data without ground truth)."""
    out: dict = {}
    for edge, g in sweep_sum.groupby("edge"):
        worst = g.loc[g["relative_change"].idxmin()]
        out[f"knockout/{edge}/worst_window_start"] = int(worst["window_start"])
        out[f"knockout/{edge}/relative_change"] = float(worst["relative_change"])
        out[f"knockout/{edge}/accuracy"] = float(worst["correct"])
    for signal, g in [] if truth_sum is None else truth_sum.groupby("signal"):
        best = g.loc[g["auroc"].idxmax()]
        out[f"truth/{signal}/best_layer"] = int(best["layer"])
        out[f"truth/{signal}/auroc"] = float(best["auroc"])
        out[f"truth/{signal}/auroc_objects"] = float(best["auroc_objects"])
        out[f"truth/{signal}/objectness_auroc"] = float(best["objectness_auroc"])
    return out


def summary_lines(metrics: dict) -> list[str]:
    """Prose from :func:`headline`'s numbers (every number generated, none typed)."""
    lines = []
    edges = sorted({k.split("/")[1] for k in metrics if k.startswith("knockout/")})
    for e in edges:
        lines.append(
            f"Cutting {e} hurts most in the window starting at layer "
            f"{metrics[f'knockout/{e}/worst_window_start']}: p(answer) changes by "
            f"{metrics[f'knockout/{e}/relative_change']:+.1%} "
            f"(accuracy {metrics[f'knockout/{e}/accuracy']:.2f})."
        )
    signals = sorted({k.split("/")[1] for k in metrics if k.startswith("truth/")})
    for s in signals:
        lines.append(
            f"{s}: best AUROC against the relevant patches {metrics[f'truth/{s}/auroc']:.3f} at layer "
            f"{metrics[f'truth/{s}/best_layer']} (among object patches "
            f"{metrics[f'truth/{s}/auroc_objects']:.3f}; objectness baseline "
            f"{metrics[f'truth/{s}/objectness_auroc']:.3f})."
        )
    return lines
