"""Bad files on disk and bad values for the notebook-side helpers: notebooks whose parameters
cell is malformed, table/metric/figure names that would escape the run directory, and the atomic
write helpers (`vtrlab.io`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from bad_cases import Case, params, run_case, write_notebook

from vtrlab.io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from vtrlab.runner import paths
from vtrlab.runner.errors import ParameterError, RunnerError
from vtrlab.runner.outputs import log_metrics, save_table
from vtrlab.runner.params import read_parameters
from vtrlab.runner.run import notebook_code


def NB(parameters: str):
    def call(tmp: Path):
        return read_parameters(write_notebook(tmp / "nb.ipynb", parameters, "print(1)"))

    return call


def RAW(text: str | bytes, name: str = "raw.ipynb"):
    def call(tmp: Path):
        path = tmp / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return read_parameters(path)

    return call


def in_run(fn):
    """Call `fn()` with the runner's env vars pointing at `tmp/run`."""

    def call(tmp: Path):
        saved = {k: os.environ.get(k) for k in (paths.ENV_RUN_DIR, paths.ENV_FIGURE_DIR)}
        os.environ[paths.ENV_RUN_DIR] = str(tmp / "run")
        os.environ[paths.ENV_FIGURE_DIR] = str(tmp / "run" / "figures")
        try:
            return fn(tmp)
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)

    return call


def fig(name):
    def call(tmp):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from vtrlab.runner import save_figure

        figure, _ = plt.subplots(figsize=(1, 1))
        try:
            return save_figure(figure, name)
        finally:
            plt.close(figure)

    return in_run(call)


DF = pd.DataFrame({"a": [1, 2]})


def _fails_half_way(tmp: Path):
    with atomic_path(tmp / "out.bin") as t:
        t.write_bytes(b"partial")
        raise RuntimeError("writer died at 'out.bin'")


def _dir_fails(tmp: Path):
    (tmp / "d").mkdir()
    (tmp / "d" / "old.txt").write_text("old")
    with atomic_dir(tmp / "d") as t:
        (t / "new.txt").write_text("new")
        raise RuntimeError("writer died in 'd'")


def _nothing_left(tmp: Path) -> bool:
    return [p.name for p in tmp.iterdir() if ".tmp" in p.name] == []


CASES = [
    # parameters cells
    Case("params_syntax", NB("n: int = = 1"), ParameterError, ("does not parse", "line 1")),
    Case("params_plain_assignment", NB("n = 1"), ParameterError, ("'n = 1'", "name: type = default")),
    Case("params_no_default", NB("n: int"), ParameterError, ("'n'", "no default")),
    Case("params_call_default", NB("n: int = len('ab')"), ParameterError, ("'n'", "literal")),
    Case("params_wrong_default_type", NB("n: int = 'two'  # n"), ParameterError, ("'n'", "int")),
    Case("params_float_default_for_int", NB("n: int = 1.5"), ParameterError, ("'n'",)),
    Case("params_inf_default", NB("x: float = 1e999"), ParameterError, ("'x'", "finite")),
    Case("params_bool_default_for_int", NB("n: int = True"), ParameterError, ("'n'",)),
    Case("params_unsupported_type", NB("d: dict = {}"), ParameterError, ("'dict'", "supported")),
    Case("params_union_type", NB("v: int | str = 1"), ParameterError, ("'int | str'",)),
    Case("params_nested_list", NB("v: list[list[int]] = []"), ParameterError, ("list[list[int]]",)),
    Case("params_literal_float", NB("v: Literal[1.5] = 1.5"), ParameterError, ("Literal[1.5]",)),
    Case("params_defined_twice", NB("n: int = 1\nn: int = 2"), ParameterError, ("'n'", "twice")),
    Case("params_import", NB("import os"), ParameterError, ("'import os'",)),
    Case(
        "params_ok_optional",
        NB("n: int | None = None  # maybe"),
        None,
        check=lambda spec: spec.parameters["n"].type.optional and spec.defaults == {"n": None},
    ),
    Case("params_ok_empty", NB(""), None, check=lambda spec: spec.defaults == {}),
    Case("notebook_not_json", RAW("{nope"), ParameterError, ("raw.ipynb", "not a readable")),
    Case("notebook_binary", RAW(b"\xff\xfe\x00"), ParameterError, ("raw.ipynb",)),
    Case("notebook_no_cells", RAW('{"metadata": {}}'), ParameterError, ("raw.ipynb",)),
    Case("notebook_cells_not_list", RAW('{"cells": 3}'), ParameterError, ("raw",)),
    Case(
        "notebook_markdown_parameters",
        RAW(json.dumps({"cells": [{"cell_type": "markdown", "metadata": {"tags": ["parameters"]}, "source": "x"}]})),
        ParameterError,
        ("markdown", "not code"),
    ),
    Case("notebook_missing", lambda tmp: read_parameters(tmp / "gone.ipynb"), ParameterError, ("gone.ipynb",)),
    Case("notebook_code_missing", lambda tmp: notebook_code(tmp / "x.ipynb"), RunnerError, ("x.ipynb",)),
    # names that would leave the run / figure directory
    Case("table_with_dir", in_run(lambda tmp: save_table(DF, "../escape")), ValueError, ("'../escape'",)),
    Case("table_absolute", in_run(lambda tmp: save_table(DF, "/tmp/x")), ValueError, ("'/tmp/x'",)),
    Case("table_hidden", in_run(lambda tmp: save_table(DF, ".hidden")), ValueError, ("'.hidden'",)),
    Case("table_with_extension", in_run(lambda tmp: save_table(DF, "t.csv")), ValueError, ("'t.csv'",)),
    Case("table_empty_name", in_run(lambda tmp: save_table(DF, "")), ValueError, ("''",)),
    Case("table_not_dataframe", in_run(lambda tmp: save_table({"a": 1}, "t")), TypeError, ("dict",)),
    Case(
        "table_ok",
        in_run(lambda tmp: save_table(DF, "t")),
        None,
        check=lambda out: [p.name for p in out] == ["t.parquet", "t.csv"],
    ),
    Case("metrics_not_dict", in_run(lambda tmp: log_metrics([1, 2])), TypeError, ("list",)),
    Case("metrics_int_key", in_run(lambda tmp: log_metrics({1: 2})), TypeError, ("1",)),
    Case(
        "metrics_nan_kept_readable",
        in_run(
            lambda tmp: json.loads(
                log_metrics({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(0.5)}).read_text()
            )
        ),
        None,
        check=lambda m: m == {"a": "nan", "b": [1.0, "inf"], "c": 0.5},
    ),
    Case("figure_with_dir", fig("../up"), ValueError, ("'../up'",)),
    Case("figure_with_extension", fig("plot.png"), ValueError, ("'plot.png'",)),
    Case("figure_not_str", fig(3), ValueError, ("3",)),
    Case("figure_ok", fig("plot"), None, check=lambda out: sorted(p.suffix for p in out) == [".pdf", ".png"]),
    # the atomic helpers
    Case("atomic_bytes_given_str", lambda tmp: atomic_write_bytes(tmp / "a", "text"), TypeError, ("str",)),
    Case("atomic_text_given_bytes", lambda tmp: atomic_write_text(tmp / "a", b"x"), TypeError, ("bytes",)),
    Case(
        "atomic_json_nan",
        lambda tmp: atomic_write_json(tmp / "a.json", {"x": float("nan")}),
        ValueError,
        ("a.json", "NaN"),
    ),
    Case("atomic_json_object", lambda tmp: atomic_write_json(tmp / "a.json", {"x": object()}), TypeError, ("object",)),
    Case("atomic_writer_fails", lambda tmp: _fails_half_way(tmp), RuntimeError, ("'out.bin'",), ours=False),
    Case(
        "atomic_writer_fails_leaves_nothing",
        lambda tmp: (_try(_fails_half_way, tmp), _nothing_left(tmp), (tmp / "out.bin").exists()),
        None,
        check=lambda r: r[1] and not r[2],
    ),
    Case(
        "atomic_dir_fails_keeps_old",
        lambda tmp: (_try(_dir_fails, tmp), sorted(os.listdir(tmp / "d")), _nothing_left(tmp)),
        None,
        check=lambda r: r[1] == ["old.txt"] and r[2],
    ),
    Case("atomic_dir_replaces_whole", lambda tmp: _replace_dir_ok(tmp), None, check=lambda r: r == ["new.txt"]),
]


def _try(fn, tmp):
    try:
        fn(tmp)
    except RuntimeError:
        pass


def _replace_dir_ok(tmp: Path):
    (tmp / "d").mkdir()
    (tmp / "d" / "old.txt").write_text("old")
    with atomic_dir(tmp / "d") as t:
        (t / "new.txt").write_text("new")
    return sorted(os.listdir(tmp / "d"))


@params(CASES)
def test_bad_files(case, tmp_path):
    run_case(case, tmp_path)
