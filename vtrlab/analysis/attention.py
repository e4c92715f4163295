"""Tidy tables from captured attention (``vtrlab.capture``): what notebook 01 plots.

Every function takes the capture's ``xarray.Dataset`` (and, where needed, ground truth) and
returns a ``pandas.DataFrame`` with one row per observation; no I/O, no plotting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from vtrlab.metrics import agreement
from vtrlab.models.base import grid_values

METRICS = ("spearman", "kendall", "top_k_iou", "top_k_ioa")


def _heads_mean(attn: xr.DataArray, head_dim: str) -> xr.DataArray:
    return attn.mean(head_dim) if head_dim in attn.dims else attn


def image_attention_share(ds: xr.Dataset) -> pd.DataFrame:
    """Share of each query row's attention that lands on image tokens (kind == image).

    Columns: sample, layer, head (if the capture kept heads), query, query_position, share.
    """
    is_image = (ds.key_kind == "image").astype(np.float64)
    share = (ds.lm_attn.astype(np.float64) * is_image).sum("key", skipna=False)
    df = share.rename("share").to_dataframe().reset_index()
    qpos = ds.query_position.to_dataframe().reset_index()
    df = df.merge(qpos, on=["sample", "query"]).dropna(subset=["query_position", "share"])
    df["query_position"] = df["query_position"].astype(int)
    return df


def check_image_visible(share: pd.DataFrame) -> None:
    """Raise if the captured rows give (almost) no attention to image tokens: under a causal mask,
    query rows placed before the image (e.g. a question that precedes it) cannot see it."""
    if share.empty or float(share["share"].max()) <= 1e-12:
        positions = sorted(share["query_position"].unique())[:5] if not share.empty else []
        raise ValueError(
            f"the captured query rows (positions {positions}...) give no attention to image tokens; "
            "under a causal mask rows before the image cannot see it — capture queries='last' or 'text'"
        )


def visible_keys(ds: xr.Dataset) -> xr.DataArray:
    """(sample, layer, query, key) bool: whether each captured query row can see each key.

    A key is visible to a row when it is not after it (``key <= query_position``, the causal mask) or
    when the row gave it attention (bidirectional blocks, e.g. Gemma3's image tokens). Padding rows
    see nothing.
    """
    attn = _heads_mean(ds.lm_attn.astype(np.float64), "head")
    causal = (ds["key"] <= ds.query_position) & (ds.key_kind != "pad")  # NaN (padding rows) compares False
    return (causal | (attn > 0)) & ds.query_position.notnull()


def image_token_scores(ds: xr.Dataset) -> pd.DataFrame:
    """Attention each image token receives per LM layer: mean over heads, then over the query rows
    that can *see* the token (:func:`visible_keys`) — a row the causal mask hides a key from says
    nothing about it (averaging its zero would inflate early tokens when ``queries="all"``).

    Columns: sample, layer, position, image, tile, row, col, score, share (score over the sample's
    image tokens at that layer, so rows of a sample/layer sum to 1), lift (mean over the same rows of
    the attention times the row's number of visible keys: 1 = what a uniform row gives). With several
    query rows (``queries="all"``), ``score`` still favours early tokens under a causal mask (they are
    seen by short rows, whose attention is spread over few keys); ``lift`` does not. A token no
    captured row can see gets NaN.
    """
    attn = _heads_mean(ds.lm_attn.astype(np.float64), "head")
    visible = visible_keys(ds)
    scores = attn.where(visible).mean("query", skipna=True)  # (sample, layer, key)
    lift = (attn * visible.sum("key")).where(visible).mean("query", skipna=True)
    table = _token_table(scores, ds, "layer", "key", "key_", image_kind="image", pos_name="position")
    lifts = _token_table(lift, ds, "layer", "key", "key_", image_kind="image", pos_name="position")
    table["lift"] = lifts["score"].to_numpy()  # same rows, same order
    return table


def vision_token_scores(ds: xr.Dataset) -> pd.DataFrame:
    """Vision-encoder attention each patch receives from [CLS] (or mean over queries) per vision layer.

    Columns: sample, vision_layer, crop, vpos, image, tile, row, col, score, share.
    """
    if "vision_attn" not in ds:
        raise ValueError("this capture holds no vision attention; capture with vision=True")
    scores = _heads_mean(ds.vision_attn.astype(np.float64), "vision_head")
    return _token_table(scores, ds, "vision_layer", "vision_key", "vision_key_", image_kind="patch", pos_name="vpos")


def _token_table(
    scores: xr.DataArray, ds: xr.Dataset, layer_dim: str, key_dim: str, prefix: str, image_kind: str, pos_name: str
) -> pd.DataFrame:
    frames = []
    layers = scores[layer_dim].values
    for b in range(ds.sizes["sample"]):
        kind = ds[f"{prefix}kind"].values[b]
        sel = np.flatnonzero(kind == image_kind)
        if sel.size == 0:
            continue
        vals = scores.isel(sample=b).transpose(layer_dim, key_dim).values[:, sel]  # (L, T)
        labels = {c: ds[f"{prefix}{c}"].values[b, sel] for c in ("image", "tile", "row", "col")}
        if pos_name == "vpos":
            labels = {"crop": ds[f"{prefix}crop"].values[b, sel], "vpos": ds[f"{prefix}vpos"].values[b, sel], **labels}
        else:
            labels = {"position": sel, **labels}
        total = np.nansum(vals, 1, keepdims=True)
        frame = pd.DataFrame(
            {
                "sample": b,
                layer_dim: np.repeat(layers, sel.size),
                **{k: np.tile(v, len(layers)) for k, v in labels.items()},
                "score": vals.ravel(),
                "share": (vals / np.where(total > 0, total, np.nan)).ravel(),
            }
        )
        frames.append(frame)
    if not frames:
        raise ValueError(f"no token of kind {image_kind!r} in this capture")
    return pd.concat(frames, ignore_index=True)


def layer_agreement(
    scores: pd.DataFrame, metric: str = "spearman", k: int | float = 0.1, layer: str = "layer"
) -> pd.DataFrame:
    """Agreement of per-sample token rankings between every pair of layers.

    ``scores``: a table from :func:`image_token_scores` / :func:`vision_token_scores`. ``k`` for the
    top-k metrics: an int, or a fraction of each sample's tokens. Columns: sample, layer_a,
    layer_b, metric, value.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: use one of {METRICS}")
    rows = []
    for sample, group in scores.groupby("sample", sort=True):
        mat = group.pivot_table(index=layer, columns=_token_cols(group), values="score", sort=True)
        values = mat.to_numpy()
        n = values.shape[1]
        kk = max(1, int(round(k * n))) if isinstance(k, float) else int(k)
        fn = getattr(agreement, metric)
        args = (kk,) if metric.startswith("top_k") else ()
        m = fn(values[:, None], values[None, :], *args)
        la, lb = np.meshgrid(mat.index.to_numpy(), mat.index.to_numpy(), indexing="ij")
        rows.append(
            pd.DataFrame(
                {
                    "sample": sample,
                    "layer_a": la.ravel(),
                    "layer_b": lb.ravel(),
                    "metric": metric,
                    "value": np.asarray(m).ravel(),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def _token_cols(df: pd.DataFrame) -> list[str]:
    return ["crop", "vpos"] if "vpos" in df.columns else ["position"]


def agreement_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over samples of a :func:`layer_agreement` table as a layer_a x layer_b matrix."""
    return table.pivot_table(index="layer_a", columns="layer_b", values="value", aggfunc="mean")


def position_bias(scores: pd.DataFrame, layer: str = "layer") -> pd.DataFrame:
    """Mean share of attention per patch (tile, row, col) over samples: where attention goes on
    average regardless of content. Columns: layer, tile, row, col, mean_share, n."""
    g = scores.groupby([layer, "tile", "row", "col"], sort=True)["share"]
    return g.agg(mean_share="mean", n="count").reset_index()


def ground_truth_agreement(
    scores: pd.DataFrame,
    relevance: Sequence[np.ndarray] | Mapping[int, np.ndarray],
    families: Sequence[str] | Mapping[int, str] | None = None,
    layer: str = "layer",
    tile: int = 0,
) -> pd.DataFrame:
    """Per sample and layer: AUROC of token scores against the relevance mask, and the pointing game.

    ``relevance[sample]`` is a boolean (rows, cols) mask over the patch grid of tile ``tile`` of the
    first image (a coarser mask is expanded onto a finer grid by an integer factor). Columns:
    sample, family, layer, auroc, pointing.
    """
    out = []
    sub = scores[(scores["tile"] == tile) & (scores["image"] == 0)]
    for (sample, lay), group in sub.groupby(["sample", layer], sort=True):
        rows, cols = int(group["row"].max()) + 1, int(group["col"].max()) + 1
        truth = grid_values(relevance[sample], (rows, cols), group["row"].to_numpy(), group["col"].to_numpy())
        truth = truth.astype(bool)
        s = group["score"].to_numpy()
        out.append(
            {
                "sample": sample,
                "family": None if families is None else families[sample],
                layer: lay,
                "auroc": float(agreement.auroc(s, truth)),
                "pointing": float(agreement.pointing_game(s, truth)),
            }
        )
    return pd.DataFrame(out)


def tables_from_captures(captures) -> dict[str, pd.DataFrame]:
    """Join the tables of many captured batches (``(first_sample_index, ds)`` pairs, e.g. from
    ``vtrlab.probes.capture_batches``), renumbering ``sample`` to the global sample index.

    Returns ``{"share": ..., "image_scores": ..., "vision_scores": ...}`` (the last only when the
    captures hold vision attention).
    """
    parts: dict[str, list[pd.DataFrame]] = {"share": [], "image_scores": [], "vision_scores": []}
    for start, ds in captures:
        for name, fn in (("share", image_attention_share), ("image_scores", image_token_scores)):
            df = fn(ds)
            df["sample"] += start
            parts[name].append(df)
        if "vision_attn" in ds:
            df = vision_token_scores(ds)
            df["sample"] += start
            parts["vision_scores"].append(df)
    return {k: pd.concat(v, ignore_index=True) for k, v in parts.items() if v}


def share_by_layer_head(share: pd.DataFrame) -> pd.DataFrame:
    """Mean image-attention share as a layer x head matrix (from :func:`image_attention_share`)."""
    if "head" not in share.columns:
        raise ValueError("this share table has no head column (captured with head_mean=True)")
    return share.pivot_table(index="layer", columns="head", values="share", aggfunc="mean")


def token_values(
    scores: pd.DataFrame,
    sample: int,
    layer: int,
    positions,
    value: str = "share",
    layer_col: str = "layer",
    position_col: str = "position",
) -> np.ndarray:
    """One sample/layer's values aligned with ``positions`` (e.g. ``layout.image_positions``)."""
    sub = scores[(scores["sample"] == sample) & (scores[layer_col] == layer)].set_index(position_col)[value]
    missing = np.setdiff1d(np.asarray(positions), sub.index.to_numpy())
    if missing.size:
        raise ValueError(f"sample {sample}, {layer_col} {layer}: no score for position(s) {missing[:5].tolist()}")
    return sub.loc[np.asarray(positions)].to_numpy()


def spread_layers(layers: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` layers spread evenly over ``layers`` (first and last included)."""
    layers = sorted(layers)
    if len(layers) <= n:
        return list(layers)
    idx = np.unique(np.round(np.linspace(0, len(layers) - 1, n)).astype(int))
    return [layers[i] for i in idx]
