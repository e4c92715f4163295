"""Run one job in its own process, which sees only the GPU its launcher exposed.

Local grids fork each job from a fork server that has the runner (papermill, jupyter_client)
imported once, so a job process starts in milliseconds; other backends (Ray workers) start
`python -m vtrlab.runner.job JOB.json RESULT.json`. Either way a job never shares a process
with another job, and CUDA_VISIBLE_DEVICES is set before anything in it touches a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from vtrlab.runner.outputs import atomic_write_json
from vtrlab.runner.run import Job, RunResult, run_job


def run_in_subprocess(job: Job, root: str | Path, env: Mapping[str, str] | None = None) -> RunResult:
    """Run `job` in a fresh `python -m vtrlab.runner.job` process; never raises for job failures."""
    with tempfile.TemporaryDirectory(prefix="vtrlab-job-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps({"job": asdict(job), "root": str(root)}))
        done = subprocess.run(
            [sys.executable, "-m", "vtrlab.runner.job", str(job_file), str(result_file)],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
        )
        if result_file.exists():
            return RunResult(**json.loads(result_file.read_text()))
    # the job process died before it could report (import error, OOM kill, ...)
    tail = [line for line in (done.stderr or "").strip().splitlines() if line.strip()]
    return RunResult(
        job.name, job.hash, "failed", f"runs/{job.name}",
        error={"cell": None, "ename": f"JobProcessExit({done.returncode})", "evalue": tail[-1] if tail else ""},
    )


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
    os.environ.update(env)
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
    """Entry for backends that ship plain data (Ray, submitit): dict in, dict out."""
    return run_job(Job(**job), root).to_dict()


def main(argv: list[str]) -> int:
    job_file, result_file = argv
    payload = json.loads(Path(job_file).read_text())
    result = run_job(Job(**payload["job"]), payload["root"])
    atomic_write_json(Path(result_file), result.to_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
