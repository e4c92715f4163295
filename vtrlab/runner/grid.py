"""Grids: many runs of one or more notebooks, on a local process pool, Ray, or Slurm (submitit).

GRID.yaml::

    notebooks: [notebooks/01_attention_per_layer.ipynb]   # or `notebook: path`
    parameters:              # a list sweeps; the grid is the cartesian product
      seed: [0, 1, 2]
      n_samples: 64          # a single value is fixed
      layers: [[0, 1], [2]]  # list-typed parameter: a list of lists sweeps, a flat list is one value
    jobs:                    # optional explicit jobs, run in addition to the product
      - notebook: notebooks/03_reconstruction_selector.ipynb
        parameters: {keep: 0.25}

Notebook paths are relative to the YAML file's folder (or to the working directory). Every job
is checked against its notebook's parameters before anything runs. Ray and Slurm workers read
the notebooks and write runs/ and figures/ by path: the project must sit on a file system they
share, with vtrlab installed in their Python. Grid runs publish figures
into `figures/<notebook>/<hash>/` so parallel jobs of one notebook never overwrite each other.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from vtrlab.runner.errors import GridError, ParameterError
from vtrlab.runner.params import ParameterSpec, load_yaml, read_parameters
from vtrlab.runner.run import Job, RunResult, is_complete, prepare_job, run_job

Backend = Literal["local", "ray", "slurm"]
BACKENDS = ("local", "ray", "slurm")
_GRID_KEYS = {"notebook", "notebooks", "parameters", "jobs"}


def load_grid(path: str | Path, *, force: bool = False) -> list[Job]:
    """Read GRID.yaml into checked jobs (duplicates removed, order kept)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file not found: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f"{path}: cannot read the grid file ({type(exc).__name__})") from None
    try:
        spec = load_yaml(text, str(path))
    except ParameterError as exc:
        raise GridError(str(exc)) from None
    if not isinstance(spec, dict):
        raise GridError(f"{path}: expected a mapping with keys {sorted(_GRID_KEYS)}")
    unknown = set(spec) - _GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown keys {sorted(unknown)}; accepted: {sorted(_GRID_KEYS)}")

    notebooks = spec.get("notebooks", spec.get("notebook"))
    if "notebook" in spec and "notebooks" in spec:
        raise GridError(f"{path}: give either 'notebook' or 'notebooks', not both")
    if isinstance(notebooks, str):
        notebooks = [notebooks]
    elif notebooks is None:
        notebooks = []
    elif not isinstance(notebooks, list):
        raise GridError(f"{path}: notebook must be a path string or a list of them, got {notebooks!r}")
    sweep = spec.get("parameters") or {}
    if not isinstance(sweep, dict):
        raise GridError(f"{path}: 'parameters' must be a mapping name -> value or list of values")
    if sweep and not notebooks:
        raise GridError(f"{path}: 'parameters' given but no 'notebook(s)' to apply them to")

    jobs: list[Job] = []
    specs: dict[Path, ParameterSpec] = {}

    def spec_of(nb: Path) -> ParameterSpec:
        if nb not in specs:
            specs[nb] = read_parameters(nb)
        return specs[nb]

    for nb_text in notebooks:
        nb = _resolve_notebook(nb_text, path)
        nb_spec = spec_of(nb)
        for values in _product(sweep, nb_spec):
            jobs.append(prepare_job(nb, values, figures="run", force=force, spec=nb_spec))

    explicit = spec.get("jobs") or []
    if not isinstance(explicit, list):
        raise GridError(f"{path}: 'jobs' must be a list of {{notebook, parameters}}")
    for i, entry in enumerate(explicit):
        if not isinstance(entry, dict) or "notebook" not in entry or set(entry) - {"notebook", "parameters"}:
            raise GridError(f"{path}: jobs[{i}] must be a mapping with 'notebook' and optional 'parameters'")
        nb = _resolve_notebook(entry["notebook"], path)
        jobs.append(prepare_job(nb, entry.get("parameters") or {}, figures="run", force=force, spec=spec_of(nb)))

    if not jobs:
        raise GridError(f"{path}: the grid has no jobs")
    unique: dict[tuple[str, str], Job] = {}
    for job in jobs:
        unique.setdefault((str(Path(job.notebook).resolve()), job.hash), job)
    return list(unique.values())


def _resolve_notebook(text: Any, grid_file: Path) -> Path:
    if not isinstance(text, str):
        raise GridError(f"{grid_file}: notebook must be a path string, got {text!r}")
    for candidate in (grid_file.parent / text, Path(text)):
        if candidate.is_file():
            return candidate
    raise GridError(
        f"{grid_file}: notebook {text!r} not found (looked in {str(grid_file.parent)!r} and the working directory)"
    )


def _product(sweep: dict[str, Any], spec: ParameterSpec) -> list[dict[str, Any]]:
    axes: list[list[tuple[str, Any]]] = []
    for name, value in sweep.items():
        if name not in spec:
            raise ParameterError(f"{spec.notebook}: unknown parameter {name!r} in grid; {spec.accepted()}")
        ptype = spec.parameters[name].type
        sweeps = isinstance(value, list) and (not ptype.is_list or all(isinstance(v, list) or v is None for v in value))
        if sweeps and not value:
            raise GridError(f"{spec.notebook}: parameter {name!r} sweeps over an empty list")
        axes.append([(name, v) for v in value] if sweeps else [(name, value)])
    return [dict(combo) for combo in itertools.product(*axes)]


# --- running ------------------------------------------------------------------------------


def run_grid(
    jobs: Sequence[Job],
    *,
    backend: Backend = "local",
    workers: int | None = None,
    gpus: Sequence[str] | None = None,
    root: str | Path | None = None,
    ray_address: str | None = None,
    slurm_cluster: str = "slurm",
    slurm_partition: str | None = None,
    timeout_min: int = 240,
    on_result: Callable[[RunResult], None] | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """Run every job (one process each); failures are reported and the others continue.

    `gpus`: device ids; the local backend gives each job exactly one of them through
    CUDA_VISIBLE_DEVICES, Ray and Slurm request one GPU per job and let the scheduler pick.
    Returns results in job order.
    """
    from vtrlab.runner import paths

    if backend not in BACKENDS:
        raise GridError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    gpus = [str(g).strip() for g in (gpus or []) if str(g).strip()]
    workers = workers or max(1, len(gpus))
    if workers < 1:
        raise GridError(f"--workers must be >= 1, got {workers}")
    root = Path(root).resolve() if root is not None else paths.project_root()
    results: dict[int, RunResult] = {}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), unit="job", desc=f"grid ({backend})", disable=not progress, file=sys.stderr)

    def report(i: int, result: RunResult) -> None:
        results[i] = result
        bar.set_postfix(failed=sum(r.status == "failed" for r in results.values()), refresh=False)
        bar.update(1)
        if on_result is not None:
            on_result(result)
        elif progress:
            bar.write(result.line())

    # Completed runs are skipped here, without starting a process or a scheduler task.
    todo = []
    for i, job in enumerate(jobs):
        if is_complete(job, root):
            report(i, run_job(job, root))
        else:
            todo.append(i)
    todo_jobs = [jobs[i] for i in todo]

    def report_todo(k: int, result: RunResult) -> None:
        report(todo[k], result)

    try:
        if not todo_jobs:
            pass
        elif backend == "local":
            _run_local(todo_jobs, workers, gpus, root, report_todo)
        elif backend == "ray":
            _run_ray(todo_jobs, workers, bool(gpus), root, ray_address, report_todo)
        else:
            _run_slurm(todo_jobs, workers, bool(gpus), root, slurm_cluster, slurm_partition, timeout_min, report_todo)
    finally:
        bar.close()
    return [results[i] for i in range(len(jobs))]


def _run_local(jobs, workers, gpus, root, report) -> None:
    from vtrlab.runner.job import allow_new_jobs, run_in_process

    allow_new_jobs()

    # one token per worker slot; slot i always uses gpus[i % len(gpus)]
    slots: queue.Queue = queue.Queue()
    for i in range(workers):
        slots.put(gpus[i % len(gpus)] if gpus else None)

    def one(job: Job) -> RunResult:
        gpu = slots.get()
        try:
            return run_in_process(job, root, {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})
        finally:
            slots.put(gpu)

    stopping = threading.Event()

    def one_unless_stopping(job: Job) -> RunResult | None:
        return None if stopping.is_set() else one(job)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(one_unless_stopping, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            report(futures[fut], fut.result())
    except BaseException:  # KeyboardInterrupt (SIGINT, or SIGTERM via the CLI): stop every job process
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        from vtrlab.runner.job import stop_all

        stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _failed(job: Job, exc: BaseException) -> RunResult:
    """A job whose process failed outside the notebook (scheduler error, killed worker)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return RunResult(
        job.name,
        job.hash,
        "failed",
        f"runs/{job.name}",
        error={"cell": None, "ename": type(exc).__name__, "evalue": first},
    )


def remove_temp_dirs(jobs: Sequence[Job], root: str | Path) -> list[Path]:
    """Remove the temp run directories (``runs/<notebook>/.tmp-<hash>-*``) of ``jobs``: what a cancelled Ray task
    or Slurm job leaves on the shared file system. Returns what was removed."""
    import shutil

    removed = []
    for job in jobs:
        base = Path(root) / "runs" / job.name
        for tmp in sorted(base.glob(f".tmp-{job.hash}-*")) if base.is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def cancel_on_interrupt(cancel: Callable[[], None]):
    """While inside, SIGINT/SIGTERM (the CLI's handler runs ``interrupt.clean_up``) or an exception such as
    KeyboardInterrupt call ``cancel()``: submitted jobs are cancelled (``ray.cancel`` / ``scancel``) and their temp
    run directories removed. ``cancel`` must be idempotent."""
    from vtrlab.runner import interrupt

    def stop(_grace_s: float = 0.0) -> None:
        cancel()

    interrupt.on_clean_up(stop)
    try:
        yield
    except BaseException:
        cancel()
        raise
    finally:
        interrupt.off_clean_up(stop)


def _run_ray(jobs, workers, use_gpus, root, address, report) -> None:
    try:
        import ray
    except ImportError:
        raise GridError("backend 'ray' needs ray: pip install 'vtrlab[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started_here = True
    try:
        from vtrlab.runner.job import run_job_dict

        # max_calls=1: Ray retires the worker after one task, so every job gets its own process
        # (and Ray sets CUDA_VISIBLE_DEVICES to the one GPU it granted).
        task = ray.remote(num_cpus=1, num_gpus=1 if use_gpus else 0, max_calls=1, max_retries=0)(run_job_dict)
        pending: dict[Any, int] = {}
        todo = list(enumerate(jobs))

        def cancel() -> None:  # force: the worker (and the kernel it started) stops now
            for ref, i in list(pending.items()):
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                pending.pop(ref, None)
                remove_temp_dirs([jobs[i]], root)
            todo.clear()

        with cancel_on_interrupt(cancel):
            while todo or pending:
                while todo and len(pending) < workers:  # --workers caps tasks in flight
                    i, job = todo.pop(0)
                    pending[task.remote(asdict(job), str(root))] = i
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        report(i, RunResult(**ray.get(ref)))
                    except Exception as exc:  # task crashed outside the notebook
                        report(i, _failed(jobs[i], exc))
    finally:
        if started_here:
            ray.shutdown()


def _run_slurm(jobs, workers, use_gpus, root, cluster, partition, timeout_min, report) -> None:
    try:
        import submitit
    except ImportError:
        raise GridError("backend 'slurm' needs submitit: pip install 'vtrlab[slurm]'") from None
    from vtrlab.runner.job import run_job_dict

    folder = Path(root) / "runs" / ".submitit"  # job logs and pickles
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as exc:  # e.g. no srun/sbatch on this machine
        raise GridError(f"backend 'slurm': {exc} (--slurm-cluster local runs the jobs here instead)") from None
    params: dict[str, Any] = {
        "timeout_min": timeout_min,
        "tasks_per_node": 1,
        "nodes": 1,
        "cpus_per_task": 1,
        "slurm_array_parallelism": workers,
    }
    if use_gpus:
        params["gpus_per_node"] = 1
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    try:
        submitted = executor.map_array(run_job_dict, [asdict(j) for j in jobs], [str(root)] * len(jobs))
    except Exception as exc:  # sbatch rejected the array (partition, limits, ...)
        raise GridError(f"backend 'slurm': submission failed: {str(exc).strip().splitlines()[0]}") from None
    pending = dict(enumerate(submitted))

    def cancel() -> None:  # scancel every job not finished yet
        for i, sjob in list(pending.items()):
            with contextlib.suppress(Exception):
                sjob.cancel(check=False)
            pending.pop(i, None)
            remove_temp_dirs([jobs[i]], root)

    with cancel_on_interrupt(cancel):
        while pending:
            for i, sjob in list(pending.items()):
                if sjob.done():
                    pending.pop(i)
                    try:
                        report(i, RunResult(**sjob.result()))
                    except Exception as exc:  # the job process failed outside the notebook
                        report(i, _failed(jobs[i], exc))
            if pending:
                time.sleep(0.5)
