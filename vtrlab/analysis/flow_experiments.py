"""Runs the model for notebook 02: knockout-window sweeps and per-layer signals over the image tokens,
each image token labelled with the sample's ground truth (relevant / any object) through the model's own
layout (``vtrlab.data.groundtruth``: the token's pixel box touches the boxes or mask). Samples without ground
truth get the sweeps of the named edges and their signals (``has_truth`` False); the patch edges and the
scores against ground truth need it. Tables: analysis.flow."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from vtrlab.analysis.controls import object_tokens
from vtrlab.data.groundtruth import relevant_tokens
from vtrlab.flow import EDGES, knockout_sweep, logit_lens, rollout, saliency
from vtrlab.probes import capture
from vtrlab.probes.spec import layer_indices

SIGNALS = ("attention", "rollout", "saliency", "logit_lens")


def _truth(layout, sample) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per image token (aligned with ``layout.image_positions``): relevant, and part of any object (None where
    the sample has no ground truth / no object map)."""
    return relevant_tokens(layout, sample), object_tokens(layout, sample)


def _usable(rel: np.ndarray | None) -> bool:
    """Ground truth that can build the patch edges: some relevant and some irrelevant image tokens."""
    return rel is not None and bool(rel.any()) and not bool(rel.all())


def _sweep_frame(sw, start: int, index: Sequence[int], chunk: Sequence) -> pd.DataFrame:
    """``knockout_sweep`` result as rows; ``index[i]`` is batch row i's place in ``chunk``."""
    df = sw[["relative_change", "correct"]].to_dataframe().reset_index()
    df["window_start"] = sw.window_start.values[df["window"].to_numpy()]
    df["window_stop"] = sw.window_stop.values[df["window"].to_numpy()]
    local = np.asarray(index)[df["sample"].to_numpy()]
    df["sample"] = start + local
    df["family"] = [chunk[i].family for i in local]
    return df.drop(columns="window")


def patch_edges(layouts, relevant: Sequence[np.ndarray], rng: np.random.Generator) -> dict:
    """``relevant patches→last`` and ``irrelevant patches→last`` (as many irrelevant image tokens, drawn at
    random) as explicit key positions per sample."""
    rel_keys, irr_keys = [], []
    for L, rel in zip(layouts, relevant):
        pos = np.asarray(L.image_positions)
        r, other = pos[rel], pos[~rel]
        if r.size == 0 or other.size == 0:
            raise ValueError("a sample has no relevant (or no irrelevant) image token; cannot build patch edges")
        k = min(r.size, other.size)
        rel_keys.append(r.tolist())
        irr_keys.append(np.sort(rng.choice(other, size=k, replace=False)).tolist())
    return {"relevant→last": (rel_keys, "last"), "irrelevant→last": (irr_keys, "last")}


def run_flow(
    vlm,
    samples: Sequence,
    *,
    window: int = 9,
    layers="all",
    batch_size: int = 4,
    seed: int = 0,
    signals: Sequence[str] = SIGNALS,
) -> dict[str, pd.DataFrame]:
    """Sweep and signal frames for ``samples`` (``vtrlab.data`` records or synthetic samples).

    Returns ``{"sweep": (edge, window_start, window_stop, sample, family, relative_change, correct),
    "tokens": (signal, sample, family, layer, position, row, col, score, relevant, object, has_truth,
    has_objects)}``. The answer is the model's own greedy token at the last position (the organism's accuracy
    is near 1). The patch edges (relevant / as many irrelevant patches -> last) run on the samples whose
    ground truth has both relevant and irrelevant image tokens; ``relevant`` / ``object`` are False where
    ``has_truth`` / ``has_objects`` is False.
    """
    bad = [s for s in signals if s not in SIGNALS]
    if bad:
        raise ValueError(f"signals {bad} are not known; use some of {SIGNALS}")
    lay = layer_indices(layers, len(vlm.lm_layers))
    rng = np.random.default_rng(seed)
    sweeps, tokens = [], []
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        layouts = list(batch.layouts)
        truth = [_truth(L, s) for L, s in zip(layouts, chunk)]
        usable = [i for i, t in enumerate(truth) if _usable(t[0])]
        if len(usable) == len(chunk):  # one sweep with every edge (the organism: always)
            edges = dict(EDGES) | patch_edges(layouts, [t[0] for t in truth], rng)
            sweeps.append(
                _sweep_frame(knockout_sweep(vlm, batch, edges=edges, window=window), start, range(len(chunk)), chunk)
            )
        else:  # named edges on the batch, patch edges on the samples whose ground truth can build them
            sweeps.append(
                _sweep_frame(
                    knockout_sweep(vlm, batch, edges=dict(EDGES), window=window), start, range(len(chunk)), chunk
                )
            )
            if usable:
                sub = vlm.prepare([chunk[i].image for i in usable], [chunk[i].question for i in usable])
                edges = patch_edges(list(sub.layouts), [truth[i][0] for i in usable], rng)
                sweeps.append(_sweep_frame(knockout_sweep(vlm, sub, edges=edges, window=window), start, usable, chunk))
        per_key = {}  # signal -> (B, L, N) score per sequence position
        if "attention" in signals:
            per_key["attention"] = capture(
                vlm, batch, queries="last", layers=lay, vision=False, head_mean=True
            ).lm_attn.values[:, :, 0]
        if "rollout" in signals:
            per_key["rollout"] = rollout(vlm, batch, queries="last", layers=lay).rollout.values[:, :, 0]
        if "saliency" in signals:
            per_key["saliency"] = saliency(vlm, batch, queries="last", layers=lay).saliency.values[:, :, 0]
        lens = logit_lens(vlm, batch, queries="image", layers=lay, top_k=1) if "logit_lens" in signals else None
        for b, (L, s) in enumerate(zip(layouts, chunk)):
            pos = np.asarray(L.image_positions)
            sel = L.kind == "image"
            rows, cols = L.row[sel], L.col[sel]
            rel, obj = truth[b]
            has_truth, has_objects = rel is not None, obj is not None
            rel = np.zeros(len(pos), bool) if rel is None else rel
            obj = np.zeros(len(pos), bool) if obj is None else obj
            scores = {name: v[b][:, pos] for name, v in per_key.items()}
            if lens is not None:
                qp = lens.query_position.values[b]
                order = {int(p): i for i, p in enumerate(qp) if not np.isnan(p)}
                idx = np.asarray([order[int(p)] for p in pos])
                scores["logit_lens"] = lens.target_prob.values[b, :, idx, 0].T  # (L, tokens)
            for name, sc in scores.items():
                for li, layer in enumerate(lay):
                    tokens.append(
                        pd.DataFrame(
                            {
                                "signal": name,
                                "sample": start + b,
                                "family": s.family,
                                "layer": layer,
                                "position": pos,
                                "row": rows,
                                "col": cols,
                                "score": sc[li],
                                "relevant": rel,
                                "object": obj,
                                "has_truth": has_truth,
                                "has_objects": has_objects,
                            }
                        )
                    )
    return {"sweep": pd.concat(sweeps, ignore_index=True), "tokens": pd.concat(tokens, ignore_index=True)}
