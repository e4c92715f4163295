"""Bad command lines: `vtrlab run | grid | figures | list` answer with ONE line on stderr and exit 2,
naming the bad value, before any kernel starts (no run directory appears).

Defect 10 of issue 15: CLI float parameters accepted inf/nan, a duplicated `parameters:` key in a
grid file silently dropped a sweep, `-p model --force` swallowed `--force`.
"""

from __future__ import annotations

import json

import pytest
from bad_cases import write_notebook
from typer.testing import CliRunner

from vtrlab.cli import app

PARAMS = """\
n: int = 2  # points
x: float = 0.5  # a number
names: list[str] = ['a']  # labels
mode: Literal['fast', 'slow'] = 'fast'  # a choice
opt: int | None = None  # optional
flag: bool = False  # a switch
model: str = 'organism'  # model"""

RUN = ["run", "notebooks/demo.ipynb"]

# (id, args, fragments the single error line must contain)
RUN_CASES = [
    ("no_notebook", ["run"], ("Missing argument", "notebook")),
    ("notebook_missing", ["run", "notebooks/nope.ipynb"], ("notebooks/nope.ipynb", "not found")),
    ("notebook_is_dir", ["run", "notebooks"], ("notebooks",)),
    ("notebook_not_json", ["run", "notebooks/garbage.ipynb"], ("garbage.ipynb", "not a readable")),
    ("notebook_no_parameters_cell", ["run", "notebooks/noparams.ipynb"], ("noparams", "found 0")),
    ("notebook_two_parameters_cells", ["run", "notebooks/twoparams.ipynb"], ("twoparams", "found 2")),
    ("notebook_bad_parameter_syntax", ["run", "notebooks/syntax.ipynb"], ("syntax", "does not parse")),
    ("notebook_unsupported_type", ["run", "notebooks/dicttype.ipynb"], ("'dict'", "supported")),
    ("notebook_default_not_literal", ["run", "notebooks/call.ipynb"], ("'n'", "literal")),
    ("notebook_named_dotdot", ["run", "notebooks/dots/...ipynb"], ("'..'", "no usable directory name")),
    ("unknown_parameter", [*RUN, "-p", "nn", "3"], ("'nn'", "accepted: n (int)")),
    ("int_word", [*RUN, "-p", "n", "two"], ("'two'", "'n'", "(int)")),
    ("int_float", [*RUN, "-p", "n", "1.5"], ("'1.5'", "'n'")),
    ("int_inf", [*RUN, "-p", "n", "inf"], ("'inf'",)),
    ("int_empty", [*RUN, "-p", "n", ""], ("''", "'n'")),
    ("float_inf", [*RUN, "-p", "x", "inf"], ("'inf'", "'x'", "finite")),
    ("float_minus_inf", [*RUN, "-p", "x", "-inf"], ("'-inf'", "finite")),
    ("float_nan", [*RUN, "-p", "x", "nan"], ("'nan'", "finite")),
    ("float_overflow", [*RUN, "-p", "x", "1e999"], ("'1e999'", "finite")),
    ("float_word", [*RUN, "-p", "x", "half"], ("'half'", "'x'")),
    ("bool_word", [*RUN, "-p", "flag", "maybe"], ("'maybe'", "'flag'")),
    ("literal_other", [*RUN, "-p", "mode", "medium"], ("'medium'", "['fast', 'slow']")),
    ("optional_word", [*RUN, "-p", "opt", "many"], ("'many'", "'opt'")),
    ("list_bad_json", [*RUN, "-p", "names", "[1,"], ("'[1,'", "'names'")),
    ("list_of_ints_for_str", [*RUN, "-p", "names", "[1, 2]"], ("'[1, 2]'", "string")),
    ("list_json_objects", [*RUN, "-p", "names", '[{"a": 1}]'], ("'names'", "string")),
    ("p_without_value", [*RUN, "-p", "n"], ("-p n", "NAME and a VALUE")),
    ("p_alone", [*RUN, "-p"], ("-p", "NAME and a VALUE")),
    ("p_value_is_force", [*RUN, "-p", "model", "--force"], ("'--force'", "looks like an option")),
    ("p_value_is_p", [*RUN, "-p", "model", "-p", "n", "3"], ("'-p'", "looks like an option")),
    ("p_name_is_option", [*RUN, "-p", "--force", "x"], ("'--force'",)),
    ("p_twice", [*RUN, "-p", "n", "1", "-p", "n", "2"], ("'n'", "more than once")),
    ("unknown_option", [*RUN, "--fast"], ("--fast",)),
    ("extra_argument", [*RUN, "other.ipynb"], ("other.ipynb",)),
    ("params_file_missing", [*RUN, "-f", "nope.yaml"], ("nope.yaml", "not found")),
    ("params_file_bad_yaml", [*RUN, "-f", "bad.yaml"], ("bad.yaml", "not valid YAML")),
    ("params_file_list", [*RUN, "-f", "list.yaml"], ("list.yaml", "mapping")),
    ("params_file_duplicate_key", [*RUN, "-f", "dup.yaml"], ("dup.yaml", "'n' given twice")),
    ("params_file_unknown", [*RUN, "-f", "unknown.yaml"], ("'zzz'", "accepted")),
    ("params_file_wrong_type", [*RUN, "-f", "wrongtype.yaml"], ("'three'", "'n'")),
    ("params_file_inf", [*RUN, "-f", "inf.yaml"], ("inf", "'x'", "finite")),
    ("params_file_nan", [*RUN, "-f", "nan.yaml"], ("nan", "'x'")),
    ("params_file_bool_for_int", [*RUN, "-f", "boolint.yaml"], ("True", "'n'")),
    ("params_file_str_for_int", [*RUN, "-f", "strint.yaml"], ("'3'", "'n'")),
    ("params_file_float_for_int", [*RUN, "-f", "floatint.yaml"], ("1.5", "'n'")),
    ("params_file_binary", [*RUN, "-f", "binary.yaml"], ("binary.yaml",)),
]

GRID_CASES = [
    ("grid_missing", ["grid", "nope.yaml"], ("nope.yaml", "not found")),
    ("grid_not_yaml", ["grid", "g_bad.yaml"], ("g_bad.yaml", "not valid YAML")),
    ("grid_a_list", ["grid", "g_list.yaml"], ("g_list.yaml", "mapping")),
    ("grid_unknown_key", ["grid", "g_unknown.yaml"], ("'sweep'",)),
    ("grid_both_notebook_keys", ["grid", "g_both.yaml"], ("either 'notebook' or 'notebooks'",)),
    ("grid_params_without_notebook", ["grid", "g_nonb.yaml"], ("no 'notebook(s)'",)),
    ("grid_params_not_mapping", ["grid", "g_paramslist.yaml"], ("'parameters' must be a mapping",)),
    ("grid_empty_sweep", ["grid", "g_emptysweep.yaml"], ("'n'", "empty list")),
    ("grid_duplicate_parameter", ["grid", "g_dup.yaml"], ("'n' given twice", "lines")),
    ("grid_duplicate_top_key", ["grid", "g_duptop.yaml"], ("'parameters' given twice",)),
    ("grid_jobs_not_list", ["grid", "g_jobsdict.yaml"], ("'jobs' must be a list",)),
    ("grid_job_no_notebook", ["grid", "g_jobnonb.yaml"], ("jobs[0]",)),
    ("grid_job_extra_key", ["grid", "g_jobextra.yaml"], ("jobs[0]",)),
    ("grid_notebook_not_string", ["grid", "g_nbint.yaml"], ("notebook must be a path string", "got 3")),
    ("grid_notebook_missing", ["grid", "g_nbmissing.yaml"], ("'notebooks/missing.ipynb'", "not found")),
    ("grid_unknown_parameter", ["grid", "g_unknownparam.yaml"], ("'zzz'", "accepted")),
    ("grid_wrong_type", ["grid", "g_wrongtype.yaml"], ("'many'", "'n'")),
    ("grid_float_inf", ["grid", "g_inf.yaml"], ("inf", "'x'", "finite")),
    ("grid_float_nan_in_sweep", ["grid", "g_nan.yaml"], ("nan", "'x'")),
    ("grid_bool_for_int", ["grid", "g_boolint.yaml"], ("True", "'n'")),
    ("grid_no_jobs", ["grid", "g_empty.yaml"], ("no jobs",)),
    ("grid_workers_zero", ["grid", "g_ok.yaml", "--workers", "0"], ("--workers", "0")),
    ("grid_workers_negative", ["grid", "g_ok.yaml", "--workers", "-2"], ("-2",)),
    ("grid_workers_word", ["grid", "g_ok.yaml", "--workers", "many"], ("--workers 'many'", "an integer >= 1")),
    ("grid_workers_float", ["grid", "g_ok.yaml", "--workers", "1.5"], ("--workers '1.5'", "an integer >= 1")),
    ("grid_workers_abc", ["grid", "g_ok.yaml", "--workers", "abc"], ("--workers 'abc'", "an integer >= 1")),
    ("grid_workers_inf", ["grid", "g_ok.yaml", "--workers", "inf"], ("--workers 'inf'", "an integer >= 1")),
    ("grid_workers_empty", ["grid", "g_ok.yaml", "--workers", ""], ("--workers ''", "an integer >= 1")),
    ("grid_timeout_zero", ["grid", "g_ok.yaml", "--timeout-min", "0"], ("--timeout-min '0'", "an integer >= 1")),
    ("grid_timeout_float", ["grid", "g_ok.yaml", "--timeout-min", "2.5"], ("--timeout-min '2.5'",)),
    ("grid_backend_unknown", ["grid", "g_ok.yaml", "--backend", "dask"], ("'dask'", "local, ray, slurm")),
    ("grid_slurm_cluster_unknown", ["grid", "g_ok.yaml", "--slurm-cluster", "pbs"], ("'pbs'",)),
    ("grid_timeout_word", ["grid", "g_ok.yaml", "--timeout-min", "long"], ("--timeout-min 'long'", "integer")),
    ("grid_no_file", ["grid"], ("Missing argument", "grid_file")),
]

OTHER_CASES = [
    ("figures_only_nomatch", ["figures", "--only", "99"], ("'99'", "matches no notebook")),
    ("figures_device_tpu", ["figures", "--device", "tpu"], ("'tpu'", "cpu or cuda")),
    ("figures_unknown_option", ["figures", "--fast"], ("--fast",)),
    ("unknown_command", ["rnu"], ("rnu",)),
    ("list_extra_argument", ["list", "x"], ("x",)),
]

YAML_FILES = {
    "bad.yaml": "n: [1, 2\n",
    "list.yaml": "- n\n- 3\n",
    "dup.yaml": "n: 1\nx: 0.1\nn: 2\n",
    "unknown.yaml": "zzz: 1\n",
    "wrongtype.yaml": "n: three\n",
    "inf.yaml": "x: .inf\n",
    "nan.yaml": "x: .nan\n",
    "boolint.yaml": "n: true\n",
    "strint.yaml": "n: '3'\n",
    "floatint.yaml": "n: 1.5\n",
    "g_bad.yaml": "notebook: [\n",
    "g_list.yaml": "- notebooks/demo.ipynb\n",
    "g_unknown.yaml": "notebook: notebooks/demo.ipynb\nsweep: {n: [1, 2]}\n",
    "g_both.yaml": "notebook: notebooks/demo.ipynb\nnotebooks: [notebooks/demo.ipynb]\n",
    "g_nonb.yaml": "parameters: {n: [1, 2]}\n",
    "g_paramslist.yaml": "notebook: notebooks/demo.ipynb\nparameters: [1, 2]\n",
    "g_emptysweep.yaml": "notebook: notebooks/demo.ipynb\nparameters: {n: []}\n",
    "g_dup.yaml": "notebook: notebooks/demo.ipynb\nparameters:\n  n: [1, 2]\n  x: 0.1\n  n: [3]\n",
    "g_duptop.yaml": "notebook: notebooks/demo.ipynb\nparameters: {n: 1}\nparameters: {n: 2}\n",
    "g_jobsdict.yaml": "jobs: {notebook: notebooks/demo.ipynb}\n",
    "g_jobnonb.yaml": "jobs: [{parameters: {n: 1}}]\n",
    "g_jobextra.yaml": "jobs: [{notebook: notebooks/demo.ipynb, seed: 1}]\n",
    "g_nbint.yaml": "notebook: 3\n",
    "g_nbmissing.yaml": "notebook: notebooks/missing.ipynb\n",
    "g_unknownparam.yaml": "notebook: notebooks/demo.ipynb\nparameters: {zzz: [1]}\n",
    "g_wrongtype.yaml": "notebook: notebooks/demo.ipynb\nparameters: {n: [1, many]}\n",
    "g_inf.yaml": "notebook: notebooks/demo.ipynb\nparameters: {x: .inf}\n",
    "g_nan.yaml": "notebook: notebooks/demo.ipynb\nparameters: {x: [0.5, .nan]}\n",
    "g_boolint.yaml": "notebook: notebooks/demo.ipynb\nparameters: {n: [1, true]}\n",
    "g_empty.yaml": "{}\n",
    "g_ok.yaml": "notebook: notebooks/demo.ipynb\nparameters: {n: [1, 2]}\n",
}


def build_project(root):
    """The notebooks and YAML files the rows refer to, under `root`."""
    nbs = root / "notebooks"
    write_notebook(nbs / "demo.ipynb", PARAMS, "print(n)")
    write_notebook(nbs / "syntax.ipynb", "n: int = = 2", "print(n)")
    write_notebook(nbs / "dicttype.ipynb", "d: dict = {}  # no", "print(d)")
    write_notebook(nbs / "call.ipynb", "n: int = int('3')  # no", "print(n)")
    write_notebook(nbs / "dots" / "...ipynb", "n: int = 1  # n", "print(n)")
    (nbs / "garbage.ipynb").write_text("{not json")
    nb = json.loads((nbs / "demo.ipynb").read_text())
    nb["cells"][1]["metadata"]["tags"] = []
    (nbs / "noparams.ipynb").write_text(json.dumps(nb))
    nb["cells"][1]["metadata"]["tags"] = ["parameters"]
    nb["cells"].append(dict(nb["cells"][1]))
    (nbs / "twoparams.ipynb").write_text(json.dumps(nb))
    for name, text in YAML_FILES.items():
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (root / "pyproject.toml").write_text("")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return build_project(tmp_path_factory.mktemp("cli"))


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [c[1:] for c in RUN_CASES + GRID_CASES + OTHER_CASES],
    ids=[c[0] for c in RUN_CASES + GRID_CASES + OTHER_CASES],
)
def test_bad_command_line(project, monkeypatch, args, fragments):
    monkeypatch.chdir(project)
    monkeypatch.delenv("VTRLAB_ROOT", raising=False)
    line = _one_line_error(CliRunner().invoke(app, args))
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not (project / "runs").exists()  # refused before any kernel or run directory


def test_list_without_notebooks(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VTRLAB_ROOT", raising=False)
    assert "no notebooks found" in _one_line_error(CliRunner().invoke(app, ["list"]))


def test_negative_numbers_are_values_not_options(project, monkeypatch):
    from vtrlab.cli import join_param_pairs

    sep = "\x1f"
    assert join_param_pairs(["run", "nb", "-p", "x", "-0.5", "-p", "n", "-3", "--force"]) == [
        "run",
        "nb",
        "-p",
        f"x{sep}-0.5",
        "-p",
        f"n{sep}-3",
        "--force",
    ]
