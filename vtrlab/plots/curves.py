"""Per-layer curves with confidence intervals, and layer x layer matrices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns

from vtrlab.plots.style import DIVERGING_CMAP, SEQUENTIAL_CMAP

CI_SEED = 0  # bootstrap seed: confidence bands must not change between runs


def layer_curve(
    ax,
    data: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "value",
    hue: str | None = None,
    ci: float = 95,
    n_boot: int = 1000,
    markers: bool = True,
):
    """Mean of `y` per `x` (one line per `hue`) with a bootstrap `ci`% band (fixed seed).

    `data` is tidy: one row per observation (e.g. sample x layer).
    """
    missing = [c for c in (x, y, hue) if c is not None and c not in data.columns]
    if missing:
        raise ValueError(f"columns {missing} not in data; have {list(data.columns)}")
    sns.lineplot(
        data=data,
        x=x,
        y=y,
        hue=hue,
        ax=ax,
        errorbar=("ci", ci),
        n_boot=n_boot,
        seed=CI_SEED,
        marker="o" if markers else None,
        markersize=3,
    )
    if pd.api.types.is_integer_dtype(data[x]):
        ax.set_xticks(sorted(data[x].unique()))
    return ax


def layer_matrix(
    ax,
    matrix: np.ndarray,
    *,
    labels: Sequence | None = None,
    xlabel: str = "layer",
    ylabel: str = "layer",
    cmap: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = False,
    colorbar: bool = True,
    fmt: str = "{:.2f}",
):
    """A square layer x layer matrix (e.g. rank agreement between layers); returns the image.

    Values spanning both signs get a diverging map centred at 0.
    """
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {m.shape}")
    if labels is not None and len(labels) != m.shape[0]:
        raise ValueError(f"{len(labels)} labels for a matrix with {m.shape[0]} rows")
    if cmap is None:
        two_signed = np.nanmin(m) < 0 < np.nanmax(m)
        cmap = DIVERGING_CMAP if two_signed else SEQUENTIAL_CMAP
        if two_signed and vmin is None and vmax is None:
            bound = np.nanmax(np.abs(m))
            vmin, vmax = -bound, bound
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", origin="upper")
    ticks_r, ticks_c = np.arange(m.shape[0]), np.arange(m.shape[1])
    row_labels = list(labels) if labels is not None else list(ticks_r)
    col_labels = list(labels) if labels is not None and m.shape[0] == m.shape[1] else list(ticks_c)
    ax.set_xticks(ticks_c, col_labels)
    ax.set_yticks(ticks_r, row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate:
        for (r, c), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=5)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return im
