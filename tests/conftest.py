"""Shared test fixtures: build tiny notebooks on disk (runner, CLI, grid tests).

Under pytest-xdist (`make test` runs `-n 2`) every worker, and every process it starts (notebook kernels,
the lmms-eval CLI, grid jobs), computes on one thread: two workers with a thread pool each would oversubscribe
the cores, and on a busy machine OpenMP's barriers then spin instead of computing. Results do not depend on it.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # before torch builds its thread pool; inherited by subprocesses
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from notebook_files import write_notebook  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def make_notebook(tmp_path):
    """make_notebook(name, parameters_source, *code_cells) -> tmp_path/notebooks/<name>.ipynb"""

    def make(name: str, parameters: str, *cells: str, smoke: dict | None = None) -> Path:
        return write_notebook(tmp_path / "notebooks" / f"{name}.ipynb", parameters, *cells, smoke=smoke)

    return make
