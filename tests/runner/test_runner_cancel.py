"""Ray and Slurm grids stopped by Ctrl-C or SIGTERM cancel every submitted job (``ray.cancel`` / ``scancel``) and
remove the temp run directories those jobs left; tested with fake ``ray`` and ``submitit`` modules (neither
scheduler runs here). The CLI's signal handler calls ``interrupt.clean_up`` before exiting; a Python caller
sees KeyboardInterrupt: both paths are exercised."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from vtrlab.runner import interrupt
from vtrlab.runner.grid import run_grid
from vtrlab.runner.params import read_parameters
from vtrlab.runner.run import Job, prepare_job

PARAMS = "x: int = 1  # value"


@pytest.fixture
def jobs(make_notebook):
    nb = make_notebook("tiny", PARAMS, "print(x)")
    spec = read_parameters(nb)
    return [prepare_job(nb, {"x": i}, figures="run", spec=spec) for i in range(3)]


def _leave_temp_dir(job: dict, root: str) -> Path:
    """What a worker that was running ``job`` leaves behind when killed: its temp run directory."""
    j = Job(**job)
    tmp = Path(root) / "runs" / j.name / f".tmp-{j.hash}-otherhost-123-abcd1234"
    (tmp / "figures").mkdir(parents=True)
    return tmp


def _cancellers() -> list:
    return [s for s in interrupt._STOPPERS if s.__qualname__.startswith("cancel_on_interrupt")]


def _interrupt(how: str, seen: list, cancelled: list) -> None:
    if how == "signal":  # what the CLI's SIGINT/SIGTERM handler does before os._exit
        interrupt.clean_up(0.0)
        seen.extend(cancelled)  # cancelled by the handler itself, before any exception unwinds
    raise KeyboardInterrupt


class FakeRay(types.ModuleType):
    def __init__(self, how: str):
        super().__init__("ray")
        self.how, self.submitted, self.cancelled, self.temp, self.by_handler = how, [], [], [], []

    def is_initialized(self):
        return True

    def remote(self, **options):
        fake = self

        class Task:
            def remote(self, job, root):
                ref = f"ref{len(fake.submitted)}"
                fake.submitted.append(ref)
                fake.temp.append(_leave_temp_dir(job, root))
                return ref

        return lambda fn: Task()

    def wait(self, refs, num_returns=1):
        _interrupt(self.how, self.by_handler, self.cancelled)

    def cancel(self, ref, force=False):
        self.cancelled.append((ref, force))

    def get(self, ref):
        raise AssertionError("no task finishes in this test")


class FakeSlurmJob:
    def __init__(self, log, how, by_handler):
        self.log, self.how, self.cancelled, self.by_handler = log, how, False, by_handler

    def done(self):
        _interrupt(self.how, self.by_handler, self.log)

    def cancel(self, check=True):
        self.cancelled = True
        self.log.append(check)


class FakeSubmitit(types.ModuleType):
    def __init__(self, how: str):
        super().__init__("submitit")
        self.how, self.jobs, self.log, self.temp, self.by_handler = how, [], [], [], []
        fake = self

        class AutoExecutor:
            def __init__(self, folder, cluster):
                pass

            def update_parameters(self, **kw):
                pass

            def map_array(self, fn, job_dicts, roots):
                for job, root in zip(job_dicts, roots):
                    fake.temp.append(_leave_temp_dir(job, root))
                    fake.jobs.append(FakeSlurmJob(fake.log, fake.how, fake.by_handler))
                return list(fake.jobs)

        self.AutoExecutor = AutoExecutor


@pytest.mark.parametrize("how", ["keyboard", "signal"])
def test_ray_grid_interrupted_cancels_submitted_tasks_and_removes_their_temp_dirs(jobs, tmp_path, monkeypatch, how):
    ray = FakeRay(how)
    monkeypatch.setitem(sys.modules, "ray", ray)
    reported = []
    with pytest.raises(KeyboardInterrupt):
        run_grid(jobs, backend="ray", workers=2, root=tmp_path, progress=False, on_result=reported.append)
    assert ray.submitted == ["ref0", "ref1"]  # --workers 2: the third job was never submitted
    assert sorted(ray.cancelled) == [("ref0", True), ("ref1", True)]  # each cancelled once, forced
    assert ray.temp and not any(t.exists() for t in ray.temp)
    assert len(ray.by_handler) == (2 if how == "signal" else 0)
    assert reported == [] and not _cancellers()  # the canceller is unregistered afterwards


@pytest.mark.parametrize("how", ["keyboard", "signal"])
def test_slurm_grid_interrupted_scancels_every_job_and_removes_their_temp_dirs(jobs, tmp_path, monkeypatch, how):
    submitit = FakeSubmitit(how)
    monkeypatch.setitem(sys.modules, "submitit", submitit)
    with pytest.raises(KeyboardInterrupt):
        run_grid(jobs, backend="slurm", workers=2, root=tmp_path, progress=False)
    assert len(submitit.jobs) == 3 and all(j.cancelled for j in submitit.jobs)
    assert submitit.log == [False] * 3  # cancel(check=False): one scancel per job, errors of finished ones ignored
    assert submitit.temp and not any(t.exists() for t in submitit.temp)
    assert len(submitit.by_handler) == (3 if how == "signal" else 0)
    assert not _cancellers()


def test_remove_temp_dirs_touches_only_the_jobs_own(jobs, tmp_path):
    from vtrlab.runner.grid import remove_temp_dirs

    mine = _leave_temp_dir(vars(jobs[0]), str(tmp_path))
    other = _leave_temp_dir(vars(jobs[1]), str(tmp_path))
    done = tmp_path / "runs" / jobs[0].name / jobs[0].hash
    done.mkdir()
    assert remove_temp_dirs([jobs[0]], tmp_path) == [mine]
    assert not mine.exists() and other.exists() and done.exists()
