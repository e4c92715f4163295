"""Run one grid job in a process of its own, which sees only the GPU its launcher exposed.

Local grids fork each job from a fork server that imported the runner (papermill,
jupyter_client) once, so a job process starts in milliseconds instead of re-importing them.
Ray and Slurm give each job its own worker process themselves and call `run_job_dict`.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vtrlab.io import atomic_write_json
from vtrlab.runner.interrupt import exit_cleanly_on_signals, on_clean_up
from vtrlab.runner.run import Job, RunResult, run_job

_FORKSERVER = None
_LIVE: set = set()  # job processes started by this driver and not yet joined
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set by stop_all: no new job process starts


def _forkserver():
    """One fork server per driver process, with the runner's heavy imports preloaded."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["vtrlab.runner.run", "papermill", "nbclient", "jupyter_client"])
        _FORKSERVER = ctx
    return _FORKSERVER


def _child(job: dict, root: str, env: dict, result_file: str) -> None:
    os.environ.update(env)  # before anything in this process can touch a GPU
    # SIGTERM from the driver (or Ctrl-C): kill this job's kernel, remove its temp dir, exit
    with exit_cleanly_on_signals():
        result = run_job(Job(**job), root)
    atomic_write_json(Path(result_file), result.to_dict())


@on_clean_up
def stop_all(grace_s: float = 20.0) -> None:
    """SIGTERM every live job process, wait up to `grace_s` for it to clean up, then SIGKILL it."""
    with _LIVE_LOCK:
        _STOPPING.set()
        procs = list(_LIVE)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def run_in_process(job: Job, root: str | Path, env: Mapping[str, str] | None = None) -> RunResult:
    """Run `job` in a process forked for it alone; never raises for job failures."""
    with tempfile.TemporaryDirectory(prefix="vtrlab-job-") as tmp:
        result_file = Path(tmp) / "result.json"
        proc = _forkserver().Process(target=_child, args=(asdict(job), str(root), dict(env or {}), str(result_file)))
        with _LIVE_LOCK:
            if _STOPPING.is_set():
                return _interrupted(job)
            proc.start()
            _LIVE.add(proc)
        try:
            proc.join()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
        if result_file.exists():
            return RunResult(**json.loads(result_file.read_text()))
    return RunResult(
        job.name,
        job.hash,
        "failed",
        f"runs/{job.name}",
        error={
            "cell": None,
            "ename": f"JobProcessExit({proc.exitcode})",
            "evalue": "the job process died before reporting",
        },
    )


def allow_new_jobs() -> None:
    """Undo `stop_all`'s block on new job processes (a new grid in the same driver)."""
    _STOPPING.clear()


def _interrupted(job: Job) -> RunResult:
    return RunResult(
        job.name,
        job.hash,
        "failed",
        f"runs/{job.name}",
        error={"cell": None, "ename": "Interrupted", "evalue": "the grid was stopped before this job ran"},
    )


def run_job_dict(job: Mapping[str, Any], root: str) -> dict[str, Any]:
    """Entry for backends that ship plain data (Ray tasks, submitit jobs): dict in, dict out."""
    return run_job(Job(**job), root).to_dict()
