"""Execute one notebook with papermill into `runs/<notebook>/<run hash>/`.

The run hash covers the notebook's code (every code cell, whitespace-normalised; outputs and
metadata do not count), the full parameter dict and the vtrlab version: editing a notebook, or
running another notebook of the same file name, is a different run. The notebook name is made
safe (`paths.safe_name`) and every directory is checked to stay inside `runs/` and `figures/`.

A run is written into a hidden temp directory `.tmp-<hash>-<host>-<pid>-<random>` and renamed
into place when it finishes, so a run directory is complete or absent; an interrupted run
(SIGINT/SIGTERM) removes its temp directory, and a later run of the notebook removes temp
directories whose owner process is dead. A failed run is kept as `runs/<notebook>/<hash>.failed/` with
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
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vtrlab.io import atomic_write_json, replace_dir
from vtrlab.runner import interrupt, paths
from vtrlab.runner.errors import RunnerError
from vtrlab.runner.params import ParameterSpec, read_parameters
from vtrlab.runner.provenance import git_state, publish_figures, versions

FigureDest = Literal["notebook", "run"]  # figures/<nb>/  or  figures/<nb>/<hash>/
RUN_RECORD = "run.json"


def params_hash(parameters: Mapping[str, Any]) -> str:
    """Short stable hash of the full (defaults included) parameter dict."""
    text = json.dumps(parameters, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def notebook_code(notebook: str | Path) -> list[str]:
    """The notebook's code cells, normalised: trailing whitespace and blank edge lines dropped.

    Outputs, execution counts, metadata and markdown do not change a run; code does. The
    `parameters` cell is left out: what it defines reaches the hash as the resolved parameter
    values (so editing a help comment is the same run, changing a default is not).
    """
    path = Path(notebook)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = nb["cells"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunnerError(f"{str(path)!r} is not a readable .ipynb notebook ({type(exc).__name__})") from None
    out = []
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        tags = (cell.get("metadata") or {}).get("tags") or []
        if "parameters" in tags or "injected-parameters" in tags:
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        out.append("\n".join(line.rstrip() for line in source.replace("\r\n", "\n").split("\n")).strip("\n"))
    return out


def vtrlab_version() -> str:
    from vtrlab._version import __version__

    return versions().get("vtrlab") or __version__


def run_hash(notebook: str | Path, parameters: Mapping[str, Any], version: str | None = None) -> str:
    """Short stable hash of (notebook code, parameters, vtrlab version): the run's identity."""
    payload = {
        "code": notebook_code(notebook),
        "parameters": parameters,
        "vtrlab": version if version is not None else vtrlab_version(),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Job:
    """One notebook with fully resolved, typed parameters.

    `digest` (the run hash) is computed from the notebook file when the job is made, so a job
    shipped to another process keeps the identity it was checked with.
    """

    notebook: str  # path to the .ipynb
    parameters: dict[str, Any]
    figures: FigureDest = "notebook"
    force: bool = False
    digest: str = ""

    def __post_init__(self) -> None:
        if self.figures not in ("notebook", "run"):
            raise RunnerError(f"figures must be 'notebook' or 'run', got {self.figures!r}")
        if not self.digest:
            self.digest = run_hash(self.notebook, self.parameters)

    @property
    def name(self) -> str:
        return paths.safe_name(Path(self.notebook).stem)

    @property
    def hash(self) -> str:
        return self.digest


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
    base = paths.inside(root / "runs" / name, root / "runs", "run directory")
    final, failed = base / digest, base / f"{digest}.failed"
    fig_dest = root / "figures" / name if job.figures == "notebook" else root / "figures" / name / digest
    paths.inside(fig_dest, root / "figures", "figure directory")

    def rel(p: Path) -> str:  # short paths in reports: relative when under the cwd
        p, cwd = p.resolve(), Path.cwd().resolve()
        return str(p.relative_to(cwd)) if p.is_relative_to(cwd) else str(p)

    previous = _read_record(final)
    if previous and previous.get("status") == "ok" and not job.force:
        published = publish_figures(root, final / "figures", fig_dest, _manifest_record(previous, final, root))
        duration = previous.get("duration_s", 0.0)
        return RunResult(name, digest, "skipped", rel(final), duration, [rel(p) for p in published])

    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from vtrlab.runner.kernel import KERNEL_NAME, VenvKernelManager, shutdown_kernels

    spec = read_parameters(nb_path)  # for mapping cell indices back to the source notebook
    base.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(base)
    tmp = base / f".tmp-{digest}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    interrupt.track_temp_dir(tmp)  # removed by the signal handler if the run is interrupted
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
        record["resources"] = _pop_resources(tmp)  # the kernel's peak memory (runner.resources), None if killed
        record["status"] = "failed" if error else "ok"
        record["error"] = error
        atomic_write_json(tmp / RUN_RECORD, record)
        if error:
            replace_dir(tmp, failed)
            return RunResult(name, digest, "failed", rel(failed / f"{name}.ipynb"), record["duration_s"], error=error)
        replace_dir(tmp, final)
        if failed.exists():
            shutil.rmtree(failed, ignore_errors=True)
    finally:
        shutdown_kernels()  # an exception may leave papermill's kernel running
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        interrupt.untrack_temp_dir(tmp)
    published = publish_figures(root, final / "figures", fig_dest, _manifest_record(record, final, root))
    return RunResult(name, digest, "ok", rel(final), record["duration_s"], [rel(p) for p in published])


def is_complete(job: Job, root: str | Path) -> bool:
    """True when `job` finished successfully before and is not forced: it will be skipped."""
    record = _read_record(Path(root) / "runs" / job.name / job.hash)
    return bool(record and record.get("status") == "ok" and not job.force)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
STALE_AFTER_S = 24 * 3600  # temp dirs whose owner cannot be checked (another host, old name) are removed after this


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temp_dirs(base: Path, now: float | None = None) -> list[Path]:
    """Remove `base/.tmp-*` run directories left by killed runs; returns what was removed.

    A temp dir of this host whose owner pid is dead goes at once; one whose owner cannot be
    checked (another host on a shared file system, or an older name without a pid) goes when
    it has not been touched for `STALE_AFTER_S`. Live runs are never touched.
    """
    now = time.time() if now is None else now
    removed = []
    for tmp in sorted(base.glob(".tmp-*")):
        if not tmp.is_dir():
            continue
        parts = tmp.name.split("-")  # .tmp, hash, host, pid, random
        if len(parts) == 5 and parts[2] == _HOST and parts[3].isdigit():
            stale = not _pid_alive(int(parts[3]))
        else:
            try:
                stale = now - tmp.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _pop_resources(run_dir: Path) -> dict[str, Any] | None:
    """The kernel's ``resources.json`` (written at its exit), removed from the run directory."""
    from vtrlab.runner.resources import FILE

    path = run_dir / FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    finally:
        path.unlink(missing_ok=True)


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _manifest_record(record: Mapping[str, Any], run_dir: Path, root: Path) -> dict[str, Any]:
    keys = (
        "notebook",
        "notebook_path",
        "parameters",
        "hash",
        "git_commit",
        "git_dirty",
        "versions",
        "seed",
        "device",
        "cuda_visible_devices",
        "organism_override",
        "duration_s",
    )
    return {**{k: record.get(k) for k in keys}, "run_dir": os.path.relpath(run_dir, root)}
