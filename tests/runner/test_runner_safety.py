"""Nothing lost, nothing stale: safe names and paths, runs keyed by content, a tolerant manifest,
stale temp dirs cleaned, SIGTERM/SIGINT stop `vtrlab run` and `vtrlab grid` with every child.

Each test names the defect of issue 15 it guards (numbers from the issue's list).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from notebook_files import write_notebook

from vtrlab.io import atomic_write_json
from vtrlab.runner import paths
from vtrlab.runner.errors import RunnerError
from vtrlab.runner.provenance import MANIFEST, publish_figures, read_manifest
from vtrlab.runner.run import _HOST, clean_stale_temp_dirs, prepare_job, run_hash, run_job

PARAMS = "n: int = 2  # points\nseed: int = 0  # seed"


BODY = """\
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from vtrlab.runner import save_figure
from vtrlab.runner import log_metrics
fig, ax = plt.subplots(figsize=(1, 1))
ax.plot(range(n))
save_figure(fig, "line")
log_metrics({"n": n, "version": VERSION})
"""


def _nb(path: Path, version: int = 1) -> Path:
    return write_notebook(path, PARAMS, f"VERSION = {version}", BODY)


# --- 3: names and paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "stem, expected",
    [("01_demo", "01_demo"), ("my notebook", "my_notebook"), (".hidden", "hidden"), ("a/b", "a_b"), ("x..y", "x..y")],
)
def test_safe_name(stem, expected):
    assert paths.safe_name(stem) == expected


@pytest.mark.parametrize("stem", ["..", ".", "...", "", "._", "\u00e9\u00e9"])
def test_safe_name_refuses_names_with_nothing_left(stem):
    with pytest.raises(RunnerError, match="no usable directory name"):
        paths.safe_name(stem)


def test_dotdot_notebook_cannot_touch_the_project_root(tmp_path):
    """Defect 3: `vtrlab run '/tmp/x/...ipynb'` wrote into the project root and deleted its figures."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "paper.pdf").write_bytes(b"user file")
    (root / "plot.png").write_bytes(b"user file")
    nb = _nb(tmp_path / "x" / "...ipynb")
    assert Path(nb).stem == ".."
    with pytest.raises(RunnerError, match=r"'\.\.' gives no usable directory name"):
        run_job(prepare_job(nb), root)
    assert sorted(p.name for p in root.iterdir()) == ["paper.pdf", "plot.png"]


def test_publish_refuses_a_destination_outside_figures(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.pdf").write_bytes(b"a")
    for dest in (tmp_path, tmp_path / "figures", tmp_path / "figures" / ".." / "elsewhere"):
        with pytest.raises(RunnerError, match="not inside"):
            publish_figures(tmp_path, src, dest, {"notebook": "nb"})
    assert not (tmp_path / "a.pdf").exists() and not (tmp_path / "elsewhere").exists()


def test_publish_never_deletes_a_file_it_did_not_write(tmp_path):
    """Defect 3: publishing deleted every .pdf/.png in the folder that the run did not produce."""
    dest = tmp_path / "figures" / "nb"
    dest.mkdir(parents=True)
    (dest / "mine.pdf").write_bytes(b"a user's own figure")
    first = tmp_path / "r1"
    first.mkdir()
    (first / "old.pdf").write_bytes(b"old")
    publish_figures(tmp_path, first, dest, {"notebook": "nb", "hash": "1"})
    second = tmp_path / "r2"
    second.mkdir()
    (second / "new.pdf").write_bytes(b"new")
    publish_figures(tmp_path, second, dest, {"notebook": "nb", "hash": "2"})
    assert (dest / "mine.pdf").read_bytes() == b"a user's own figure"  # not ours: kept
    assert not (dest / "old.pdf").exists()  # ours, from an earlier run: replaced
    assert sorted(json.loads((tmp_path / "figures" / MANIFEST).read_text())) == ["figures/nb/new.pdf"]


# --- 4: runs keyed by content ----------------------------------------------------------------


def test_run_hash_covers_code_parameters_and_version(tmp_path):
    a = _nb(tmp_path / "a" / "demo.ipynb", version=1)
    b = _nb(tmp_path / "b" / "demo.ipynb", version=2)  # same file name, other code
    params = {"n": 2, "seed": 0}
    assert run_hash(a, params) != run_hash(b, params)
    assert run_hash(a, params) != run_hash(a, {"n": 3, "seed": 0})
    assert run_hash(a, params, version="0.1.0") != run_hash(a, params, version="0.2.0")
    # outputs, metadata, markdown and trailing whitespace are not code
    nb = json.loads(a.read_text())
    nb["cells"][2]["source"] = "".join(nb["cells"][2]["source"]) + "   \n\n"
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "hi"}]
    nb["cells"][0]["source"] = "# another title"
    nb["metadata"]["foo"] = 1
    c = tmp_path / "c" / "demo.ipynb"
    c.parent.mkdir()
    c.write_text(json.dumps(nb))
    assert run_hash(c, params) == run_hash(a, params)


@pytest.mark.xdist_group("runner")
def test_edited_notebook_is_a_new_run_not_skipped(tmp_path):
    """Defect 4: after editing a notebook, `vtrlab run` said 'skipped ... already complete'."""
    nb = _nb(tmp_path / "notebooks" / "demo.ipynb", version=1)
    first = run_job(prepare_job(nb), tmp_path)
    assert first.status == "ok", first.line()
    _nb(nb, version=2)
    second = run_job(prepare_job(nb), tmp_path)
    assert second.status == "ok" and second.hash != first.hash, second.line()
    assert json.loads((tmp_path / second.run_dir / "metrics.json").read_text())["version"] == 2
    # a notebook of the same file name elsewhere is a different run too
    other = _nb(tmp_path / "elsewhere" / "demo.ipynb", version=3)
    assert prepare_job(other).hash not in (first.hash, second.hash)
    # the unchanged notebook is skipped
    assert run_job(prepare_job(nb), tmp_path).status == "skipped"


# --- 7: the manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", ['{"figures/a.pdf": {"sha', "", "[1, 2]", '{"a": 3}', "\xff\xfe"])
def test_corrupt_manifest_is_set_aside_and_rebuilt(tmp_path, content):
    """Defect 7: a truncated figures/MANIFEST.json broke every later run with a raw JSONDecodeError."""
    manifest = tmp_path / "figures" / MANIFEST
    manifest.parent.mkdir()
    manifest.write_text(content, encoding="latin-1")
    with pytest.warns(RuntimeWarning, match="set aside as MANIFEST.json.corrupt-"):
        assert read_manifest(tmp_path) == {}
    aside = list(manifest.parent.glob("MANIFEST.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content.encode("latin-1")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt manifest reads cleanly
        publish_figures(tmp_path, src, tmp_path / "figures" / "nb", {"notebook": "nb"})
        assert list(read_manifest(tmp_path)) == ["figures/nb/a.png"]


def test_manifest_and_atomic_files_get_the_normal_file_mode(tmp_path):
    """Defect 10 (part): every run rewrote the committed manifest with mode 0600."""
    old = os.umask(0o022)
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.pdf").write_bytes(b"a")
        publish_figures(tmp_path, src, tmp_path / "figures" / "nb", {"notebook": "nb"})
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    for path in (tmp_path / "figures" / MANIFEST, tmp_path / "figures" / "nb" / "a.pdf", tmp_path / "x.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# --- 8: stale temp dirs and signals ----------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_dirs_are_cleaned_live_ones_kept(tmp_path):
    base = tmp_path / "runs" / "nb"
    dead = base / f".tmp-abc-{_HOST}-{_dead_pid()}-1234abcd"
    live = base / f".tmp-abc-{_HOST}-{os.getpid()}-1234abcd"
    other_host = base / f".tmp-abc-ffffffff-{_dead_pid()}-1234abcd"
    legacy_old, legacy_new = base / ".tmp-abc-1234abcd", base / ".tmp-def-1234abcd"
    for d in (dead, live, other_host, legacy_old, legacy_new):
        (d / "figures").mkdir(parents=True)
    week_ago = time.time() - 7 * 24 * 3600
    os.utime(legacy_old, (week_ago, week_ago))
    removed = clean_stale_temp_dirs(base)
    assert sorted(removed) == sorted([dead, legacy_old])
    assert live.is_dir() and other_host.is_dir() and legacy_new.is_dir()


SLEEPY = "seconds: int = 120  # sleep\nseed: int = 0  # seed"
SLEEPY_BODY = """\
import os, time, pathlib
pathlib.Path(os.environ["VTRLAB_ROOT"], f"kernel-{seed}.pid").write_text(str(os.getpid()))
time.sleep(seconds)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): check /proc
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_for(paths_, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(p.is_file() and p.read_text().strip() for p in paths_):
            return [int(p.read_text()) for p in paths_]
        time.sleep(0.2)
    raise AssertionError(f"kernels did not start within {timeout} s: {paths_}")


def _start(project: Path, *args: str) -> subprocess.Popen:
    tree = str(Path(__file__).parents[2])  # this checkout's vtrlab first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
    env.pop(paths.ENV_ROOT, None)
    return subprocess.Popen(
        [sys.executable, "-m", "vtrlab.cli", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def sleepy_project(tmp_path):
    write_notebook(tmp_path / "notebooks" / "sleepy.ipynb", SLEEPY, SLEEPY_BODY)
    (tmp_path / "pyproject.toml").write_text("")
    return tmp_path


@pytest.mark.slow
@pytest.mark.xdist_group("runner")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_run_with_its_kernel_and_temp_dir(sleepy_project, sig):
    """Defect 8: a killed run left its kernel and `runs/<nb>/.tmp-*` behind."""
    proc = _start(sleepy_project, "run", "notebooks/sleepy.ipynb")
    try:
        (kernel,) = _wait_for([sleepy_project / "kernel-0.pid"])
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, (out, err)
    assert err.strip().splitlines()[-1].startswith(f"error: interrupted by {sig.name}")
    deadline = time.monotonic() + 10
    while _alive(kernel) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(kernel)
    assert [p.name for p in (sleepy_project / "runs" / "sleepy").iterdir()] == []  # no temp dir, no run


@pytest.mark.slow
@pytest.mark.xdist_group("runner")
def test_sigterm_stops_grid_with_every_job_process(sleepy_project):
    """Defect 8: SIGTERM did not stop `vtrlab grid` jobs (processes stayed and published later)."""
    jobs = [{"seconds": 0, "seed": 9}, {"seed": 0}, {"seed": 1}, {"seed": 2}]  # the first completes
    (sleepy_project / "grid.yaml").write_text(
        json.dumps({"jobs": [{"notebook": "notebooks/sleepy.ipynb", "parameters": p} for p in jobs]})
    )
    proc = _start(sleepy_project, "grid", "grid.yaml", "--workers", "2")
    try:
        kernels = _wait_for([sleepy_project / "kernel-0.pid", sleepy_project / "kernel-1.pid"])
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    time.sleep(1)
    assert not [pid for pid in kernels + children if _alive(pid)]
    runs = sleepy_project / "runs" / "sleepy"
    assert not list(runs.glob(".tmp-*"))
    assert not (sleepy_project / "kernel-2.pid").exists()  # no job started after the signal
    done = [json.loads(p.read_text()) for p in runs.glob("*/run.json")]
    assert [(r["status"], r["parameters"]["seed"]) for r in done] == [("ok", 9)]  # the completed run is intact
