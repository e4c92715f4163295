"""Save / load captures as netCDF-4 files that open with xarray alone (atomic writes)."""

from __future__ import annotations

import os
from pathlib import Path

import xarray as xr

from vtrlab.io import atomic_path

ENGINES = ("netcdf4", "h5netcdf", "scipy")
_NEEDS = {"netcdf4": ("netCDF4",), "h5netcdf": ("h5netcdf", "h5py"), "scipy": ("scipy",)}


def _available(engine: str) -> bool:
    try:
        for module in _NEEDS[engine]:
            __import__(module)
    except ImportError:
        return False
    return True


def _engine(engine: str | None) -> str:
    if engine is not None:
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: use one of {ENGINES}")
        return engine
    # netCDF-4 keeps int64 and strings as they are; scipy (netCDF-3, always installed with
    # vtrlab) stores int64 as int32 and strings as char arrays, which xarray decodes back
    return next(e for e in ENGINES if _available(e))


def save(ds: xr.Dataset, path: str | os.PathLike, engine: str | None = None) -> Path:
    """Write ``ds`` to ``path`` (netCDF): a temp file beside it, then an atomic rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # netCDF has no float16: such variables are written as float32 (exact) and marked, so that
        # load() gives float16 back while plain xarray still reads plain floats
        out = ds.copy()
        encoding = {}
        for name, var in out.data_vars.items():
            if var.dtype == "float16":
                out[name].attrs["vtrlab_dtype"] = "float16"
                encoding[name] = {"dtype": "float32"}
        out.to_netcdf(tmp, engine=_engine(engine), encoding=encoding)
    return path


def load(path: str | os.PathLike) -> xr.Dataset:
    """Read a capture written by :func:`save` fully into memory (the file is closed again)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no capture file at {path}")
    with xr.open_dataset(path) as ds:
        ds = ds.load()
    for name, var in ds.data_vars.items():
        if var.attrs.pop("vtrlab_dtype", None) == "float16":
            ds[name] = var.astype("float16")
    return ds
