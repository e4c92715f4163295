"""vtrlab.plots: the one figure style, saving, heatmaps over images, layer curves and matrices.

Importing this module installs the style (seaborn paper context, colorblind palette, Type 42
fonts). Figure widths: `SINGLE_COLUMN` (3.25 in) and `DOUBLE_COLUMN` (6.75 in).
"""

from vtrlab.plots.curves import layer_curve, layer_matrix
from vtrlab.plots.heatmap import heatmap_over_image
from vtrlab.plots.save import save_figure
from vtrlab.plots.style import DOUBLE_COLUMN, DPI, SINGLE_COLUMN, apply, figure

apply()

__all__ = [
    "save_figure", "heatmap_over_image", "layer_curve", "layer_matrix", "figure", "apply",
    "SINGLE_COLUMN", "DOUBLE_COLUMN", "DPI",
]
