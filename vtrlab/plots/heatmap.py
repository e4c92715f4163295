"""Per-token values drawn on the patch grid over the picture."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize

from vtrlab.plots.style import SEQUENTIAL_CMAP


def heatmap_over_image(
    ax,
    image: Any,
    values: Any,
    *,
    layout: Any = None,
    image_index: int = 0,
    tile: int = 0,
    cmap: str = SEQUENTIAL_CMAP,
    alpha: float = 0.55,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    grid_lines: bool = False,
    outline: bool = False,
):
    """Draw `values` over `image` on the axes; returns the color mappable.

    Two ways to give the values:
      * a (rows, cols) array: cell (r, c) covers the r-th / c-th equal slice of the picture;
      * `layout=` an `ImageLayout` and `values` aligned with `layout.image_positions` (one value
        per image token, as analyses produce them): each token is drawn on its own pixel box
        from the layout, so crops/tiles and non-square grids land where the model saw them.
    NaN values are left transparent. `outline=True` draws coloured cell borders instead of fills,
    so the picture's own colours stay readable.
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be a PIL image or an (H, W[, C]) array, got shape {img.shape}")
    height, width = img.shape[:2]
    ax.imshow(img, extent=(0, width, height, 0), cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    vals = np.asarray(values, dtype=float)

    if layout is None:
        if vals.ndim != 2:
            raise ValueError(
                f"values must be a (rows, cols) grid when no layout is given, got shape {vals.shape}; "
                "pass layout= to draw per-token values"
            )
        rows, cols = vals.shape
        ys, xs = np.linspace(0, height, rows + 1), np.linspace(0, width, cols + 1)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        boxes = np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=-1).reshape(-1, 4)
        cell_values = vals.reshape(-1)
    else:
        image_tokens = layout.kind == "image"
        if vals.shape != (int(image_tokens.sum()),):
            raise ValueError(
                f"values has shape {vals.shape}; this layout has {int(image_tokens.sum())} image tokens "
                "(one value per token of layout.image_positions)"
            )
        sel = (layout.image[image_tokens] == image_index) & (layout.tile[image_tokens] == tile)
        if not sel.any():
            raise ValueError(
                f"layout has no image tokens for image={image_index}, tile={tile}; have {sorted(layout.grid_shapes)}"
            )
        boxes = np.stack([getattr(layout, k)[image_tokens][sel] for k in ("x0", "y0", "x1", "y1")], axis=-1).astype(
            float
        )
        cell_values = vals[sel]

    finite = np.isfinite(cell_values)
    norm = Normalize(
        vmin=np.nanmin(cell_values) if vmin is None and finite.any() else vmin,
        vmax=np.nanmax(cell_values) if vmax is None and finite.any() else vmax,
    )
    x0, y0, x1, y1 = boxes[finite].T
    polys = np.stack(
        [np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x1, y1], -1), np.stack([x0, y1], -1)], 1
    )
    if outline:  # colours map to the edges when faces are "none"
        style = {"facecolors": "none", "linewidths": 0.8, "alpha": 1.0}
    else:
        style = {
            "edgecolors": "white" if grid_lines else "face",
            "linewidths": 0.3 if grid_lines else 0.0,
            "alpha": alpha,
        }
    coll = PolyCollection(polys, array=cell_values[finite], cmap=cmap, norm=norm, **style)
    ax.add_collection(coll)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")
    for spine in ax.spines.values():
        spine.set_visible(False)
    if colorbar:
        ax.figure.colorbar(coll, ax=ax, fraction=0.046, pad=0.02)
    return coll
