"""Save a figure as PDF and PNG into the current run's figure directory (byte-stable, atomic)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from vtrlab.io import atomic_path
from vtrlab.plots.save import FORMATS, write_figure
from vtrlab.runner.outputs import check_name
from vtrlab.runner.paths import figure_dir


def save_figure(fig, name: str, *, close: bool = False, directory: str | Path | None = None) -> list[Path]:
    """Write `fig` as `<name>.pdf` and `<name>.png`.

    The directory is $VTRLAB_FIGURE_DIR when run by the vtrlab runner, else
    `figures/<notebook>/` of the project (`directory` overrides both). Returns the two paths.
    """
    check_name(name, "figure")
    out = Path(directory) if directory is not None else figure_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out / f"{name}.{fmt}"
        with atomic_path(path, suffix=f".{fmt}") as tmp:
            write_figure(fig, tmp, fmt)
        paths.append(path)
    if close:
        plt.close(fig)
    return paths
