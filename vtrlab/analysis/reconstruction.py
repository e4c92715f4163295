"""Reconstruction error as a per-token, per-layer importance signal.

``layer_reconstruction_error`` answers, for every vision layer and every LM layer (hidden states
of the image tokens): if a random subset of the image tokens is kept, how well can the dropped
ones be rebuilt from the kept ones at this layer?

Reconstructor (why this one): a closed-form **ridge regression per layer**, shared by all tokens
and samples, from a dropped token's context to its features. The context is
``[mean of kept tokens in its 3x3 grid neighbourhood (the sample mean if it has none), 1 if it
has none, mean of all kept tokens, 1]``.
A linear map with fixed inputs has the same (small) capacity at every layer and no training
randomness, so differences between layers reflect how redundant the features *are* at that
layer rather than optimisation luck; it is closed form (seconds on CPU for every layer), needs no
tuning beyond one ridge strength, and works for any width. A trained per-layer transformer
(like the selector's reconstructor) would rebuild better in absolute terms but would cost a
training run per layer and confound layers with training. Errors are measured out of sample
(two folds over samples: fit on one half, score the other) in per-channel standardised units,
so ``1.0`` means "no better than the layer's channel means" and layers of different widths
compare directly.

Everything is returned as an ``xarray.DataArray`` with dims (sample, layer, token) and
coordinates position / kind / row / col / tile / image on (sample, token), the labeled shape
other signals use, padded with NaN where samples have fewer image tokens.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from ..models.base import KIND_IMAGE


def token_array(
    values: Mapping[str, Sequence[np.ndarray]],
    layouts: Sequence[Any],
    name: str,
    attrs: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Stack ``values[layer][sample]`` (one value per LM image token, layout order) into a
    (sample, layer, token) DataArray with per-token coordinates from the layouts."""
    layers = list(values)
    n = max(lay.n_image_tokens for lay in layouts)
    data = np.full((len(layouts), len(layers), n), np.nan)
    coords = {k: np.full((len(layouts), n), -1, dtype=np.int64) for k in ("position", "row", "col", "tile", "image")}
    kind = np.full((len(layouts), n), "", dtype=object)
    for s, lay in enumerate(layouts):
        img = lay.kind == KIND_IMAGE
        t = int(img.sum())
        for j, layer in enumerate(layers):
            v = np.asarray(values[layer][s], dtype=float)
            if v.shape != (t,):
                raise ValueError(f"values[{layer!r}][{s}] has shape {v.shape}; sample {s} has {t} image tokens")
            data[s, j, :t] = v
        coords["position"][s, :t] = lay.positions[img]
        for k in ("row", "col", "tile", "image"):
            coords[k][s, :t] = getattr(lay, k)[img]
        kind[s, :t] = KIND_IMAGE
    return xr.DataArray(
        data,
        dims=("sample", "layer", "token"),
        coords={
            "sample": np.arange(len(layouts)),
            "layer": layers,
            "token": np.arange(n),
            **{k: (("sample", "token"), v) for k, v in coords.items()},
            "kind": (("sample", "token"), kind.astype(str)),
        },
        name=name,
        attrs=dict(attrs or {}),
    )


def _neighbours(layout: Any) -> np.ndarray:
    """(T, T) bool: token j lies in token i's 3x3 grid neighbourhood (same image and tile, j != i)."""
    img = layout.kind == KIND_IMAGE
    r, c, t, im = (np.asarray(getattr(layout, k)[img]) for k in ("row", "col", "tile", "image"))
    near = (np.abs(r[:, None] - r[None]) <= 1) & (np.abs(c[:, None] - c[None]) <= 1)
    near &= (t[:, None] == t[None]) & (im[:, None] == im[None])
    np.fill_diagonal(near, False)
    return near


def _contexts(feats: np.ndarray, keep: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Context rows for the dropped tokens of one sample (see module docstring)."""
    kept = np.nan_to_num(feats[keep])
    global_mean = kept.mean(0) if len(kept) else np.zeros(feats.shape[1])
    w = near[~keep][:, keep].astype(float)
    cnt = w.sum(1, keepdims=True)
    # no kept neighbour: fall back to the sample mean, so the local term is always an estimate
    local = np.divide(w @ kept, cnt, out=np.tile(global_mean, (w.shape[0], 1)), where=cnt > 0)
    none = (cnt == 0).astype(float)
    ones = np.ones_like(none)
    return np.hstack([local, none, np.broadcast_to(global_mean, local.shape), ones])


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """W minimising ||xW - y||^2 + lam ||W||^2 with lam = alpha * mean diagonal of x^T x (float64)."""
    xtx = x.T @ x
    lam = alpha * np.trace(xtx) / max(xtx.shape[0], 1)
    return np.linalg.solve(xtx + lam * np.eye(xtx.shape[0]), x.T @ y)


def ridge_token_error(
    feats: Sequence[np.ndarray],
    layouts: Sequence[Any],
    keep_ratio: float = 0.5,
    n_draws: int = 4,
    alpha: float = 0.1,
    seed: int = 0,
) -> list[np.ndarray]:
    """One layer: per sample, per token, the out-of-sample ridge reconstruction error (standardised
    MSE over channels) averaged over the random draws in which the token was dropped."""
    if not 0.0 < keep_ratio < 1.0:
        raise ValueError(f"keep_ratio={keep_ratio}; accepted: (0, 1) so that some tokens are kept and some dropped")
    if len(feats) < 2:
        raise ValueError(f"need at least 2 samples for out-of-sample (two-fold) ridge; got {len(feats)}")
    stacked = np.concatenate([f for f in feats])
    mu = np.nanmean(stacked, 0)
    sd = np.nanstd(stacked, 0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    z = [np.nan_to_num((f - mu) / sd) for f in feats]
    rng = np.random.default_rng(seed)
    near = [_neighbours(lay) for lay in layouts]
    sums = [np.zeros(len(f)) for f in feats]
    counts = [np.zeros(len(f)) for f in feats]
    fold = np.arange(len(feats)) % 2
    for _ in range(n_draws):
        keeps = []
        for f in z:
            k = min(max(int(round(keep_ratio * len(f))), 1), len(f) - 1)
            m = np.zeros(len(f), dtype=bool)
            m[rng.choice(len(f), size=k, replace=False)] = True
            keeps.append(m)
        ctx = [_contexts(f, m, nb) for f, m, nb in zip(z, keeps, near)]
        tgt = [f[~m] for f, m in zip(z, keeps)]
        for held in (0, 1):
            fit = [i for i in range(len(z)) if fold[i] != held]
            w = ridge_fit(np.concatenate([ctx[i] for i in fit]), np.concatenate([tgt[i] for i in fit]), alpha)
            for i in np.flatnonzero(fold == held):
                err = ((ctx[i] @ w - tgt[i]) ** 2).mean(1)
                sums[i][~keeps[i]] += err
                counts[i][~keeps[i]] += 1
    with np.errstate(invalid="ignore"):
        return [s / c for s, c in zip(sums, counts)]


def layer_reconstruction_error(
    vlm: Any,
    batch: Any,
    vision: Sequence[int] | str | None = "all",
    lm: Sequence[int] | str | None = "all",
    keep_ratio: float = 0.5,
    n_draws: int = 4,
    alpha: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> xr.DataArray:
    """Per layer and token, how badly the token is rebuilt from a random ``keep_ratio`` subset
    (ridge, out of sample; see module docstring). Dims (sample, layer, token)."""
    from tqdm.auto import tqdm

    from ..recon.features import token_features

    feats = token_features(vlm, batch, vision=vision, lm=lm)
    values = {
        layer: ridge_token_error(f, batch.layouts, keep_ratio=keep_ratio, n_draws=n_draws, alpha=alpha, seed=seed)
        for layer, f in tqdm(feats.items(), desc="ridge per layer", disable=not progress)
    }
    return token_array(values, batch.layouts, name="layer_recon_error",
                       attrs={"signal": "ridge reconstruction error from kept neighbours", "keep_ratio": keep_ratio,
                              "n_draws": n_draws, "alpha": alpha, "seed": seed})


KEEP_METHODS = ("selector", "random", "full", "no_image")


def random_keep(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random bool mask keeping exactly round(ratio * n) of n tokens."""
    keep = np.zeros(n, dtype=bool)
    keep[rng.choice(n, size=int(round(ratio * n)), replace=False)] = True
    return keep


def relevance_per_token(layout: Any, relevance: np.ndarray) -> np.ndarray:
    """Ground-truth relevance (a bool/float grid over the LM patch grid) read at each image token's (row, col)."""
    img = layout.kind == KIND_IMAGE
    rel = np.asarray(relevance)
    rows, cols = layout.row[img], layout.col[img]
    if rows.max() >= rel.shape[0] or cols.max() >= rel.shape[1]:
        raise ValueError(f"relevance grid {rel.shape} is smaller than the layout's grid ({rows.max() + 1}, {cols.max() + 1})")
    return rel[rows, cols]


def keep_ratio_sweep(
    vlm: Any,
    samples: Sequence[Any],
    selector: Any,
    ratios: Sequence[float],
    methods: Sequence[str] = KEEP_METHODS,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 6,
    progress: bool = True,
):
    """Greedy answers of ``vlm`` on ``samples`` (objects with image, question, answer, family)
    when only a fraction of image tokens reaches the LM.

    Returns a tidy DataFrame: sample, family, method, ratio, prediction, answer, correct, kept.
    ``selector`` keeps the top-k by the selector's logits, ``random`` a uniform random subset
    (seeded per sample and ratio), ``full`` all tokens (ratio 1) and ``no_image`` none (ratio 0).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from ..metrics.fidelity import exact_match
    from ..reduce import answer, decoder_inputs

    bad = [m for m in methods if m not in KEEP_METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; accepted: {KEEP_METHODS}")
    ratios = [float(r) for r in ratios]
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"ratios {ratios}; accepted: keep ratios in [0, 1]")
    if "selector" in methods and selector is None:
        raise ValueError("method 'selector' needs a selector; pass one or drop 'selector' from methods")
    rows = []
    for a in tqdm(range(0, len(samples), batch_size), desc="keep-ratio sweep", disable=not progress):
        chunk = samples[a : a + batch_size]
        batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        dec = decoder_inputs(vlm, batch)
        n = [lay.n_image_tokens for lay in batch.layouts]
        plans: list[tuple[str, float, list[np.ndarray] | None]] = []
        if "full" in methods:
            plans.append(("full", 1.0, None))
        if "no_image" in methods:
            plans.append(("no_image", 0.0, [np.zeros(k, dtype=bool) for k in n]))
        scores = selector.token_scores(vlm, batch) if "selector" in methods else None
        for r in ratios:
            if "selector" in methods:
                plans.append(("selector", r, [selector.topk_mask(s, r) for s in scores]))
            if "random" in methods:
                rngs = [np.random.default_rng([seed, a + i, int(round(r * 1000))]) for i in range(len(chunk))]
                plans.append(("random", r, [random_keep(k, r, g) for k, g in zip(n, rngs)]))
        for method, r, keep in plans:
            preds = answer(vlm, batch, keep=keep, max_new_tokens=max_new_tokens, decoder_inputs=dec)
            for i, (s, p) in enumerate(zip(chunk, preds)):
                rows.append({"sample": a + i, "family": s.family, "method": method, "ratio": r, "prediction": p,
                             "answer": s.answer, "correct": exact_match(p, s.answer),
                             "kept": int(n[i] if keep is None else keep[i].sum())})
    return pd.DataFrame(rows)


# --- notebook 03: selector loading, accuracy tables, relevance agreement, diagnostics, claim -------------

READING_FAMILIES = ("reading",)  # OCR-like family; every other family is a scene question


def family_group(family: str) -> str:
    """``"reading"`` for the OCR-like families (``READING_FAMILIES``), ``"scene"`` for every other one."""
    return "reading" if family in READING_FAMILIES else "scene"


def load_or_train_selector(
    vlm: Any,
    *,
    train: bool = False,
    selector_path: str = "",
    n_train: int = 4000,
    steps: int = 3000,
    p: float = 0.5,
    d_model: int = 128,
    layers: int = 3,
    seed: int = 0,
    device: str = "cpu",
):
    """(selector, training history): trained here (``n_train`` images at data seed 3, with the sizes
    given) when ``train``, else loaded from ``selector_path`` (empty: the one shipped beside the
    organism; relative paths start at the project root). The selector is on ``vlm.device``, in eval mode."""
    from pathlib import Path

    from ..models.loader import organism_path
    from ..recon import Selector
    from ..recon.train import train_for
    from ..runner.paths import project_root

    if train:
        sel, history = train_for(vlm, n_train=n_train, n_val=max(n_train // 16, 4), steps=steps, p=p, d_model=d_model,
                                 n_heads=4 if d_model % 4 == 0 and d_model >= 16 else 1, selector_layers=layers,
                                 reconstructor_layers=layers, seed=seed, device=device,
                                 batch_size=min(32, n_train))
    else:
        path = Path(selector_path) if selector_path else organism_path() / "selector"
        path = path if path.is_absolute() else project_root() / path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no selector at {str(path)!r}; set train=True or point selector_path at one")
        sel = Selector.load(path, device=vlm.device)
        history = Selector.history(path)
    return sel.to(vlm.device).eval(), history


def accuracy_tables(sweep, group_of=family_group):
    """Accuracy tables of a ``keep_ratio_sweep``: (by group, by family).

    By group: group, method, ratio, accuracy (mean of ``correct``), n (answers), with the group of
    each row's family given by ``group_of``. By family: family, method, ratio, accuracy."""
    groups = sweep["family"].map(group_of)
    acc = (sweep.assign(group=groups).groupby(["group", "method", "ratio"], as_index=False)["correct"]
           .agg(["mean", "count"]).rename(columns={"mean": "accuracy", "count": "n"}))
    acc_family = (sweep.groupby(["family", "method", "ratio"], as_index=False)["correct"].mean()
                  .rename(columns={"correct": "accuracy"}))
    return acc, acc_family


def accuracy_pivot(acc):
    """Accuracy by (group, method) x ratio, rounded to 3 decimals."""
    return acc.pivot_table(index=["group", "method"], columns="ratio", values="accuracy").round(3)


def relevance_agreement(vlm: Any, selector: Any, samples: Sequence[Any], budgets: Sequence[float], seed: int = 0,
                        batch_size: int = 32, group_of=family_group):
    """Agreement of the selector's kept set with ground-truth relevance, per sample.

    Tidy DataFrame: sample, family, group, relevant_fraction, method, ratio, metric, value, with
    metric ``auroc`` (selector logits vs relevant tokens; ratio NaN) and, at each budget, ``recall``
    (share of relevant tokens kept) and ``iou`` (kept vs relevant) for ``selector`` (top-k) and
    ``random`` (seeded per sample). Samples whose tokens are all or none relevant are skipped."""
    import pandas as pd

    from ..metrics.agreement import auroc

    rows = []
    for a in range(0, len(samples), batch_size):
        chunk = samples[a : a + batch_size]
        b = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        scores = selector.token_scores(vlm, b)
        for i, (s, lay, sc) in enumerate(zip(chunk, b.layouts, scores)):
            rel = relevance_per_token(lay, s.relevance).astype(bool)
            if rel.all() or not rel.any():
                continue
            base = {"sample": a + i, "family": s.family, "group": group_of(s.family), "relevant_fraction": rel.mean()}
            rows.append({**base, "method": "selector", "ratio": np.nan, "metric": "auroc", "value": float(auroc(sc, rel))})
            rng = np.random.default_rng([seed, a + i])
            for r in budgets:
                for method, keep in (("selector", selector.topk_mask(sc, r)), ("random", random_keep(len(sc), r, rng))):
                    rows.append({**base, "method": method, "ratio": r, "metric": "recall", "value": (keep & rel).sum() / rel.sum()})
                    rows.append({**base, "method": method, "ratio": r, "metric": "iou", "value": (keep & rel).sum() / (keep | rel).sum()})
    return pd.DataFrame(rows)


def agreement_summary(agree):
    """Mean value per (group, metric, method) x ratio (NaN ratio: AUROC), rounded to 3 decimals."""
    return agree.groupby(["group", "metric", "method", "ratio"], dropna=False)["value"].mean().unstack("ratio").round(3)


DIAGNOSTIC_PLANS = ("selector", "random", "relevant only", "relevant + random others", "random others only",
                    "selector minus relevant")


def context_diagnostic(vlm: Any, selector: Any, samples: Sequence[Any], ratio: float = 0.1, seed: int = 0,
                       batch_size: int = 32, families: Sequence[str] | None = None, max_new_tokens: int = 6):
    """What the LM needs besides the relevant tokens, at keep ratio ``ratio``: greedy answers per
    sample for each of ``DIAGNOSTIC_PLANS`` (selector top-k, random, relevant tokens only, relevant
    topped up with random other tokens to the budget, random other tokens only, selector minus relevant).

    Samples go family by family (``families``: default, in order of first appearance), in batches.
    Returns a DataFrame: family, plan, correct, kept."""
    import pandas as pd

    from ..metrics.fidelity import exact_match
    from ..reduce import answer, decoder_inputs

    if families is None:
        families = list(dict.fromkeys(s.family for s in samples))
    rows = []
    for fam in families:
        fam_samples = [s for s in samples if s.family == fam]
        for a in range(0, len(fam_samples), batch_size):
            chunk = fam_samples[a : a + batch_size]
            b = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
            dec = decoder_inputs(vlm, b)
            scores = selector.token_scores(vlm, b)
            plans = {k: [] for k in DIAGNOSTIC_PLANS}
            for i, (s, lay, sc) in enumerate(zip(chunk, b.layouts, scores)):
                rng = np.random.default_rng([seed, 7, a + i])
                rel = relevance_per_token(lay, s.relevance).astype(bool)
                n, k = len(sc), int(round(ratio * len(sc)))
                others = np.flatnonzero(~rel)
                fill = np.zeros(n, dtype=bool)
                fill[rng.choice(others, min(max(k - rel.sum(), 0), len(others)), replace=False)] = True
                alone = np.zeros(n, dtype=bool)
                alone[rng.choice(others, min(k, len(others)), replace=False)] = True
                top = selector.topk_mask(sc, ratio)
                for name, keep in (("selector", top), ("random", random_keep(n, ratio, rng)), ("relevant only", rel),
                                   ("relevant + random others", rel | fill), ("random others only", alone),
                                   ("selector minus relevant", top & ~rel)):
                    plans[name].append(keep)
            for name, keep in plans.items():
                preds = answer(vlm, b, keep=keep, max_new_tokens=max_new_tokens, decoder_inputs=dec)
                for s, pred, m in zip(chunk, preds, keep):
                    rows.append({"family": fam, "plan": name, "correct": exact_match(pred, s.answer),
                                 "kept": int(m.sum())})
    return pd.DataFrame(rows)


def diagnostic_table(diag):
    """Accuracy per family x plan (2 decimals), plus a ``mean kept`` row (tokens kept per plan, 1 decimal)."""
    table = diag.pivot_table(index="family", columns="plan", values="correct").round(2)
    table.loc["mean kept"] = diag.groupby("plan")["kept"].mean().round(1)
    return table


def layer_error_table(lerr: xr.DataArray):
    """Per-sample mean of a ``layer_reconstruction_error`` over image tokens, per layer.

    Columns: sample, stack (``vision`` or ``lm``), index (layer within the stack), error."""
    per_layer = lerr.to_dataframe().reset_index().dropna(subset=["layer_recon_error"])
    per_layer["stack"] = per_layer["layer"].str.split(".").str[0]
    per_layer["index"] = per_layer["layer"].str.split(".").str[1].astype(int)
    per_sample = per_layer.groupby(["sample", "stack", "index"], as_index=False)["layer_recon_error"].mean()
    return per_sample.rename(columns={"layer_recon_error": "error"})


def claim_summary(acc, acc_family, budgets: Sequence[float], n_eval: int, seed: int,
                  families: Sequence[str] | None = None, reading: Sequence[str] = READING_FAMILIES) -> dict:
    """Whether the paper's finding is reproduced, from ``accuracy_tables``.

    Criteria: (a) on reading, the selector beats random by at least 0.10 at some budget <= 50% and
    is not worse by more than 0.05 at any; (b) on scene families, random at 30% is within 0.10 of full.
    Returns ``{"metrics": {...}, "lines": [...]}``: the metrics to log and the lines to print
    (per-family scene gaps over ``families``, default: those in ``acc_family``, that are not ``reading``)."""

    def acc_at(group, method, ratio):
        d = acc[(acc["group"] == group) & (acc["method"] == method) & np.isclose(acc["ratio"], ratio)]
        return float(d["accuracy"].iloc[0]) if len(d) else float("nan")

    if families is None:
        families = list(dict.fromkeys(acc_family["family"]))
    low = [r for r in budgets if 0 < r <= 0.5]
    gaps = {r: acc_at("reading", "selector", r) - acc_at("reading", "random", r) for r in low}
    full_scene, full_reading = acc_at("scene", "full", 1.0), acc_at("reading", "full", 1.0)
    random30 = acc_at("scene", "random", 0.3) if 0.3 in budgets else float("nan")
    claim_a = bool(low) and max(gaps.values()) >= 0.10 and min(gaps.values()) > -0.05
    claim_b = abs(full_scene - random30) <= 0.10
    metrics = {
        "reading_full": full_reading, "scene_full": full_scene,
        "reading_no_image": acc_at("reading", "no_image", 0.0), "scene_no_image": acc_at("scene", "no_image", 0.0),
        **{f"reading_selector_{r:.2f}": acc_at("reading", "selector", r) for r in budgets},
        **{f"reading_random_{r:.2f}": acc_at("reading", "random", r) for r in budgets},
        **{f"scene_selector_{r:.2f}": acc_at("scene", "selector", r) for r in budgets},
        **{f"scene_random_{r:.2f}": acc_at("scene", "random", r) for r in budgets},
        "claim_reading_selector_beats_random": claim_a, "claim_scene_random30_close_to_full": claim_b,
        "n_eval_per_family": n_eval, "seed": seed,
    }
    lines = [
        f"reading: full {full_reading:.2f}; selector - random at " + ", ".join(f"{r:.0%}: {g:+.2f}" for r, g in gaps.items()),
        f"scene: full {full_scene:.2f}, random 30% {random30:.2f} (gap {full_scene - random30:+.2f})",
        " ".join(["(a) selector clearly beats random on reading at <= 50% keep:",
                  "REPRODUCED" if claim_a else "NOT reproduced"]),
        " ".join(["(b) random 30% close to full on scene families:", "REPRODUCED" if claim_b else "NOT reproduced"]),
    ]
    scene_gaps = {f: acc_family.query("family == @f and method == 'full'")["accuracy"].mean()
                  - acc_family.query("family == @f and method == 'random' and abs(ratio - 0.3) < 1e-9")["accuracy"].mean()
                  for f in families if f not in reading}
    worst = max(scene_gaps, key=lambda f: scene_gaps[f]) if scene_gaps else None
    if worst is not None and np.isfinite(scene_gaps[worst]):
        lines.append(" ".join([f"largest scene gap full - random 30%: {worst} ({scene_gaps[worst]:+.2f}); per family:",
                               str({f: round(float(g), 2) for f, g in scene_gaps.items()})]))
    per_family = acc_family.pivot_table(index="family", columns=["method", "ratio"], values="accuracy").round(2)
    lines.append(per_family.to_string())
    if full_reading < 0.3:
        lines.append("note: the model itself reads poorly (full accuracy < 0.3), so the reading comparison has little room.")
    return {"metrics": metrics, "lines": lines}
