"""vtrlab.plots: the one figure style, byte-stable rendering, heatmaps over images, layer curves and
matrices, the figures of notebook 03 (`vtrlab.plots.reconstruction`) and of notebook 04
(`vtrlab.plots.reduction`). Plots draw what they are given; saving into a run is `vtrlab.runner.save_figure`.

Importing this module installs the style (seaborn paper context, colorblind palette, Type 42
fonts). Figure widths: `SINGLE_COLUMN` (3.25 in) and `DOUBLE_COLUMN` (6.75 in).
"""

from vtrlab.plots.curves import layer_curve, layer_matrix
from vtrlab.plots.heatmap import heatmap_over_image
from vtrlab.plots.reconstruction import (
    accuracy_vs_keep_ratio,
    kept_token_maps,
    layer_error_curves,
    relevance_recall,
    token_error_maps,
    training_curves,
)
from vtrlab.plots.reduction import agreement_figure, metrics_vs_budget, position_bias_maps, recall_vs_budget
from vtrlab.plots.save import write_figure
from vtrlab.plots.style import DOUBLE_COLUMN, DPI, SINGLE_COLUMN, apply, figure

apply()

__all__ = [
    "write_figure",
    "heatmap_over_image",
    "layer_curve",
    "layer_matrix",
    "figure",
    "apply",
    "SINGLE_COLUMN",
    "DOUBLE_COLUMN",
    "DPI",
    "training_curves",
    "kept_token_maps",
    "accuracy_vs_keep_ratio",
    "token_error_maps",
    "layer_error_curves",
    "relevance_recall",
    "metrics_vs_budget",
    "recall_vs_budget",
    "agreement_figure",
    "position_bias_maps",
]
