"""Tiny notebooks on disk for the runner, CLI and grid tests (imported by tests/conftest.py and the runner tests)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def write_notebook(path: Path, parameters: str, *cells: str, smoke: dict | None = None) -> Path:
    """A notebook: a markdown title, the `parameters` cell, then `cells` (code)."""
    nb = new_notebook()
    nb.cells = [new_markdown_cell(f"# {path.stem}"), new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if smoke is not None:
        nb.metadata["vtrlab"] = {"smoke": smoke}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path
