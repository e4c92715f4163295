"""Where things go: project root, run directories, figure directories, and the env vars that say so.

The runner tells the kernel where to write through environment variables; a notebook opened by
hand in Jupyter has none of them and falls back to the project's `figures/<notebook>/` and
`runs/<notebook>/interactive/`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vtrlab.runner.errors import RunnerError

ENV_ROOT = "VTRLAB_ROOT"  # project root (runs/ and figures/ live here)
ENV_RUN_DIR = "VTRLAB_RUN_DIR"  # this run's directory: metrics.json, tables/
ENV_FIGURE_DIR = "VTRLAB_FIGURE_DIR"  # where save_figure writes
ENV_NOTEBOOK = "VTRLAB_NOTEBOOK"  # notebook name (stem) of the running notebook


def project_root() -> Path:
    """$VTRLAB_ROOT, else the nearest ancestor of the cwd holding `notebooks/` and a project file."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).resolve()
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "notebooks").is_dir() and (
            (candidate / "pyproject.toml").is_file() or (candidate / ".git").exists()
        ):
            return candidate
    return cwd


def current_notebook() -> str:
    """Name (stem) of the running notebook: set by the runner, or by JupyterLab for hand runs."""
    if os.environ.get(ENV_NOTEBOOK):
        return os.environ[ENV_NOTEBOOK]
    session = os.environ.get("JPY_SESSION_NAME")  # JupyterLab >= 3 sets the notebook path here
    if session:
        return Path(session).stem
    return "interactive"


def figure_dir() -> Path:
    """The directory `save_figure` writes to for the current notebook."""
    if os.environ.get(ENV_FIGURE_DIR):
        return Path(os.environ[ENV_FIGURE_DIR])
    return project_root() / "figures" / current_notebook()


def run_dir() -> Path:
    """The directory `save_table` / `log_metrics` write to for the current notebook."""
    if os.environ.get(ENV_RUN_DIR):
        return Path(os.environ[ENV_RUN_DIR])
    return project_root() / "runs" / current_notebook() / "interactive"


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(stem: str, what: str = "notebook") -> str:
    """A notebook stem made safe as one directory name under runs/ and figures/.

    Characters other than letters, digits, '_', '-', '.' become '_' and leading dots are dropped
    (no hidden, `.` or `..` names); a stem with nothing left is refused.
    """
    if not isinstance(stem, str):
        raise RunnerError(f"{what} name must be a string, got {type(stem).__name__}")
    name = _UNSAFE.sub("_", stem).lstrip(".")
    if not name or not name.strip("._-"):
        raise RunnerError(
            f"{what} name {stem!r} gives no usable directory name (letters, digits, '_', '-', '.' needed); "
            "rename the file"
        )
    return name[:120]


def inside(path: Path, folder: Path, what: str) -> Path:
    """``path`` resolved, or a RunnerError when it resolves outside ``folder`` (`..`, symlinks)."""
    resolved, folder = Path(path).resolve(), Path(folder).resolve()
    if resolved == folder or not resolved.is_relative_to(folder):
        raise RunnerError(f"{what} {str(path)!r} resolves to {str(resolved)!r}, not inside {str(folder)!r}; refused")
    return resolved
