"""Tables of notebook 03 (reconstruction selector): pure functions of sweeps, masks and Datasets.

No model runs here: the experiments that produce the inputs (keep-ratio sweep, relevance agreement,
context diagnostic, selector loading) live in ``vtrlab.analysis.experiments_reconstruction``; the
per-token and per-layer reconstruction errors are verbs of ``vtrlab.recon``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

KEEP_METHODS = ("selector", "random", "full", "no_image")


def random_keep(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random bool mask keeping exactly round(ratio * n) of n tokens."""
    keep = np.zeros(n, dtype=bool)
    keep[rng.choice(n, size=int(round(ratio * n)), replace=False)] = True
    return keep


READING_FAMILIES = ("reading",)  # OCR-like family; every other family is a scene question


def family_group(family: str) -> str:
    """``"reading"`` for the OCR-like families (``READING_FAMILIES``), ``"scene"`` for every other one."""
    return "reading" if family in READING_FAMILIES else "scene"


def kept_sets(scores: Sequence[np.ndarray], relevant: Sequence[np.ndarray], ratios: Sequence[float]) -> dict:
    """Per keep ratio, per sample: the top-k keep mask of ``scores`` (``Selector.topk_mask``) and the
    share of the ``relevant`` tokens (bool per image token) it keeps. Returns
    ``{ratio: [{"keep": mask, "relevant_kept": share}, ...]}``."""
    from ..recon.selector import Selector

    out = {}
    for r in ratios:
        rows = []
        for sc, rel in zip(scores, relevant):
            keep = Selector.topk_mask(sc, r)
            rows.append({"keep": keep, "relevant_kept": float(keep[np.asarray(rel, dtype=bool)].mean())})
        out[r] = rows
    return out


def accuracy_tables(sweep, group_of=family_group):
    """Accuracy tables of a ``keep_ratio_sweep``: (by group, by family).

    By group: group, method, ratio, accuracy (mean of ``correct``), n (answers), with the group of
    each row's family given by ``group_of``. By family: family, method, ratio, accuracy."""
    groups = sweep["family"].map(group_of)
    acc = (
        sweep.assign(group=groups)
        .groupby(["group", "method", "ratio"], as_index=False)["correct"]
        .agg(["mean", "count"])
        .rename(columns={"mean": "accuracy", "count": "n"})
    )
    acc_family = (
        sweep.groupby(["family", "method", "ratio"], as_index=False)["correct"]
        .mean()
        .rename(columns={"correct": "accuracy"})
    )
    return acc, acc_family


def accuracy_pivot(acc):
    """Accuracy by (group, method) x ratio, rounded to 3 decimals."""
    return acc.pivot_table(index=["group", "method"], columns="ratio", values="accuracy").round(3)


def agreement_summary(agree):
    """Mean value per (group, metric, method) x ratio (NaN ratio: AUROC), rounded to 3 decimals."""
    return agree.groupby(["group", "metric", "method", "ratio"], dropna=False)["value"].mean().unstack("ratio").round(3)


DIAGNOSTIC_PLANS = (
    "selector",
    "random",
    "relevant only",
    "relevant + random others",
    "random others only",
    "selector minus relevant",
)


def diagnostic_table(diag):
    """Accuracy per family x plan (2 decimals), plus a ``mean kept`` row (tokens kept per plan, 1 decimal)."""
    table = diag.pivot_table(index="family", columns="plan", values="correct").round(2)
    table.loc["mean kept"] = diag.groupby("plan")["kept"].mean().round(1)
    return table


def layer_error_table(lerr: xr.Dataset):
    """Per-sample mean of a ``vtrlab.recon.layer_error`` Dataset over image tokens, per layer.

    Columns: sample, stack (``vision`` or ``lm``), index (layer within the stack), error."""
    import pandas as pd

    parts = []
    for name, stack, dim in (("vision_error", "vision", "vision_layer"), ("lm_error", "lm", "layer")):
        if name not in lerr:
            continue
        d = lerr[name].reset_coords(drop=True).to_dataframe().reset_index().dropna(subset=[name])
        parts.append(
            pd.DataFrame({"sample": d["sample"], "stack": stack, "index": d[dim].astype(int), "error": d[name]})
        )
    if not parts:
        raise ValueError(f"no vision_error or lm_error in this Dataset; it holds {sorted(lerr.data_vars)}")
    per_layer = pd.concat(parts, ignore_index=True)
    return per_layer.groupby(["sample", "stack", "index"], as_index=False)["error"].mean()


def claim_summary(
    acc,
    acc_family,
    budgets: Sequence[float],
    n_eval: int,
    seed: int,
    families: Sequence[str] | None = None,
    reading: Sequence[str] = READING_FAMILIES,
) -> dict:
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
        "reading_full": full_reading,
        "scene_full": full_scene,
        "reading_no_image": acc_at("reading", "no_image", 0.0),
        "scene_no_image": acc_at("scene", "no_image", 0.0),
        **{f"reading_selector_{r:.2f}": acc_at("reading", "selector", r) for r in budgets},
        **{f"reading_random_{r:.2f}": acc_at("reading", "random", r) for r in budgets},
        **{f"scene_selector_{r:.2f}": acc_at("scene", "selector", r) for r in budgets},
        **{f"scene_random_{r:.2f}": acc_at("scene", "random", r) for r in budgets},
        "claim_reading_selector_beats_random": claim_a,
        "claim_scene_random30_close_to_full": claim_b,
        "n_eval_per_family": n_eval,
        "seed": seed,
    }
    lines = [
        f"reading: full {full_reading:.2f}; selector - random at "
        + ", ".join(f"{r:.0%}: {g:+.2f}" for r, g in gaps.items()),
        f"scene: full {full_scene:.2f}, random 30% {random30:.2f} (gap {full_scene - random30:+.2f})",
        " ".join(
            [
                "(a) selector clearly beats random on reading at <= 50% keep:",
                "REPRODUCED" if claim_a else "NOT reproduced",
            ]
        ),
        " ".join(["(b) random 30% close to full on scene families:", "REPRODUCED" if claim_b else "NOT reproduced"]),
    ]
    scene_gaps = {
        f: acc_family.query("family == @f and method == 'full'")["accuracy"].mean()
        - acc_family.query("family == @f and method == 'random' and abs(ratio - 0.3) < 1e-9")["accuracy"].mean()
        for f in families
        if f not in reading
    }
    worst = max(scene_gaps, key=lambda f: scene_gaps[f]) if scene_gaps else None
    if worst is not None and np.isfinite(scene_gaps[worst]):
        lines.append(
            " ".join(
                [
                    f"largest scene gap full - random 30%: {worst} ({scene_gaps[worst]:+.2f}); per family:",
                    str({f: round(float(g), 2) for f, g in scene_gaps.items()}),
                ]
            )
        )
    per_family = acc_family.pivot_table(index="family", columns=["method", "ratio"], values="accuracy").round(2)
    lines.append(per_family.to_string())
    if full_reading < 0.3:
        lines.append(
            "note: the model itself reads poorly (full accuracy < 0.3), so the reading comparison has little room."
        )
    return {"metrics": metrics, "lines": lines}
