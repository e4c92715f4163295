"""Pixel geometry of image processors: where a processed pixel came from in the original image.

Processors chain pads, resizes and crops; each is an affine map per axis, so the chain is
``u = sx * x + ox`` (and ``v = sy * y + oy``) from original (x, y) to processed (u, v). Patch
boxes in processed coordinates are mapped back through the inverse and clipped to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def size_value(size, key: str):
    """Read ``key`` from a processor size spec (``SizeDict`` in recent transformers, dict before)."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


@dataclass(frozen=True)
class AxisMap:
    """Original (x, y) -> processed (u, v): ``u = sx * x + ox``, ``v = sy * y + oy``."""

    sx: float = 1.0
    ox: float = 0.0
    sy: float = 1.0
    oy: float = 0.0

    def scale(self, fx: float, fy: float) -> AxisMap:
        return AxisMap(self.sx * fx, self.ox * fx, self.sy * fy, self.oy * fy)

    def shift(self, dx: float, dy: float) -> AxisMap:
        return AxisMap(self.sx, self.ox + dx, self.sy, self.oy + dy)

    def resize(self, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> AxisMap:
        # Resizing maps pixel edges linearly: edge 0 -> 0, edge W -> W'.
        return self.scale(new_hw[1] / old_hw[1], new_hw[0] / old_hw[0])

    def to_original(self, u, v):
        return (np.asarray(u, float) - self.ox) / self.sx, (np.asarray(v, float) - self.oy) / self.sy


def boxes_in_original(
    amap: AxisMap,
    rows: np.ndarray,
    cols: np.ndarray,
    cell_h: float,
    cell_w: float,
    image_wh: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel boxes (x0, y0, x1, y1) in the original image of processed grid cells (row, col) of size
    cell_h x cell_w; clipped to the image; NaN for cells that lie entirely in padding."""
    rows = np.asarray(rows, float)
    cols = np.asarray(cols, float)
    x0, y0 = amap.to_original(cols * cell_w, rows * cell_h)
    x1, y1 = amap.to_original((cols + 1) * cell_w, (rows + 1) * cell_h)
    w, h = image_wh
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    empty = (x1 <= x0) | (y1 <= y0)
    for a in (x0, y0, x1, y1):
        a[empty] = np.nan
    return x0, y0, x1, y1


def shortest_edge_size(hw: tuple[int, int], shortest: int) -> tuple[int, int]:
    """Output (h, w) of a shortest-edge resize, as transformers computes it (long side truncated)."""
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop_offset(hw: tuple[int, int], crop_hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
    """(dx, dy, new_hw) of transformers' center crop: pad symmetrically if the crop is larger, then crop."""
    h, w = hw
    ch, cw = crop_hw
    dx = dy = 0
    if cw > w or ch > h:
        dx += (cw - w) // 2 if cw > w else 0
        dy += (ch - h) // 2 if ch > h else 0
        h, w = max(h, ch), max(w, cw)
    top = int((h - ch) / 2.0)
    left = int((w - cw) / 2.0)
    return dx - left, dy - top, (ch, cw)
