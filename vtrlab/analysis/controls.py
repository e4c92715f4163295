"""Relevance scores with their controls, per sample and layer, and their per-family summaries with CIs.

Pure table builders over the token-score tables of :mod:`vtrlab.analysis.attention` (LM or vision
[CLS] attention, or any table with sample, layer, image, tile, row, col, score): beside each AUROC the
objectness baseline, the AUROC restricted to object patches (target vs distractors) and the lift over
uniform (:mod:`vtrlab.metrics.controls`); layers whose image-key ranking cannot depend on the question
are flagged (:func:`question_agnostic_table`). :func:`controls_summary` and :func:`controls_prose`
turn the per-family CI table into the metrics a notebook logs and the sentences it prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from vtrlab.metrics import agreement, controls
from vtrlab.models.base import grid_values

METRICS = ("auroc", "object_auroc", "objectness_auroc", "lift", "pointing")


def object_mask_of(record) -> np.ndarray | None:
    """A record's pixel mask of *all* objects (H, W bool), or None: ``record.object_mask``, else
    ``record.meta["object_mask"]`` (the organism's records carry it), else a synthetic Sample's
    ``object_map > 0``."""
    mask = getattr(record, "object_mask", None)
    if mask is None:
        mask = (getattr(record, "meta", None) or {}).get("object_mask")
    if mask is None and getattr(record, "object_map", None) is not None:
        mask = np.asarray(record.object_map) > 0
    return None if mask is None else np.asarray(mask, dtype=bool)


def object_grids(layouts: Sequence, records: Sequence, tile: int = 0) -> list[np.ndarray | None]:
    """Per (layout, record): bool (rows, cols) on the layout's grid of tile ``tile``: the token's pixel box
    touches any object. None for records without an object mask (the objectness controls are then NaN)."""
    from vtrlab.data.groundtruth import relevance_grid, token_coverage

    if len(layouts) != len(records):
        raise ValueError(f"{len(layouts)} layouts for {len(records)} records")
    out = []
    for layout, record in zip(layouts, records):
        mask = object_mask_of(record)
        out.append(None if mask is None else relevance_grid(layout, token_coverage(layout, mask), tile=tile))
    return out


def controlled_agreement(
    scores: pd.DataFrame,
    relevance: Mapping[int, np.ndarray] | Sequence,
    objects: Mapping[int, np.ndarray | None] | Sequence | None = None,
    families: Mapping[int, str] | Sequence[str] | None = None,
    layer: str = "layer",
    tile: int = 0,
) -> pd.DataFrame:
    """Per sample and layer: AUROC and pointing game against ``relevance`` (bool grid per sample, as in
    :func:`vtrlab.analysis.attention.ground_truth_agreement`), with the controls beside them.

    Columns: sample, family, <layer>, auroc, pointing, lift (share of the scores on relevant tokens over
    their token share; 1 = uniform), object_auroc (target vs distractor object tokens), objectness_auroc
    (the question-blind map of all object tokens; the same at every layer). The object columns are NaN
    where ``objects`` has no map for the sample. Tokens with a NaN score (seen by no captured row) are
    left out of that sample's row."""
    out = []
    sub = scores[(scores["tile"] == tile) & (scores["image"] == 0)]
    for (sample, lay), group in sub.groupby(["sample", layer], sort=True):
        group = group[np.isfinite(group["score"].to_numpy(dtype=np.float64))]
        rows, cols = int(group["row"].max()) + 1, int(group["col"].max()) + 1
        rc = group["row"].to_numpy(), group["col"].to_numpy()
        truth = grid_values(relevance[sample], (rows, cols), *rc).astype(bool)
        obj_grid = None if objects is None else objects[sample]
        s = group["score"].to_numpy(dtype=np.float64)
        row = {
            "sample": sample,
            "family": None if families is None else families[sample],
            layer: lay,
            "auroc": float(agreement.auroc(s, truth)),
            "pointing": float(agreement.pointing_game(s, truth)),
            "lift": float(controls.relevant_lift(np.clip(s, 0, None), truth)),
            "object_auroc": np.nan,
            "objectness_auroc": np.nan,
        }
        if obj_grid is not None:
            obj = grid_values(obj_grid, (rows, cols), *rc).astype(bool)
            row["object_auroc"] = float(controls.object_auroc(s, truth, obj))
            row["objectness_auroc"] = float(controls.objectness_auroc(obj, truth))
        out.append(row)
    return pd.DataFrame(out, columns=["sample", "family", layer, *METRICS])


def question_agnostic_table(ds, layouts: Sequence, start: int = 0, bidirectional_image: bool = False) -> pd.DataFrame:
    """Per sample and captured LM layer of a capture ``ds``: whether the ranking of image keys by the
    captured query rows can depend on the question (:func:`vtrlab.metrics.controls.question_agnostic`),
    derived from each layout's positions and the rows captured (``ds.query_position``).

    Columns: sample (``start`` + index in the batch), layer, question_agnostic."""
    rows = []
    qpos = ds.query_position.values  # (sample, query), NaN for padding rows
    for b, layout in enumerate(layouts):
        q = qpos[b][np.isfinite(qpos[b])].astype(np.int64)
        for lay in ds["layer"].values:
            flag = controls.question_agnostic(
                int(lay), q, layout.image_positions, layout.question_positions, bidirectional_image=bidirectional_image
            )
            rows.append({"sample": start + b, "layer": int(lay), "question_agnostic": bool(flag)})
    return pd.DataFrame(rows, columns=["sample", "layer", "question_agnostic"])


def agnostic_layers(flags: pd.DataFrame) -> dict[int, bool]:
    """{layer: True when the layer is question-agnostic for every sample} from :func:`question_agnostic_table`."""
    return {int(k): bool(v) for k, v in flags.groupby("layer")["question_agnostic"].all().items()}


def controls_ci(
    table: pd.DataFrame, layer: str = "layer", n_boot: int = 1000, seed: int = 0, by_family: bool = True
) -> pd.DataFrame:
    """Mean and percentile-bootstrap 95% CI over samples of every metric of :func:`controlled_agreement`,
    per family and layer, plus family ``"all"`` (every sample pooled). Columns: family, <layer>, metric,
    mean, low, high, n."""
    parts = [controls.ci_table(table.assign(family="all"), ["family", layer], list(METRICS), n_boot=n_boot, seed=seed)]
    if by_family and table["family"].notna().any():
        parts.insert(0, controls.ci_table(table, ["family", layer], list(METRICS), n_boot=n_boot, seed=seed))
    return pd.concat(parts, ignore_index=True)


def controls_summary(
    ci: pd.DataFrame, agnostic: Mapping[int, bool] | None = None, layer: str = "layer", prefix: str = "lm"
) -> dict:
    """Metrics to log from :func:`controls_ci`: per family, the best layer by AUROC (and whether it is
    question-agnostic), the best question-aware layer by object AUROC, and the objectness baseline, each
    with its CI. Keys: ``<prefix>_<what>/<family>``; values are floats, ints or bools (JSON-ready)."""
    agnostic = dict(agnostic or {})
    out: dict = {}
    for fam, g in ci.groupby("family", sort=False):
        by = {m: g[g["metric"] == m].set_index(layer) for m in METRICS}
        au = by["auroc"]["mean"].dropna()
        if au.empty:
            continue
        best = int(au.idxmax())
        out |= {
            f"{prefix}_best_layer/{fam}": best,
            f"{prefix}_best_auroc/{fam}": float(au[best]),
            f"{prefix}_best_auroc_low/{fam}": float(by["auroc"].loc[best, "low"]),
            f"{prefix}_best_auroc_high/{fam}": float(by["auroc"].loc[best, "high"]),
            f"{prefix}_best_layer_question_agnostic/{fam}": bool(agnostic.get(best, False)),
            f"{prefix}_n/{fam}": int(by["auroc"].loc[best, "n"]),
        }
        ob = by["objectness_auroc"]["mean"].dropna()
        if not ob.empty:
            first = ob.index[0]
            out |= {
                f"{prefix}_objectness_auroc/{fam}": float(ob[first]),
                f"{prefix}_objectness_auroc_low/{fam}": float(by["objectness_auroc"].loc[first, "low"]),
                f"{prefix}_objectness_auroc_high/{fam}": float(by["objectness_auroc"].loc[first, "high"]),
            }
        oa = by["object_auroc"]["mean"].dropna()
        oa = oa[[not agnostic.get(int(k), False) for k in oa.index]]
        if not oa.empty:
            ob_best = int(oa.idxmax())
            out |= {
                f"{prefix}_best_object_layer/{fam}": ob_best,
                f"{prefix}_best_object_auroc/{fam}": float(oa[ob_best]),
                f"{prefix}_best_object_auroc_low/{fam}": float(by["object_auroc"].loc[ob_best, "low"]),
                f"{prefix}_best_object_auroc_high/{fam}": float(by["object_auroc"].loc[ob_best, "high"]),
            }
    if agnostic:
        out[f"{prefix}_question_agnostic_layers"] = [int(k) for k, v in sorted(agnostic.items()) if v]
    return out


def controls_prose(metrics: Mapping, prefix: str = "lm", what: str = "LM attention") -> list[str]:
    """Sentences, one per family, stating the numbers of :func:`controls_summary` (never typed by hand)."""
    fams = [k.split("/", 1)[1] for k in metrics if k.startswith(f"{prefix}_best_auroc/")]
    lines = [f"{what}:"] if fams else []
    ag = metrics.get(f"{prefix}_question_agnostic_layers")
    if ag is not None and fams:
        lines.append(
            "question-agnostic layers (cannot rank image tokens by the question): "
            + (", ".join(map(str, ag)) if ag else "none")
        )

    def num(key):  # metrics.json stores NaN as the string "nan"
        return float(metrics[key])

    def ci(key, fam):
        return f"{num(f'{key}/{fam}'):.3f} [{num(f'{key}_low/{fam}'):.3f}, {num(f'{key}_high/{fam}'):.3f}]"

    for fam in fams:
        best = metrics[f"{prefix}_best_layer/{fam}"]
        s = f"{fam} (n={metrics[f'{prefix}_n/{fam}']}): best AUROC at layer {best}, {ci(f'{prefix}_best_auroc', fam)}"
        if metrics.get(f"{prefix}_best_layer_question_agnostic/{fam}"):
            s += " (a question-agnostic layer)"
        if f"{prefix}_objectness_auroc/{fam}" in metrics:
            low, high = num(f"{prefix}_best_auroc_low/{fam}"), num(f"{prefix}_objectness_auroc_high/{fam}")
            verdict = (
                "cannot yet be compared (too few samples for a CI) with"
                if not np.isfinite(low + high)
                else "beats"
                if low > high
                else "does not clearly beat"
            )
            s += f"; it {verdict} the objectness baseline {ci(f'{prefix}_objectness_auroc', fam)}"
        if f"{prefix}_best_object_auroc/{fam}" in metrics:
            s += (
                f"; target vs distractor objects: best {'question-aware ' if ag is not None else ''}layer "
                f"{metrics[f'{prefix}_best_object_layer/{fam}']}, AUROC {ci(f'{prefix}_best_object_auroc', fam)}"
            )
        lines.append("  " + s + ".")
    return lines


def object_tokens(layout, record) -> np.ndarray | None:
    """Bool per image token of ``layout`` (aligned with ``layout.image_positions``): its pixel box touches any
    object of ``record`` (:func:`object_mask_of`); None when the record has no object map."""
    from vtrlab.data.groundtruth import token_coverage

    mask = object_mask_of(record)
    return None if mask is None else np.nan_to_num(token_coverage(layout, mask), nan=0.0) > 0


def token_controls(
    scores: Sequence[np.ndarray],
    relevant: Sequence[np.ndarray | None],
    objects: Sequence[np.ndarray | None],
    families: Sequence[str],
    signal: str = "signal",
    start: int = 0,
) -> pd.DataFrame:
    """Per sample, for per-image-token ``scores`` (e.g. a selector's logits): auroc, object_auroc,
    objectness_auroc (lift is left out: scores need not be non-negative). Samples without ground truth, or
    whose tokens are all or none relevant, are skipped. Columns: sample, family, signal, auroc,
    object_auroc, objectness_auroc."""
    rows = []
    for i, (s, rel, obj, fam) in enumerate(zip(scores, relevant, objects, families)):
        if rel is None or rel.all() or not rel.any():
            continue
        s = np.asarray(s, dtype=np.float64)
        row = {
            "sample": start + i,
            "family": fam,
            "signal": signal,
            "auroc": float(agreement.auroc(s, rel)),
            "object_auroc": np.nan,
            "objectness_auroc": np.nan,
        }
        if obj is not None:
            row["object_auroc"] = float(controls.object_auroc(s, rel, obj))
            row["objectness_auroc"] = float(controls.objectness_auroc(obj, rel))
        rows.append(row)
    return pd.DataFrame(rows, columns=["sample", "family", "signal", "auroc", "object_auroc", "objectness_auroc"])


def accuracy_ci(sweep: pd.DataFrame, by: str = "family", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy of a keep-ratio sweep (``correct`` per sample) per ``by`` (family or group), method and
    ratio, with a percentile-bootstrap 95% CI over samples. Columns: <by>, method, ratio, mean, low, high, n."""
    t = controls.ci_table(
        sweep.assign(correct=sweep["correct"].astype(np.float64)),
        [by, "method", "ratio"],
        "correct",
        n_boot=n_boot,
        seed=seed,
    )
    return t.drop(columns="metric")


def accuracy_metrics(ci: pd.DataFrame, by: str = "family") -> dict:
    """``acc/<group>/<method>/<ratio>`` (+ ``_low``, ``_high``, ``_n``) from :func:`accuracy_ci`, JSON-ready."""
    out = {}
    for _, r in ci.iterrows():
        key = f"acc/{r[by]}/{r['method']}/{float(r['ratio']):.2f}"
        out |= {
            key: float(r["mean"]),
            f"{key}_low": float(r["low"]),
            f"{key}_high": float(r["high"]),
            f"{key}_n": int(r["n"]),
        }
    return out


def accuracy_prose(metrics: Mapping, ratios: Sequence[float]) -> list[str]:
    """One line per family or group in ``metrics`` (:func:`accuracy_metrics`): full and no-image accuracy,
    then selector and random at each ratio, each with its 95% CI. Every number comes from ``metrics``."""

    def val(key):
        return float(metrics[key]) if key in metrics else float("nan")

    def ci(key):
        if key not in metrics:
            return "n/a"
        return f"{val(key):.2f} [{val(key + '_low'):.2f}, {val(key + '_high'):.2f}]"

    groups = list(dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith("acc/") and k.count("/") == 3))
    lines = []
    for g in groups:
        n = metrics.get(f"acc/{g}/full/1.00_n", "?")
        parts = [f"full {ci(f'acc/{g}/full/1.00')}", f"no image {ci(f'acc/{g}/no_image/0.00')}"]
        for r in ratios:
            if 0 < r < 1:
                parts.append(
                    f"{r:.0%}: selector {ci(f'acc/{g}/selector/{r:.2f}')} vs random {ci(f'acc/{g}/random/{r:.2f}')}"
                )
        lines.append(f"{g} (n={n}): " + "; ".join(parts))
    return lines


def _ci_text(metrics: Mapping, key: str, fam: str) -> str:
    v, lo, hi = (float(metrics[f"{key}{s}/{fam}"]) for s in ("", "_low", "_high"))
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def selector_prose(metrics: Mapping) -> list[str]:
    """Per family: the selector's AUROC against ground truth beside the objectness baseline and the
    target-vs-distractor AUROC, with CIs (keys ``selector_<metric>[_low|_high]/<family>``)."""
    fams = [k.split("/", 1)[1] for k in metrics if k.startswith("selector_auroc/")]
    lines = ["Selector logits vs ground truth (AUROC, 95% CI):"] if fams else []
    for fam in fams:
        s = f"  {fam}: AUROC {_ci_text(metrics, 'selector_auroc', fam)}"
        if np.isfinite(float(metrics.get(f"selector_objectness_auroc/{fam}", np.nan))):
            s += f"; objectness baseline {_ci_text(metrics, 'selector_objectness_auroc', fam)}"
        if np.isfinite(float(metrics.get(f"selector_object_auroc/{fam}", np.nan))):
            s += f"; target vs distractor objects {_ci_text(metrics, 'selector_object_auroc', fam)}"
        lines.append(s + ".")
    return lines


def diagnostic_prose(metrics: Mapping) -> list[str]:
    """Per family, the context diagnostic's accuracies (keys ``diag/<family>/<plan>``), one line each."""
    fams = list(dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith("diag/")))
    lines = ["Context diagnostic at a 10% budget (accuracy per plan):"] if fams else []
    for fam in fams:
        plans = {k.split("/", 2)[2]: float(v) for k, v in metrics.items() if k.startswith(f"diag/{fam}/")}
        lines.append(f"  {fam}: " + ", ".join(f"{p} {v:.2f}" for p, v in plans.items()))
    return lines


def signal_controls(
    signals: Mapping[str, Sequence[np.ndarray | None]],
    relevant: Sequence[np.ndarray | None],
    objects: Sequence[np.ndarray | None],
    families: Sequence[str],
) -> pd.DataFrame:
    """:func:`token_controls` for every signal of ``signals`` (``{name: per-sample scores}``, e.g. from
    :func:`vtrlab.analysis.signals.compute_over`): each signal's AUROC beside the objectness baseline and the
    target-vs-distractor AUROC. Samples where a signal is None are left out for it. Columns: sample, family,
    signal, auroc, object_auroc, objectness_auroc."""
    parts = []
    for name, per in signals.items():
        if len(per) != len(relevant):
            raise ValueError(f"signal {name!r} has {len(per)} entries for {len(relevant)} samples")
        keep = [i for i, s in enumerate(per) if s is not None]
        t = token_controls(
            [per[i] for i in keep],
            [relevant[i] for i in keep],
            [objects[i] for i in keep],
            [families[i] for i in keep],
            signal=name,
        )
        t["sample"] = [keep[i] for i in t["sample"]]
        parts.append(t)
    cols = ["sample", "family", "signal", "auroc", "object_auroc", "objectness_auroc"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


SIGNAL_METRICS = ("auroc", "object_auroc", "objectness_auroc")


def signal_controls_ci(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean and bootstrap 95% CI of :func:`signal_controls` per family and signal, plus family ``"all"``.
    Columns: family, signal, metric, mean, low, high, n."""
    by = ["family", "signal"]
    parts = [controls.ci_table(table.assign(family="all"), by, list(SIGNAL_METRICS), n_boot=n_boot, seed=seed)]
    if table["family"].notna().any() and table["family"].nunique() > 1:
        parts.insert(0, controls.ci_table(table, by, list(SIGNAL_METRICS), n_boot=n_boot, seed=seed))
    return pd.concat(parts, ignore_index=True)


def signal_controls_summary(ci: pd.DataFrame) -> dict:
    """``signal_<metric>/<family>/<signal>`` (+ ``_low``, ``_high``, ``_n``) from :func:`signal_controls_ci`."""
    out: dict = {}
    for _, r in ci.iterrows():
        key = f"signal_{r['metric']}/{r['family']}/{r['signal']}"
        out |= {key: float(r["mean"]), f"{key}_low": float(r["low"]), f"{key}_high": float(r["high"])}
        out[f"{key}_n"] = int(r["n"])
    return out


def signal_controls_prose(metrics: Mapping, family: str = "all") -> list[str]:
    """For ``family``: every signal's AUROC with its CI beside the objectness baseline and the
    target-vs-distractor AUROC, best AUROC first (from :func:`signal_controls_summary` values)."""
    sigs = [
        k.split("/", 2)[2]
        for k in metrics
        if k.startswith(f"signal_auroc/{family}/") and not k.endswith(("_low", "_high", "_n"))
    ]
    if not sigs:
        return []

    def ci(metric, sig):
        key = f"signal_{metric}/{family}/{sig}"
        v, lo, hi = (float(metrics.get(key + s, np.nan)) for s in ("", "_low", "_high"))
        return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"

    sigs.sort(key=lambda s: -float(metrics[f"signal_auroc/{family}/{s}"]))
    base = ci("objectness_auroc", sigs[0])
    lines = [f"Every signal vs ground truth ({family}; objectness baseline {base}):"]
    for s in sigs:
        lines.append(f"  {s}: AUROC {ci('auroc', s)}; target vs distractor objects {ci('object_auroc', s)}")
    return lines
