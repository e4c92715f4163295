"""The one figure style of vtrlab: paper context, colorblind palette, Type 42 fonts, fixed sizes.

Deterministic output is part of the style: fixed dpi, a fixed font, no timestamps or software
versions in file metadata (see `save.py`), a fixed SVG hash salt.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import seaborn as sns

SINGLE_COLUMN = 3.25  # inches: one column of a two-column paper
DOUBLE_COLUMN = 6.75  # inches: full text width
DPI = 300  # PNG resolution
PALETTE = "colorblind"
SEQUENTIAL_CMAP = "viridis"  # perceptually uniform, colorblind-safe
DIVERGING_CMAP = "vlag"

RC = {
    "pdf.fonttype": 42,  # TrueType (Type 42), editable text; no Type 3 fonts
    "ps.fonttype": 42,
    "svg.hashsalt": "vtrlab",  # stable SVG ids
    "savefig.dpi": DPI,
    "figure.dpi": 100,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],  # ships with matplotlib: same glyphs on every machine
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": SEQUENTIAL_CMAP,
    "savefig.bbox": None,  # keep the requested width exactly
    "figure.constrained_layout.use": True,
}


def apply() -> None:
    """Install the vtrlab style globally (done on `import vtrlab.plots`)."""
    sns.set_theme(context="paper", style="ticks", palette=PALETTE)
    mpl.rcParams.update(RC)


def figure(width: str | float = "single", height: float | None = None, nrows: int = 1, ncols: int = 1, **kwargs):
    """`plt.subplots` at a paper width: "single" (3.25 in), "double" (6.75 in) or inches.

    Height defaults to 0.62 x width per row for a single column and 0.38 x width for wider figures.
    """
    widths = {"single": SINGLE_COLUMN, "double": DOUBLE_COLUMN}
    if isinstance(width, str):
        if width not in widths:
            raise ValueError(f"width must be 'single', 'double' or a number of inches, got {width!r}")
        w = widths[width]
    else:
        w = float(width)
    if height is None:
        height = (0.62 if w <= SINGLE_COLUMN else 0.38) * w * nrows
    return plt.subplots(nrows, ncols, figsize=(w, height), **kwargs)
