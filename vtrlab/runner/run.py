"""Execute one notebook with papermill into `runs/<notebook>/<hash of parameters>/`.

A run is written into a hidden temp directory and renamed into place when it finishes, so a run
directory is complete or absent. A failed run is kept as `runs/<notebook>/<hash>.failed/` with
its executed notebook (and `run.json` saying status "failed"); a later success removes it.
Figures of a successful run are published into `figures/<notebook>/` (or a per-run subfolder for
grids) and recorded in `figures/MANIFEST.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from vtrlab.runner import paths
from vtrlab.runner.outputs import atomic_write_json
from vtrlab.runner.params import ParameterSpec, read_parameters
from vtrlab.runner.provenance import git_state, publish_figures, versions

FigureDest = Literal["notebook", "run"]  # figures/<nb>/  or  figures/<nb>/<hash>/
RUN_RECORD = "run.json"


def params_hash(parameters: Mapping[str, Any]) -> str:
    """Short stable hash of the full (defaults included) parameter dict."""
    text = json.dumps(parameters, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class Job:
    """One notebook with fully resolved, typed parameters."""

    notebook: str  # path to the .ipynb
    parameters: dict[str, Any]
    figures: FigureDest = "notebook"
    force: bool = False

    @property
    def name(self) -> str:
        return Path(self.notebook).stem

    @property
    def hash(self) -> str:
        return params_hash(self.parameters)


@dataclass
class RunResult:
    notebook: str
    hash: str
    status: Literal["ok", "skipped", "failed"]
    run_dir: str
    duration_s: float = 0.0
    figures: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None  # {"cell": int|None, "ename": str, "evalue": str}

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def line(self) -> str:
        """The one-line report printed for this run."""
        head = f"{self.notebook} [{self.hash}]"
        if self.status == "ok":
            return f"ok       {head} {self.duration_s:.1f} s -> {self.run_dir} ({len(self.figures)} figure files)"
        if self.status == "skipped":
            return f"skipped  {head} already complete: {self.run_dir} (--force re-runs)"
        err = self.error or {}
        where = f"cell {err['cell']}" if err.get("cell") is not None else "outside any cell"
        return (
            f"FAILED   {head} {where}: {err.get('ename', 'Error')}: {err.get('evalue', '')} "
            f"(executed notebook: {self.run_dir})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_job(
    notebook: str | Path,
    values: Mapping[str, Any] | None = None,
    *,
    from_strings: bool = False,
    figures: FigureDest = "notebook",
    force: bool = False,
    spec: ParameterSpec | None = None,
) -> Job:
    """Validate `values` against the notebook's parameters cell (no kernel) and build a Job."""
    spec = spec or read_parameters(notebook)
    resolved = spec.resolve(values, from_strings=from_strings)
    return Job(str(notebook), resolved, figures, force)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set env vars for the kernel (it inherits os.environ) and restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _first_line(text: str, limit: int = 300) -> str:
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_job(job: Job, root: str | Path | None = None) -> RunResult:
    """Run `job` under `root` (default: the project root). Never raises for notebook errors."""
    root = Path(root).resolve() if root is not None else paths.project_root()
    nb_path = Path(job.notebook).resolve()
    name, digest = job.name, job.hash
    base = root / "runs" / name
    final, failed = base / digest, base / f"{digest}.failed"
    fig_dest = root / "figures" / name if job.figures == "notebook" else root / "figures" / name / digest

    def rel(p: Path) -> str:  # short paths in reports: relative when under the cwd
        p, cwd = p.resolve(), Path.cwd().resolve()
        return str(p.relative_to(cwd)) if p.is_relative_to(cwd) else str(p)

    previous = _read_record(final)
    if previous and previous.get("status") == "ok" and not job.force:
        published = publish_figures(root, final / "figures", fig_dest, _manifest_record(previous, final, root))
        return RunResult(name, digest, "skipped", rel(final), previous.get("duration_s", 0.0), [rel(p) for p in published])

    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from vtrlab.runner.kernel import KERNEL_NAME, VenvKernelManager

    spec = read_parameters(nb_path)  # for mapping cell indices back to the source notebook
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".tmp-{digest}-{uuid.uuid4().hex[:8]}"
    (tmp / "figures").mkdir(parents=True)
    atomic_write_json(tmp / "metrics.json", {})
    record: dict[str, Any] = {
        "notebook": name,
        "notebook_path": nb_path.relative_to(root).as_posix() if nb_path.is_relative_to(root) else str(nb_path),
        "parameters": job.parameters,
        "hash": digest,
        "seed": job.parameters.get("seed"),
        "device": job.parameters.get("device"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "organism_override": os.environ.get("VTRLAB_ORGANISM"),  # weights used for model="organism" if not the repo's
        **git_state(nb_path.parent),  # the code that ran: the notebook's repository
        "versions": versions(),
    }
    error: dict[str, Any] | None = None
    start = time.perf_counter()
    try:
        with _environ(
            **{
                paths.ENV_ROOT: str(root),
                paths.ENV_RUN_DIR: str(tmp),
                paths.ENV_FIGURE_DIR: str(tmp / "figures"),
                paths.ENV_NOTEBOOK: name,
                "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0"),
            }
        ):
            try:
                pm.execute_notebook(
                    str(nb_path),
                    str(tmp / f"{name}.ipynb"),
                    parameters=job.parameters,
                    kernel_name=KERNEL_NAME,
                    language="python",
                    cwd=str(nb_path.parent),
                    progress_bar=False,
                    log_output=False,
                    kernel_manager_class=VenvKernelManager,
                )
            except PapermillExecutionError as exc:
                # papermill inserts one cell (injected parameters) after the parameters cell
                cell = exc.cell_index - 1 if exc.cell_index > spec.cell_index else exc.cell_index
                error = {"cell": cell, "ename": exc.ename, "evalue": _first_line(exc.evalue)}
            except Exception as exc:  # kernel died, timeout, unreadable notebook, ...
                error = {"cell": None, "ename": type(exc).__name__, "evalue": _first_line(str(exc))}
        record["duration_s"] = round(time.perf_counter() - start, 3)
        record["status"] = "failed" if error else "ok"
        record["error"] = error
        atomic_write_json(tmp / RUN_RECORD, record)
        if error:
            _replace_dir(tmp, failed)
            return RunResult(name, digest, "failed", rel(failed / f"{name}.ipynb"), record["duration_s"], error=error)
        _replace_dir(tmp, final)
        if failed.exists():
            shutil.rmtree(failed, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    published = publish_figures(root, final / "figures", fig_dest, _manifest_record(record, final, root))
    return RunResult(name, digest, "ok", rel(final), record["duration_s"], [rel(p) for p in published])


def is_complete(job: Job, root: str | Path) -> bool:
    """True when `job` finished successfully before and is not forced: it will be skipped."""
    record = _read_record(Path(root) / "runs" / job.name / job.hash)
    return bool(record and record.get("status") == "ok" and not job.force)


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _manifest_record(record: Mapping[str, Any], run_dir: Path, root: Path) -> dict[str, Any]:
    keys = ("notebook", "notebook_path", "parameters", "hash", "git_commit", "git_dirty", "versions",
            "seed", "device", "cuda_visible_devices", "organism_override", "duration_s")
    return {**{k: record.get(k) for k in keys}, "run_dir": os.path.relpath(run_dir, root)}


def _replace_dir(src: Path, dest: Path) -> None:
    """Move `src` to `dest`; an existing `dest` is swapped out first and then deleted."""
    old = None
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{uuid.uuid4().hex[:8]}")
        os.rename(dest, old)
    os.rename(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
