"""Provenance: which code, versions and parameters produced a file, and the figures manifest.

`figures/MANIFEST.json` maps every published figure file (path relative to the project root) to
its record. Grid jobs publish in parallel, so the figure copies and the manifest merge happen
under one file lock, and the manifest itself is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from vtrlab.runner.outputs import atomic_write_json

MANIFEST = "MANIFEST.json"
FIGURE_SUFFIXES = (".pdf", ".png")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_state(where: Path) -> dict[str, Any]:
    """Commit and dirty flag of the repository holding `where` (its figures/ and runs/ ignored)."""
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
    status = git("-C", top.strip(), "status", "--porcelain", "--", ".", ":(exclude)figures", ":(exclude)runs") if top else None
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
    path = root / "figures" / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def publish_figures(root: Path, source_dir: Path, dest_dir: Path, record: dict[str, Any]) -> list[Path]:
    """Copy a run's figures into `dest_dir` and record each file in figures/MANIFEST.json.

    Earlier figures in `dest_dir` that this run did not produce are removed with their manifest
    entries (a renamed figure must not linger with stale provenance). Subdirectories of
    `dest_dir` (grid runs) are left alone.
    """
    root = root.resolve()
    files = sorted(p for p in source_dir.iterdir() if p.suffix in FIGURE_SUFFIXES) if source_dir.is_dir() else []
    published: list[Path] = []
    with manifest_lock(root):
        manifest = read_manifest(root)
        dest_dir.mkdir(parents=True, exist_ok=True)
        new_names = {p.name for p in files}
        for old in sorted(dest_dir.iterdir()):
            if old.is_file() and old.suffix in FIGURE_SUFFIXES and old.name not in new_names:
                old.unlink()
                manifest.pop(old.resolve().relative_to(root).as_posix(), None)
        for src in files:
            dest = dest_dir / src.name
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
            key = dest.resolve().relative_to(root).as_posix()
            manifest[key] = {**record, "sha256": sha256(dest)}
            published.append(dest)
        # drop entries whose file is gone (deleted by hand)
        manifest = {k: v for k, v in manifest.items() if (root / k).is_file()}
        atomic_write_json(root / "figures" / MANIFEST, manifest)
    return published
