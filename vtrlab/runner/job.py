"""Run one grid job in a process of its own, which sees only the GPU its launcher exposed.

Local grids fork each job from a fork server that imported the runner (papermill,
jupyter_client) once, so a job process starts in milliseconds instead of re-importing them.
Ray and Slurm give each job its own worker process themselves and call `run_job_dict`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from vtrlab.runner.outputs import atomic_write_json
from vtrlab.runner.run import Job, RunResult, run_job

_FORKSERVER = None


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
    result = run_job(Job(**job), root)
    atomic_write_json(Path(result_file), result.to_dict())


def run_in_process(job: Job, root: str | Path, env: Mapping[str, str] | None = None) -> RunResult:
    """Run `job` in a process forked for it alone; never raises for job failures."""
    with tempfile.TemporaryDirectory(prefix="vtrlab-job-") as tmp:
        result_file = Path(tmp) / "result.json"
        proc = _forkserver().Process(target=_child, args=(asdict(job), str(root), dict(env or {}), str(result_file)))
        proc.start()
        proc.join()
        if result_file.exists():
            return RunResult(**json.loads(result_file.read_text()))
    return RunResult(
        job.name, job.hash, "failed", f"runs/{job.name}",
        error={"cell": None, "ename": f"JobProcessExit({proc.exitcode})", "evalue": "the job process died before reporting"},
    )


def run_job_dict(job: Mapping[str, Any], root: str) -> dict[str, Any]:
    """Entry for backends that ship plain data (Ray tasks, submitit jobs): dict in, dict out."""
    return run_job(Job(**job), root).to_dict()
