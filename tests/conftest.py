"""Shared test fixtures: build tiny notebooks on disk (runner, CLI, grid tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from notebook_files import write_notebook


@pytest.fixture
def make_notebook(tmp_path):
    """make_notebook(name, parameters_source, *code_cells) -> tmp_path/notebooks/<name>.ipynb"""

    def make(name: str, parameters: str, *cells: str, smoke: dict | None = None) -> Path:
        return write_notebook(tmp_path / "notebooks" / f"{name}.ipynb", parameters, *cells, smoke=smoke)

    return make
