"""Notebook-side helpers: tables and metrics written into the current run directory.

Figures are saved by `vtrlab.runner.save_figure` (runner/figures.py), into `paths.figure_dir()`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vtrlab.io import atomic_path, atomic_write_json, finite_or_str, to_jsonable
from vtrlab.runner.paths import run_dir

__all__ = ["check_name", "save_table", "log_metrics", "atomic_write_json"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(name: str, what: str) -> str:
    """File stems must be plain names: no directories, no extension games."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith((".pdf", ".png", ".csv", ".parquet")):
        raise ValueError(
            f"{what} name must be a plain file stem of letters, digits, '_', '-', '.' "
            f"(no directory, no extension), got {name!r}"
        )
    return name


def save_table(df, name: str) -> list[Path]:
    """Write a pandas DataFrame as `tables/<name>.parquet` and `tables/<name>.csv` in the run dir."""
    import pandas as pd

    check_name(name, "table")
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"save_table expects a pandas DataFrame, got {type(df).__name__}")
    out = run_dir() / "tables"
    out.mkdir(parents=True, exist_ok=True)
    keep_index = not isinstance(df.index, pd.RangeIndex)
    paths = [out / f"{name}.parquet", out / f"{name}.csv"]
    for path in paths:
        with atomic_path(path) as tmp:
            if path.suffix == ".parquet":
                df.to_parquet(tmp, index=keep_index)
            else:
                df.to_csv(tmp, index=keep_index)
    return paths


def log_metrics(metrics: Mapping[str, Any]) -> Path:
    """Merge `metrics` into the run's metrics.json (later calls overwrite earlier keys)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"log_metrics expects a dict, got {type(metrics).__name__}")
    path = run_dir() / "metrics.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, got {key!r}")
        value = to_jsonable(value) if hasattr(value, "tolist") else value
        current[key] = finite_or_str(value)  # JSON has no NaN/inf; keep them readable
    atomic_write_json(path, current)
    return path
