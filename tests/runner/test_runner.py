"""Runner: run directories, failure reports, resume/--force, figures manifest, notebook helpers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from vtrlab.runner import paths
from vtrlab.runner.outputs import log_metrics, save_table
from vtrlab.runner.provenance import publish_figures
from vtrlab.runner.run import prepare_job, run_hash, run_job

PARAMS = (
    "n: int = 3  # points\nfail: bool = False  # raise in the body\n"
    "seed: int = 0  # seed\ndevice: str = 'cpu'  # device"
)

# Records where it ran (temp dir, and whether the final dir existed meanwhile), then saves one
# figure (plain matplotlib with the vtrlab save path), one table and metrics.
BODY = """\
import os
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from vtrlab.runner import save_figure
from vtrlab.runner import save_table, log_metrics
run_dir = Path(os.environ["VTRLAB_RUN_DIR"])
digest = run_dir.name.split("-")[1]
if fail:
    raise ZeroDivisionError("boom at n=%d" % n)
fig, ax = plt.subplots(figsize=(2, 1.5))
ax.plot(range(n))
save_figure(fig, "line")
save_table(pd.DataFrame({"x": list(range(n)), "y": [i * i for i in range(n)]}), "squares")
log_metrics({"n": n, "tmp_name": run_dir.name, "final_existed": (run_dir.parent / digest).exists(),
             "figure_dir": os.environ["VTRLAB_FIGURE_DIR"], "cwd": os.getcwd()})
"""


def git(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(
        ["git", "-C", str(root), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


@pytest.fixture
def project(tmp_path, make_notebook):
    nb = make_notebook("demo", PARAMS, BODY)
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("runs/\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path, nb


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.xdist_group("runner")
def test_run_resume_force_and_manifest(project):
    root, nb = project
    job = prepare_job(nb, {"n": "5"}, from_strings=True)
    result = run_job(job, root)
    assert result.status == "ok", result.line()
    run_dir = root / "runs" / "demo" / run_hash(nb, {"n": 5, "fail": False, "seed": 0, "device": "cpu"})
    assert run_dir.is_dir() and Path(result.run_dir).resolve() == run_dir

    # complete run dir, written in a hidden temp dir that was renamed at the end
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()) == [
        "demo.ipynb",
        "figures/line.pdf",
        "figures/line.png",
        "metrics.json",
        "run.json",
        "tables/squares.csv",
        "tables/squares.parquet",
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["final_existed"] is False
    assert metrics["tmp_name"].startswith(f".tmp-{run_dir.name}-")
    assert metrics["cwd"] == str(nb.parent.resolve())  # kernel runs beside the notebook, as in Jupyter
    assert not [p for p in (root / "runs" / "demo").iterdir() if p.name.startswith(".")]
    table = pd.read_parquet(run_dir / "tables/squares.parquet")
    pd.testing.assert_frame_equal(table, pd.read_csv(run_dir / "tables/squares.csv"))
    assert table["y"].tolist() == [0, 1, 4, 9, 16]
    # the kernel's peak memory, written at its exit (no CUDA used: GPU entries are null)
    res = json.loads((run_dir / "run.json").read_text())["resources"]
    assert 0.01 < res["cpu_peak_rss_gib"] < 64 and res["gpu_peak_allocated_gib"] is None and res["gpu"] == {}

    # figures published with provenance; sha256 matches the bytes on disk
    manifest = json.loads((root / "figures/MANIFEST.json").read_text())
    assert sorted(manifest) == ["figures/demo/line.pdf", "figures/demo/line.png"]
    head = git(root, "rev-parse", "HEAD")
    for key, rec in manifest.items():
        assert rec["sha256"] == sha(root / key) == sha(run_dir / "figures" / Path(key).name)
        assert rec["notebook"] == "demo" and rec["parameters"] == {"n": 5, "fail": False, "seed": 0, "device": "cpu"}
        assert rec["git_commit"] == head and rec["git_dirty"] is False  # runs/ and figures/ are outputs
        assert set(rec["versions"]) == {"python", "torch", "transformers", "vtrlab"} and rec["versions"]["vtrlab"]
        assert rec["seed"] == 0 and rec["device"] == "cpu" and rec["duration_s"] > 0
        assert rec["run_dir"] == f"runs/demo/{run_dir.name}"

    # resume: the complete run is skipped without starting a kernel
    stamp = (run_dir / "run.json").stat().st_mtime_ns
    again = run_job(prepare_job(nb, {"n": 5}), root)
    assert again.status == "skipped" and "already complete" in again.line()
    assert (run_dir / "run.json").stat().st_mtime_ns == stamp

    # --force re-runs into the same directory; an edited tracked file makes the record dirty
    nb.write_text(nb.read_text().replace("# points", "# number of points"))
    forced = run_job(prepare_job(nb, {"n": 5}, force=True), root)
    assert forced.status == "ok"
    assert (run_dir / "run.json").stat().st_mtime_ns != stamp
    assert json.loads((run_dir / "metrics.json").read_text())["tmp_name"] != metrics["tmp_name"]
    manifest = json.loads((root / "figures/MANIFEST.json").read_text())
    assert all(rec["git_dirty"] is True for rec in manifest.values())


@pytest.mark.xdist_group("runner")
def test_failure_is_reported_and_kept(project):
    root, nb = project
    result = run_job(prepare_job(nb, {"fail": True}), root)
    assert result.status == "failed"
    # cell 2 of the source notebook (markdown 0, parameters 1), not papermill's shifted index
    assert result.error == {"cell": 2, "ename": "ZeroDivisionError", "evalue": "boom at n=3"}
    line = result.line()
    assert "\n" not in line and "cell 2" in line and "ZeroDivisionError: boom at n=3" in line
    digest = run_hash(nb, {"n": 3, "fail": True, "seed": 0, "device": "cpu"})
    failed_dir = root / "runs" / "demo" / f"{digest}.failed"
    assert (failed_dir / "demo.ipynb").is_file()
    record = json.loads((failed_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["resources"]["cpu_peak_rss_gib"] > 0  # also after a failing cell
    assert not (root / "runs" / "demo" / digest).exists()  # complete or absent
    assert not (root / "figures" / "demo").exists()
    executed = json.loads((failed_dir / "demo.ipynb").read_text())
    assert any(o.get("ename") == "ZeroDivisionError" for c in executed["cells"] for o in c.get("outputs", []))


def _fake_run(dir_: Path, names: list[str]) -> Path:
    dir_.mkdir(parents=True)
    for name in names:
        (dir_ / name).write_bytes(name.encode())
    return dir_


def test_publish_replaces_stale_figures_and_keeps_grid_subfolders(tmp_path):
    dest = tmp_path / "figures" / "nb"
    publish_figures(tmp_path, _fake_run(tmp_path / "r1", ["a.pdf", "a.png", "b.pdf", "notes.txt"]), dest, {"hash": "1"})
    publish_figures(tmp_path, _fake_run(tmp_path / "g", ["a.pdf"]), dest / "abc", {"hash": "g"})
    publish_figures(tmp_path, _fake_run(tmp_path / "r2", ["a.pdf", "a.png"]), dest, {"hash": "2"})
    manifest = json.loads((tmp_path / "figures/MANIFEST.json").read_text())
    assert sorted(manifest) == ["figures/nb/a.pdf", "figures/nb/a.png", "figures/nb/abc/a.pdf"]
    assert not (dest / "b.pdf").exists() and not (dest / "notes.txt").exists()
    assert manifest["figures/nb/a.pdf"]["hash"] == "2" and manifest["figures/nb/abc/a.pdf"]["hash"] == "g"
    assert manifest["figures/nb/a.png"]["sha256"] == hashlib.sha256(b"a.png").hexdigest()


def test_notebook_helpers_outside_the_runner(tmp_path, monkeypatch):
    for var in (paths.ENV_RUN_DIR, paths.ENV_FIGURE_DIR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(paths.ENV_ROOT, str(tmp_path))
    monkeypatch.setenv(paths.ENV_NOTEBOOK, "01_demo")
    import numpy as np

    log_metrics({"acc": np.float32(0.5), "n": np.int64(3)})
    log_metrics({"acc": 0.75, "nan": float("nan")})
    out = tmp_path / "runs" / "01_demo" / "interactive"
    assert json.loads((out / "metrics.json").read_text()) == {"acc": 0.75, "n": 3, "nan": "nan"}
    df = pd.DataFrame({"layer": [0, 1]}, index=pd.Index(["a", "b"], name="k"))
    save_table(df, "by_layer")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "tables/by_layer.parquet"), df)
    assert (out / "tables/by_layer.csv").read_text().splitlines()[0] == "k,layer"
    assert paths.figure_dir() == tmp_path / "figures" / "01_demo"
    with pytest.raises(ValueError, match="plain file stem"):
        save_table(df, "../escape")
    with pytest.raises(TypeError, match="DataFrame"):
        save_table([1, 2], "x")
    with pytest.raises(TypeError, match="dict"):
        log_metrics([("a", 1)])


def test_resources_read_gpu_peaks_only_when_cuda_was_used(monkeypatch, tmp_path):
    """GPU peaks per device from torch's allocator (stub torch: no GPU here); CUDA is never initialised by it."""
    import sys
    import types

    from vtrlab.runner import resources

    gib = 1 << 30
    cuda = types.SimpleNamespace(
        is_initialized=lambda: True,
        device_count=lambda: 2,
        max_memory_allocated=lambda i: (3 + i) * gib,
        max_memory_reserved=lambda i: (4 + i) * gib,
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    got = resources.peak()
    assert got["gpu"] == {
        "0": {"allocated_gib": 3.0, "reserved_gib": 4.0},
        "1": {"allocated_gib": 4.0, "reserved_gib": 5.0},
    }
    assert got["gpu_peak_allocated_gib"] == 4.0 and got["gpu_peak_reserved_gib"] == 5.0
    cuda.is_initialized = lambda: False
    assert resources.peak()["gpu_peak_allocated_gib"] is None
    monkeypatch.setenv(paths.ENV_RUN_DIR, str(tmp_path))
    resources.write()
    assert json.loads((tmp_path / resources.FILE).read_text())["gpu"] == {}


def test_source_commit_from_the_launcher_wins_over_a_stale_copy(tmp_path, monkeypatch):
    """A staging copy (GPU machine, cluster) records the commit its launcher names, not its own stale .git."""
    from vtrlab.runner.provenance import git_state

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.delenv("VTRLAB_SOURCE_COMMIT", raising=False)
    assert git_state(tmp_path)["git_commit"] is None  # a repository without a commit: HEAD does not resolve
    monkeypatch.setenv("VTRLAB_SOURCE_COMMIT", "0123abcd" * 5)
    assert git_state(tmp_path) == {"git_commit": "0123abcd" * 5, "git_dirty": None}
    monkeypatch.setenv("VTRLAB_SOURCE_DIRTY", "1")
    assert git_state(tmp_path)["git_dirty"] is True
