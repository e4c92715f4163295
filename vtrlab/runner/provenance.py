"""Provenance: which code, versions and parameters produced a file, and the figures manifest.

`figures/MANIFEST.json` maps every published figure file (path relative to the project root) to
its record. Grid jobs publish in parallel, so the figure copies and the manifest merge happen
under one file lock, and the manifest itself is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from vtrlab.io import atomic_path, atomic_write_json
from vtrlab.runner.paths import inside

MANIFEST = "MANIFEST.json"
FIGURE_SUFFIXES = (".pdf", ".png")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SOURCE_COMMIT_ENV = "VTRLAB_SOURCE_COMMIT"


def git_state(where: Path) -> dict[str, Any]:
    """Commit and dirty flag of the repository holding `where` (its figures/ and runs/ ignored).

    A copy of the tree that runs away from its repository (a GPU machine's or a cluster's staging copy, whose
    ``.git`` may be absent or stale) gets the source's commit from ``$VTRLAB_SOURCE_COMMIT``, set by the launcher;
    the dirty flag is then unknown (None) unless ``$VTRLAB_SOURCE_DIRTY`` is "0" or "1".
    """
    source = os.environ.get(SOURCE_COMMIT_ENV, "").strip()
    if source:
        dirty = os.environ.get("VTRLAB_SOURCE_DIRTY", "").strip()
        return {"git_commit": source, "git_dirty": {"0": False, "1": True}.get(dirty)}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    top = git("rev-parse", "--show-toplevel")
    excludes = (":(exclude)figures", ":(exclude)runs")
    status = git("-C", top.strip(), "status", "--porcelain", "--", ".", *excludes) if top else None
    return {"git_commit": commit.strip(), "git_dirty": bool(status and status.strip())}


def versions() -> dict[str, str | None]:
    """Versions from package metadata (no heavy imports)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "vtrlab"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def manifest_lock(root: Path) -> FileLock:
    lock_dir = root / "runs" / ".locks"  # runs/ is git-ignored, figures/ is committed
    lock_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_dir / "manifest.lock"))


def read_manifest(root: Path) -> dict[str, Any]:
    """figures/MANIFEST.json as a dict; a truncated or corrupt one is set aside with a warning.

    The bad file is renamed to ``MANIFEST.json.corrupt-<UTC time>`` (kept for inspection) and an
    empty manifest is returned, so the next publish rebuilds it instead of failing every run.
    """
    path = root / "figures" / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError("expected an object mapping figure paths to records")
        return data
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = path.with_name(f"{MANIFEST}.corrupt-{stamp}-{os.getpid()}")
        os.replace(path, aside)
        warnings.warn(
            f"{path} is not a valid manifest ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            f"set aside as {aside.name} and rebuilt from the figures published from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return {}


def publish_figures(root: Path, source_dir: Path, dest_dir: Path, record: dict[str, Any]) -> list[Path]:
    """Copy a run's figures into `dest_dir` and record each file in figures/MANIFEST.json.

    `dest_dir` must lie inside `root/figures` (else RunnerError). Earlier figures in `dest_dir`
    that this run did not produce are removed with their manifest entries only when the manifest
    says vtrlab published them (a renamed figure must not linger with stale provenance); a file
    the manifest does not list (a user's own file) is never deleted. Subdirectories of
    `dest_dir` (grid runs) are left alone.
    """
    root = root.resolve()
    figures_root = root / "figures"
    dest_dir = inside(dest_dir, figures_root, "figure directory")
    files = sorted(p for p in source_dir.iterdir() if p.suffix in FIGURE_SUFFIXES) if source_dir.is_dir() else []
    published: list[Path] = []
    with manifest_lock(root):
        manifest = read_manifest(root)
        dest_dir.mkdir(parents=True, exist_ok=True)
        new_names = {p.name for p in files}
        for old in sorted(dest_dir.iterdir()):
            if not (old.is_file() and old.suffix in FIGURE_SUFFIXES and old.name not in new_names):
                continue
            key = old.relative_to(root).as_posix()
            if key in manifest:  # published by an earlier run: ours to replace
                old.unlink()
                manifest.pop(key)
        for src in files:
            dest = dest_dir / src.name
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
            key = dest.relative_to(root).as_posix()
            manifest[key] = {**record, "sha256": sha256(dest)}
            published.append(dest)
        # drop entries whose file is gone (deleted by hand)
        manifest = {k: v for k, v in manifest.items() if (root / k).is_file()}
        atomic_write_json(figures_root / MANIFEST, manifest)
    return published
