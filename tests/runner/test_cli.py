"""The `vtrlab` command: one-line errors before any kernel, list/run/figures/grid end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vtrlab.cli import app

PARAMS = (
    "n: int = 2  # points\nnames: list[str] = ['a']  # labels\n"
    "device: str = 'cpu'  # device\nfail: bool = False  # raise"
)
BODY = """\
from vtrlab.runner import log_metrics
assert not fail, "asked to fail"
log_metrics({"n": n, "names": names, "device": device})
"""


@pytest.fixture
def project(tmp_path, make_notebook, monkeypatch):
    make_notebook("01_demo", PARAMS, BODY)
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VTRLAB_ROOT", raising=False)
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(app, list(args))


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_unknown_parameter_via_console_script(project):
    # the script installed beside this interpreter (make test runs .venv/bin/python, PATH untouched)
    exe = Path(sys.executable).parent / "vtrlab"
    assert exe.is_file(), f"console script missing: {exe} (is the package installed in this environment?)"
    done = subprocess.run(
        [str(exe), "run", "notebooks/01_demo.ipynb", "-p", "not_a_param", "1"], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert (
        "not_a_param" in done.stderr
        and "accepted: n (int), names (list[str]), device (str), fail (bool)" in done.stderr
    )
    assert not (project / "runs").exists()  # rejected before any kernel or run directory


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "notebooks/01_demo.ipynb", "-p", "n", "two"], "bad value 'two' for parameter 'n' (int)"),
        (["run", "notebooks/01_demo.ipynb", "-p", "n"], "-p needs a NAME and a VALUE"),
        (["run", "notebooks/missing.ipynb"], "notebook not found: 'notebooks/missing.ipynb'"),
        (["figures", "--only", "99"], "--only '99' matches no notebook; available: 01_demo"),
        (["figures", "--device", "tpu"], "--device must be cpu or cuda"),
        (["grid", "GRID.yaml", "--backend", "mpi"], "--backend 'mpi' unknown; accepted: local, ray, slurm"),
        (["grid", "missing.yaml"], "grid file not found"),
    ],
)
def test_errors_are_one_line(project, args, fragment):
    (project / "GRID.yaml").write_text("notebook: notebooks/01_demo.ipynb\n")
    assert fragment in one_line_error(invoke(*args))


def test_bad_yaml_parameter_file(project):
    (project / "p.yaml").write_text("n: 'three'\n")
    line = one_line_error(invoke("run", "notebooks/01_demo.ipynb", "-f", "p.yaml"))
    assert "'three'" in line and "'n'" in line


def test_grid_file_with_unknown_parameter(project):
    (project / "GRID.yaml").write_text("notebook: notebooks/01_demo.ipynb\nparameters: {steps: [1, 2]}\n")
    assert "unknown parameter 'steps'" in one_line_error(invoke("grid", "GRID.yaml"))


def test_list_shows_types_defaults_help(project):
    result = invoke("list")
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "01_demo",
        "    n: int = 2  # points",
        "    names: list[str] = ['a']  # labels",
        "    device: str = 'cpu'  # device",
        "    fail: bool = False  # raise",
    ]


@pytest.mark.xdist_group("runner")
def test_run_with_file_and_cli_values_then_figures_and_failure(project):
    (project / "p.yaml").write_text("n: 5\nnames: [x, y]\n")
    result = invoke("run", "notebooks/01_demo.ipynb", "-f", "p.yaml", "-p", "n", "7")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok ")
    run_dir = next((project / "runs/01_demo").iterdir())
    assert json.loads((run_dir / "metrics.json").read_text()) == {"n": 7, "names": ["x", "y"], "device": "cpu"}

    result = invoke("figures", "--only", "01", "--device", "cuda")  # device is only passed through here
    assert result.exit_code == 0, result.output
    records = [json.loads(p.read_text()) for p in (project / "runs/01_demo").glob("*/run.json")]
    assert sorted(r["device"] for r in records) == ["cpu", "cuda"]

    result = invoke("run", "notebooks/01_demo.ipynb", "-p", "fail", "true")
    assert result.exit_code == 1
    assert "FAILED" in result.output and "cell 2: AssertionError: asked to fail" in result.output


def test_organism_subcommand(project):
    from vtrlab.cli import organism_cli_available

    result = invoke("organism", "--help")
    if organism_cli_available():
        assert result.exit_code == 0 and "Usage" in result.output
    else:
        assert "vtrlab.organism.cli not found" in one_line_error(result)
