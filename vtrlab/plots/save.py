"""Render a figure to PDF or PNG with byte-stable metadata (the same figure gives the same bytes).

Where a figure goes (the run's figure directory, atomic writes) is the runner's job:
``vtrlab.runner.save_figure`` writes each format through :func:`write_figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from vtrlab.plots.style import DPI

# No creation dates, no library versions: the same figure must give the same bytes.
PDF_METADATA = {"Creator": "vtrlab", "Producer": "vtrlab", "CreationDate": None, "ModDate": None}
PNG_METADATA = {"Software": None}
FORMATS = ("pdf", "png")


def write_figure(fig, target: str | Path | IO[bytes], fmt: str) -> None:
    """Write ``fig`` in format ``fmt`` (``"pdf"`` or ``"png"``) to a path or binary file object,
    at the house DPI and with deterministic metadata."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}; accepted: {FORMATS}")
    fig.savefig(target, format=fmt, dpi=DPI, metadata=PDF_METADATA if fmt == "pdf" else PNG_METADATA)
