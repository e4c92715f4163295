"""Ground truth per image token from pixels: the fraction of each token's pixel box that is relevant.

Every ``ImageLayout`` carries, for each image token, its box in the *original* picture's pixels
(``x0, y0, x1, y1``; tiles, crops, merged and pooled grids alike). A pixel mask (or boxes,
rasterised) defines relevance as a function over the picture, constant on each pixel square
``[x, x+1) × [y, y+1)``; a token's coverage is that function's mean over its box. So the same
boxes or masks give ground truth for every model family, through the model's own layout.

The integral over a box with fractional corners is exact: the cumulative integral of a function
that is constant on pixel squares is the bilinear interpolation of its summed-area table.

(Values on the layout's own patch grid, e.g. the organism's ``relevance``, are another job:
that mapping refuses a grid that does not match; this one works from pixels for any model.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KIND_IMAGE = "image"  # the layout's kind for tokens that cover a picture patch (vtrlab.models.base)


def rasterize_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Boxes (n, 4) pixel [x0, y0, x1, y1] → float mask (H, W): each pixel's covered fraction.

    Pixel (x, y) is the square [x, x+1) × [y, y+1); a box covers the part of it inside the box.
    Overlapping boxes take the larger fraction per pixel (exact for pixel-aligned boxes; at a
    pixel cut by the edges of two boxes the union is approximated by the larger part).
    """
    w, h = image_size
    mask = np.zeros((h, w), dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    for x0, y0, x1, y1 in boxes:
        fx = np.clip(np.minimum(xs + 1, x1) - np.maximum(xs, x0), 0, 1)
        fy = np.clip(np.minimum(ys + 1, y1) - np.maximum(ys, y0), 0, 1)
        np.maximum(mask, np.outer(fy, fx), out=mask)
    return mask


def _cumulative(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∫₀ˣ∫₀ʸ mask at real (x, y) inside the picture: bilinear interpolation of the summed-area table."""
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    x = np.clip(np.asarray(x, np.float64), 0, w)
    y = np.clip(np.asarray(y, np.float64), 0, h)
    i0 = np.minimum(np.floor(y).astype(int), h - 1)
    j0 = np.minimum(np.floor(x).astype(int), w - 1)
    a, b = x - j0, y - i0
    return (
        sat[i0, j0] * (1 - a) * (1 - b)
        + sat[i0, j0 + 1] * a * (1 - b)
        + sat[i0 + 1, j0] * (1 - a) * b
        + sat[i0 + 1, j0 + 1] * a * b
    )


def box_coverage(mask: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    """Mean of ``mask`` (H, W; pixel squares) over each box [x0, x1) × [y0, y1) (pixel coordinates).

    Boxes are clipped to the picture; NaN for NaN boxes and boxes with no area inside it.
    """
    mask = np.asarray(mask, dtype=np.float64)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width); got shape {mask.shape}")
    h, w = mask.shape
    x0, y0, x1, y1 = (np.asarray(v, dtype=np.float64) for v in (x0, y0, x1, y1))
    ok = np.isfinite(x0) & np.isfinite(y0) & np.isfinite(x1) & np.isfinite(y1)
    cx0, cx1 = np.clip(np.where(ok, x0, 0), 0, w), np.clip(np.where(ok, x1, 0), 0, w)
    cy0, cy1 = np.clip(np.where(ok, y0, 0), 0, h), np.clip(np.where(ok, y1, 0), 0, h)
    area = (cx1 - cx0) * (cy1 - cy0)
    ok &= area > 0
    integral = (
        _cumulative(mask, cx1, cy1)
        - _cumulative(mask, cx0, cy1)
        - _cumulative(mask, cx1, cy0)
        + _cumulative(mask, cx0, cy0)
    )
    out = np.full(x0.shape, np.nan)
    out[ok] = np.clip(integral[ok] / area[ok], 0.0, 1.0)
    return out


def pixel_mask_for(sample, image_size: tuple[int, int]) -> np.ndarray | None:
    """A sample's ground truth as a float pixel mask (H, W): its mask, its boxes, or their union.

    ``sample`` is a ``Record`` (boxes and/or mask) or any object with a ``pixel_mask`` array, such as
    a synthetic organism ``Sample``; None when it has neither.
    """
    mask = getattr(sample, "pixel_mask", None)
    mask = None if mask is None else np.asarray(mask, dtype=np.float64)
    boxes = sample.pixel_boxes(image_size) if hasattr(sample, "pixel_boxes") else None
    name = getattr(sample, "id", None) or getattr(sample, "question", "sample")
    if mask is not None and mask.shape != (image_size[1], image_size[0]):
        raise ValueError(
            f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} but the picture is "
            f"{image_size[0]}x{image_size[1]} (width x height)"
        )
    if boxes is not None:
        from_boxes = rasterize_boxes(boxes, image_size)
        mask = from_boxes if mask is None else np.maximum(mask, from_boxes)
    return mask


def token_coverage(layout, mask: np.ndarray, image: int = 0) -> np.ndarray:
    """Fraction of each image token's pixel box covered by ``mask`` (the picture ``image`` of the sample).

    Aligned with ``layout.image_positions`` (tokens of kind ``image``; newline and separator tokens
    are not in it). NaN for tokens of other pictures of the sample and for tokens whose box lies
    wholly in padding. The mask must have the picture's size (``layout.image_sizes[image]``).
    """
    kind = np.asarray(layout.kind)
    sel = kind == KIND_IMAGE
    sizes = list(getattr(layout, "image_sizes", []) or [])
    if sizes and image >= len(sizes):
        raise ValueError(f"image={image}: this layout holds {len(sizes)} picture(s)")
    mask = np.asarray(mask, dtype=np.float64)
    if sizes and mask.shape != (sizes[image][1], sizes[image][0]):
        raise ValueError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} (width x height) but picture {image} of this "
            f"layout is {sizes[image][0]}x{sizes[image][1]}"
        )
    cov = box_coverage(mask, *(np.asarray(getattr(layout, c))[sel] for c in ("x0", "y0", "x1", "y1")))
    cov[np.asarray(layout.image)[sel] != image] = np.nan
    return cov


def token_relevance(layout, sample, image: int = 0) -> np.ndarray | None:
    """Ground truth of ``sample`` per image token of ``layout``: covered fraction in [0, 1].

    ``sample``: a ``Record`` (boxes and/or mask) or a synthetic ``Sample`` (its ``pixel_mask``).
    None when it has no ground truth. Aligned with ``layout.image_positions``.
    """
    sizes = list(getattr(layout, "image_sizes", []) or [])
    size = tuple(sizes[image]) if sizes else sample.image.size
    mask = pixel_mask_for(sample, size)
    return None if mask is None else token_coverage(layout, mask, image=image)


def relevant_tokens(layout, sample, threshold: float = 0.0, image: int = 0) -> np.ndarray | None:
    """Bool per image token of ``layout``: covered fraction of its pixel box > ``threshold`` (default: the
    box touches the ground truth). None when ``sample`` has no ground truth. Aligned with
    ``layout.image_positions``; for the organism this equals ``layout.tokens_from_grid(sample.relevance)``."""
    cov = token_relevance(layout, sample, image=image)
    return None if cov is None else np.nan_to_num(cov, nan=0.0) > threshold


def relevance_grid(layout, coverage: np.ndarray, threshold: float = 0.0, tile: int = 0, image: int = 0) -> np.ndarray:
    """Boolean (rows, cols) mask on the layout's grid of (image, tile): coverage > ``threshold``.

    The form ``vtrlab.analysis.attention.ground_truth_agreement`` reads; for the organism with its
    pixel mask this equals the sample's own ``relevance`` grid.
    """
    grid = layout.to_grid(np.nan_to_num(np.asarray(coverage, dtype=np.float64), nan=0.0), image=image, tile=tile)
    return np.nan_to_num(grid, nan=0.0) > threshold


def batch_relevance(
    layouts: Sequence, records: Sequence, threshold: float = 0.0, tile: int = 0
) -> list[np.ndarray | None]:
    """``relevance_grid`` for each (layout, record) pair; None for records without ground truth."""
    if len(layouts) != len(records):
        raise ValueError(f"{len(layouts)} layouts for {len(records)} records")
    out = []
    for layout, record in zip(layouts, records):
        cov = token_relevance(layout, record)
        out.append(None if cov is None else relevance_grid(layout, cov, threshold, tile))
    return out
