"""Pure tables over the reduction sweep (:mod:`vtrlab.analysis.reduction_sweep`): no model, no I/O.

* :func:`accuracy_table` — accuracy, answer log-prob and KL to the full model per method and
  budget (and family), with percentile-bootstrap CIs over samples; random keep per seed and as a band.
* :func:`recall_table` — share of ground-truth relevant tokens each method's kept set holds.
* :func:`agreement_matrices` — mean Jaccard of kept sets and mean Spearman of scores between methods
  at one budget, in a hierarchical-clustering order.
* :func:`oracle_agreement` — per method, agreement with the oracle's kept set vs accuracy, and the
  rank correlation between the two across methods.
* :func:`position_maps` — mean kept share per grid cell (row, col) per method.
* :func:`summary_lines` — the notebook's prose, generated from these tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..metrics.agreement import spearman

RANDOM = "random"


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (resampling items with replacement)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def accuracy_table(answers: pd.DataFrame, by: Sequence[str] = (), n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (method, seed, budget, *by): n, accuracy with CI, mean log-prob and KL with CIs.
    Random keep has one row per seed plus ``seed == -1`` rows holding the mean over seeds with the
    min/max over seeds as ``band_lo``/``band_hi``."""
    keys = ["method", "seed", "budget", *by]
    rows = []
    for key, g in answers.groupby(keys, sort=True):
        rec = dict(zip(keys, key))
        rec["n"] = len(g)
        for col in ("correct", "logprob", "kl"):
            vals = g[col].astype(float).to_numpy()
            name = "accuracy" if col == "correct" else col
            rec[name] = float(vals.mean())
            rec[f"{name}_lo"], rec[f"{name}_hi"] = bootstrap_ci(vals, n_boot, seed)
        rows.append(rec)
    table = pd.DataFrame(rows)
    rnd = table[table["method"] == RANDOM]
    if len(rnd):
        band = []
        for key, g in rnd.groupby(["budget", *by], sort=True):
            key = key if isinstance(key, tuple) else (key,)
            rec = dict(zip(["budget", *by], key), method=RANDOM, seed=-1, n=int(g["n"].sum()))
            for name in ("accuracy", "logprob", "kl"):
                rec[name] = float(g[name].mean())
                rec[f"{name}_lo"], rec[f"{name}_hi"] = float(g[name].min()), float(g[name].max())
            rec["band_lo"], rec["band_hi"] = float(g["accuracy"].min()), float(g["accuracy"].max())
            band.append(rec)
        table = pd.concat([table[table["method"] != RANDOM], rnd, pd.DataFrame(band)], ignore_index=True)
    return table.sort_values(keys).reset_index(drop=True)


def recall_table(tokens: pd.DataFrame) -> pd.DataFrame:
    """Per (method, seed, budget): mean over samples (with any relevant token) of the share of relevant
    tokens kept, and the expected share under a uniform random keep of the same size."""
    rows = []
    for key, g in tokens.groupby(["method", "seed", "budget", "sample"], sort=True):
        n_rel = int(g["relevant"].sum())
        if n_rel == 0:
            continue
        rows.append(
            dict(
                zip(["method", "seed", "budget", "sample"], key),
                recall=float((g["kept"] & g["relevant"]).sum() / n_rel),
                chance=float(g["kept"].mean()),
            )
        )
    per = pd.DataFrame(rows, columns=["method", "seed", "budget", "sample", "recall", "chance"])  # none: no truth
    out = per.groupby(["method", "seed", "budget"], as_index=False).agg(
        recall=("recall", "mean"), chance=("chance", "mean"), n=("recall", "size")
    )
    rnd = out[out["method"] == RANDOM]
    if len(rnd):  # random keep: also the mean over seeds (seed -1), as for the other methods
        mean = rnd.groupby("budget", as_index=False).agg(
            recall=("recall", "mean"), chance=("chance", "mean"), n=("n", "sum")
        )
        out = pd.concat([out, mean.assign(method=RANDOM, seed=-1)], ignore_index=True)
    return out


def _label(method: str, seed: int) -> str:
    return method if seed < 0 else f"{method}:{seed}"


def _cluster_order(mat: np.ndarray) -> np.ndarray:
    if mat.shape[0] < 3:
        return np.arange(mat.shape[0])
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    dist = 1.0 - np.nan_to_num(mat, nan=0.0)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(np.clip(dist, 0, None), checks=False), method="average"))


def agreement_matrices(tokens: pd.DataFrame, budget: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(Jaccard, Spearman) method x method matrices at ``budget``: the mean over samples of the
    Jaccard index of kept sets, and of Spearman's rank correlation of the first-stage scores (NaN
    where a method has no score, e.g. pooling). Rows/columns in the Jaccard clustering order."""
    t = tokens[np.isclose(tokens["budget"], budget)]
    labels = sorted({_label(m, s) for m, s in zip(t["method"], t["seed"])})
    samples = sorted(t["sample"].unique())
    kept = {lab: {} for lab in labels}
    score = {lab: {} for lab in labels}
    for (m, s, smp), g in t.groupby(["method", "seed", "sample"], sort=True):
        g = g.sort_values("token")
        kept[_label(m, s)][smp] = g["kept"].to_numpy(bool)
        score[_label(m, s)][smp] = g["score"].to_numpy(float)
    n = len(labels)
    jac = np.full((n, n), np.nan)
    spr = np.full((n, n), np.nan)
    for a in range(n):
        for b in range(n):
            js, ss = [], []
            for smp in samples:
                ka, kb = kept[labels[a]].get(smp), kept[labels[b]].get(smp)
                if ka is None or kb is None:
                    continue
                union = (ka | kb).sum()
                js.append((ka & kb).sum() / union if union else 1.0)
                sa, sb = score[labels[a]][smp], score[labels[b]][smp]
                ok = np.isfinite(sa) & np.isfinite(sb)
                if ok.sum() > 2 and np.ptp(sa[ok]) > 0 and np.ptp(sb[ok]) > 0:
                    ss.append(float(spearman(sa[ok], sb[ok])))
            jac[a, b] = np.mean(js) if js else np.nan
            spr[a, b] = np.mean(ss) if ss else np.nan
    order = _cluster_order(jac)
    lab = [labels[i] for i in order]
    return (
        pd.DataFrame(jac[np.ix_(order, order)], index=lab, columns=lab),
        pd.DataFrame(spr[np.ix_(order, order)], index=lab, columns=lab),
    )


def oracle_agreement(tokens: pd.DataFrame, answers: pd.DataFrame, oracle: str = "oracle") -> pd.DataFrame:
    """Per (method, seed, budget): mean Jaccard of its kept set with the oracle's, and its accuracy."""
    o = tokens[tokens["method"] == oracle].set_index(["sample", "budget", "token"])["kept"]
    rows = []
    for (m, s, b), g in tokens[tokens["method"] != oracle].groupby(["method", "seed", "budget"], sort=True):
        js = []
        for smp, gs in g.groupby("sample"):
            ko = o.loc[smp, b].sort_index().to_numpy(bool)
            km = gs.sort_values("token")["kept"].to_numpy(bool)
            union = (ko | km).sum()
            js.append((ko & km).sum() / union if union else 1.0)
        acc = answers[(answers["method"] == m) & (answers["seed"] == s) & np.isclose(answers["budget"], b)]
        rows.append(
            dict(method=m, seed=s, budget=b, jaccard_oracle=float(np.mean(js)), accuracy=float(acc["correct"].mean()))
        )
    return pd.DataFrame(rows)


def oracle_prediction(agree: pd.DataFrame | None) -> pd.DataFrame:
    """Per budget: Spearman correlation, across methods (random seeds pooled), between agreement with
    the oracle and accuracy (empty when there is no oracle run: ``agree`` None)."""
    rows = []
    if agree is None or agree.empty:
        return pd.DataFrame(columns=["budget", "n_methods", "spearman"])
    for b, g in agree.groupby("budget"):
        ok = len(g) > 2 and g["jaccard_oracle"].nunique() > 1 and g["accuracy"].nunique() > 1
        rho = float(spearman(g["jaccard_oracle"].to_numpy(), g["accuracy"].to_numpy())) if ok else float("nan")
        rows.append(dict(budget=b, n_methods=len(g), spearman=rho))
    return pd.DataFrame(rows)


def position_maps(tokens: pd.DataFrame, budget: float, tile: int = 0) -> dict[str, np.ndarray]:
    """Per method (random seeds pooled): mean kept share per (row, col) cell of tile ``tile``'s grid."""
    t = tokens[np.isclose(tokens["budget"], budget) & (tokens["tile"] == tile)]
    rows, cols = int(t["row"].max()) + 1, int(t["col"].max()) + 1
    out = {}
    for m, g in t.groupby("method", sort=True):
        grid = np.full((rows, cols), np.nan)
        mean = g.groupby(["row", "col"])["kept"].mean()
        grid[mean.index.get_level_values(0), mean.index.get_level_values(1)] = mean.to_numpy()
        out[m] = grid
    return out


def summary_lines(acc: pd.DataFrame, recall: pd.DataFrame, pred: pd.DataFrame) -> tuple[list[str], dict]:
    """Prose (one line per finding) and metrics, generated from the tables."""
    lines, metrics = [], {}
    full = acc[acc["method"] == "full"]
    full_acc = float(full["accuracy"].iloc[0]) if len(full) else float("nan")
    metrics["accuracy_full"] = full_acc
    lines.append(f"Full model: accuracy {full_acc:.2f} (n={int(full['n'].iloc[0]) if len(full) else 0}).")
    red = acc[(acc["method"] != "full") & (acc["seed"] == -1)]
    for b, g in red.groupby("budget"):
        g = g.sort_values("accuracy", ascending=False)
        rnd = g[g["method"] == RANDOM]
        best = g[g["method"] != "oracle"].iloc[0]
        parts = ", ".join(f"{r.method} {r.accuracy:.2f}" for r in g.itertuples())
        lines.append(f"Keep {b:.0%}: {parts}.")
        for r in g.itertuples():
            metrics[f"accuracy_{r.method}_{b:g}"] = float(r.accuracy)
        if len(rnd):
            r = rnd.iloc[0]
            beat = g[(g["method"] != RANDOM) & (g["accuracy_lo"] > r["band_hi"])]["method"].tolist()
            lines.append(
                f"  random over seeds {r['band_lo']:.2f}-{r['band_hi']:.2f}; methods whose CI lies above "
                f"the random band: {', '.join(beat) if beat else 'none'}; best non-oracle: {best['method']}."
            )
    rec = recall[recall["seed"] == -1]
    for b, g in rec.groupby("budget"):
        parts = ", ".join(f"{r.method} {r.recall:.2f}" for r in g.sort_values("recall", ascending=False).itertuples())
        lines.append(f"Recall of relevant tokens at {b:.0%}: {parts} (chance = keep share).")
        for r in g.itertuples():
            metrics[f"recall_{r.method}_{b:g}"] = float(r.recall)
    for r in pred.itertuples():
        metrics[f"oracle_agreement_accuracy_spearman_{r.budget:g}"] = r.spearman
        lines.append(
            f"At {r.budget:.0%}, agreement with the oracle vs accuracy across {r.n_methods} runs: "
            f"Spearman {r.spearman:.2f}."
        )
    return lines, metrics
