"""Notebook-side helpers: tables and metrics written into the current run directory.

Figures are saved by `vtrlab.runner.save_figure` (runner/figures.py), into `paths.figure_dir()`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from vtrlab.runner.paths import run_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(name: str, what: str) -> str:
    """File stems must be plain names: no directories, no extension games."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith((".pdf", ".png", ".csv", ".parquet")):
        raise ValueError(
            f"{what} name must be a plain file stem of letters, digits, '_', '-', '.' "
            f"(no directory, no extension), got {name!r}"
        )
    return name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    # numpy / torch scalars and arrays, paths
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            if path.suffix == ".parquet":
                df.to_parquet(tmp, index=keep_index)
            else:
                df.to_csv(tmp, index=keep_index)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
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
        value = _jsonable(value) if hasattr(value, "tolist") else value
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN/inf; keep them readable
        current[key] = value
    atomic_write_json(path, current)
    return path
