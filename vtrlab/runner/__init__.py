"""vtrlab.runner: run notebooks with checked parameters, record provenance, run grids.

Notebook side: ``save_table(df, name)``, ``save_figure(fig, name)`` and ``log_metrics(dict)`` write
into the current run. Runner side: ``prepare_job`` / ``run_job`` for one
notebook, ``vtrlab.runner.grid`` for many. Heavy pieces (papermill) load on first use.
"""

from __future__ import annotations

import importlib

from vtrlab.runner.errors import GridError, ParameterError, RunnerError
from vtrlab.runner.figures import save_figure
from vtrlab.runner.outputs import log_metrics, save_table

_LAZY = {
    "read_parameters": "vtrlab.runner.params",
    "ParameterSpec": "vtrlab.runner.params",
    "Job": "vtrlab.runner.run",
    "RunResult": "vtrlab.runner.run",
    "prepare_job": "vtrlab.runner.run",
    "run_job": "vtrlab.runner.run",
    "load_grid": "vtrlab.runner.grid",
    "run_grid": "vtrlab.runner.grid",
}

__all__ = ["save_table", "save_figure", "log_metrics", "ParameterError", "GridError", "RunnerError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vtrlab.runner' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
