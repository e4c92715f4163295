"""Atomic writes: the one place vtrlab writes a file or publishes a directory.

A reader (another process, a later run, `git status`) sees the old content or the new one, never
half a file: everything is written to a temp file/dir beside the target and renamed into place.
Files get the mode an ordinary ``open()`` would give them (0666 minus the umask, usually 0644),
not the 0600 of ``tempfile.mkstemp``. Temp names start with ``.`` and contain ``.tmp`` so a crash
leaves only hidden, recognisable leftovers.

* ``atomic_write_bytes / atomic_write_text / atomic_write_json(path, ...)`` — small files;
* ``atomic_path(path)`` — a context manager yielding a temp path for writers that want a file
  name (``fig.savefig``, ``df.to_parquet``, ``ds.to_netcdf``); renamed on success, removed on error;
* ``atomic_dir(path)`` — a context manager yielding a temp directory that replaces ``path``
  (whole) on success; ``keep=`` names files of an existing ``path`` to carry over.

This module imports nothing from vtrlab: every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_path",
    "atomic_dir",
    "replace_dir",
    "default_file_mode",
    "to_jsonable",
    "finite_or_str",
]


def default_file_mode() -> int:
    """0666 minus the process umask: what ``open(path, "w")`` would create."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _default_dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temp file path beside ``path``; on success it is renamed onto ``path``.

    ``suffix`` is appended to the temp name (some writers pick the format from the extension,
    e.g. ``suffix=".png"``). On an exception the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename); returns ``path``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes expects bytes, got {type(data).__name__}")
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(value: Any) -> Any:
    """``json.dumps`` default: numpy/torch scalars and arrays -> lists/numbers, paths -> str."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = True,
    default: Callable[[Any], Any] | None = to_jsonable,
) -> Path:
    """Write ``obj`` as JSON (trailing newline) atomically. NaN/inf are refused (not valid JSON)."""
    try:
        text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)
    except ValueError as exc:  # NaN / inf
        raise ValueError(f"{Path(path).name}: {exc} (JSON has no NaN/inf; store them as strings)") from None
    return atomic_write_text(path, text + "\n")


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Move directory ``src`` onto ``dest``; an existing ``dest`` is renamed aside first, then deleted.

    Between the two renames ``dest`` is briefly absent, never half-written.
    """
    src, dest = Path(src), Path(dest)
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}.tmp")
        os.rename(dest, old)
    try:
        os.rename(src, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.rename(old, dest)  # put the previous one back
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    return dest


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep: Iterable[str] | Callable[[Path], bool] = ()) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` whole.

    ``keep``: names (or a predicate on paths) of top-level files of an existing ``path`` to copy
    into the new directory when the caller did not write them (e.g. a README next to weights).
    On an exception the temp directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, _default_dir_mode())
        yield tmp
        if path.is_dir():
            wanted = keep if callable(keep) else (lambda p, names=set(keep): p.name in names)
            for extra in path.iterdir():
                if extra.is_file() and wanted(extra) and not (tmp / extra.name).exists():
                    shutil.copy2(extra, tmp / extra.name)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finite_or_str(value: Any) -> Any:
    """NaN/inf floats as strings (JSON has none), also inside lists and dicts; the rest unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [finite_or_str(v) for v in value]
    if isinstance(value, dict):
        return {k: finite_or_str(v) for k, v in value.items()}
    return value


def replace_marked_section(path: str | os.PathLike, name: str, text: str) -> Path:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in a text file
    (README sections generated from records), atomically. Both markers must be there, once each."""
    path = Path(path)
    doc = path.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        raise ValueError(
            f"{path}: expected one {begin!r} before one {end!r}; add the two markers where the section goes"
        )
    head, rest = doc.split(begin)
    _, tail = rest.split(end)
    return atomic_write_text(path, f"{head}{begin}\n{text.strip()}\n{end}{tail}")
