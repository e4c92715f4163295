"""Parameters cell parsing and value checking (no kernel involved)."""

from __future__ import annotations

import pytest

from vtrlab.runner.errors import ParameterError
from vtrlab.runner.params import parse_parameter_source, read_parameters

CELL = """\
n_samples: int = 64  # number of held-out organism samples
lr: float = 1e-3  # learning rate
model: str = "organism"  # model name or path
plot: bool = True  # draw figures
layers: list[int] = [0, 2]  # LM layers
scales: list[float] = [0.5]  # scales
names: list[str] = []  # names
checkpoint: str | None = None  # optional checkpoint
limit: Optional[int] = 3  # optional limit
device: Literal["cpu", "cuda"] = "cpu"  # device
"""


@pytest.fixture
def spec(make_notebook):
    return read_parameters(make_notebook("nb", CELL))


def test_reads_names_types_defaults_help(spec):
    got = {p.name: (str(p.type), p.default, p.help) for p in spec}
    assert got == {
        "n_samples": ("int", 64, "number of held-out organism samples"),
        "lr": ("float", 1e-3, "learning rate"),
        "model": ("str", "organism", "model name or path"),
        "plot": ("bool", True, "draw figures"),
        "layers": ("list[int]", [0, 2], "LM layers"),
        "scales": ("list[float]", [0.5], "scales"),
        "names": ("list[str]", [], "names"),
        "checkpoint": ("str | None", None, "optional checkpoint"),
        "limit": ("int | None", 3, "optional limit"),
        "device": ("Literal['cpu', 'cuda']", "cpu", "device"),
    }
    assert spec.cell_index == 1  # after the markdown title cell
    assert list(spec.defaults) == [p.name for p in spec]  # notebook order kept


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("n_samples", "8", 8),
        ("lr", "0.5", 0.5),
        ("lr", "2", 2.0),
        ("model", "tiny-llava", "tiny-llava"),
        ("plot", "false", False),
        ("plot", "Yes", True),
        ("layers", "1,2,3", [1, 2, 3]),
        ("layers", "[4, 5]", [4, 5]),
        ("layers", "", []),
        ("scales", "0.25,1", [0.25, 1.0]),
        ("names", "a,b", ["a", "b"]),
        ("checkpoint", "none", None),
        ("checkpoint", "/tmp/x", "/tmp/x"),
        ("limit", "null", None),
        ("limit", "7", 7),
        ("device", "cuda", "cuda"),
    ],
)
def test_command_line_strings_are_converted(spec, name, text, expected):
    value = spec.resolve({name: text}, from_strings=True)[name]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "name, value, expected",
    [("lr", 1, 1.0), ("layers", [1], [1]), ("checkpoint", None, None), ("names", ["x"], ["x"]), ("plot", False, False)],
)
def test_typed_values_are_accepted(spec, name, value, expected):
    value_out = spec.resolve({name: value})[name]
    assert value_out == expected and type(value_out) is type(expected)


def test_unknown_name_is_named_with_accepted_list(spec):
    with pytest.raises(ParameterError) as err:
        spec.resolve({"not_a_param": "1"}, from_strings=True)
    msg = str(err.value)
    assert "'not_a_param'" in msg
    assert "n_samples (int)" in msg and "layers (list[int])" in msg and "checkpoint (str | None)" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "name, value, from_strings",
    [
        ("n_samples", "abc", True),
        ("n_samples", "1.5", True),
        ("plot", "maybe", True),
        ("layers", "1,x", True),
        ("layers", "[1, ", True),
        ("device", "tpu", True),
        ("n_samples", 1.5, False),
        ("n_samples", True, False),  # bool is not an int here
        ("n_samples", "8", False),  # YAML strings are not silently converted
        ("model", 3, False),
        ("lr", "fast", False),
        ("layers", 3, False),
        ("layers", [1, "a"], False),
        ("n_samples", None, False),
    ],
)
def test_wrong_values_name_parameter_and_value(spec, name, value, from_strings):
    with pytest.raises(ParameterError) as err:
        spec.resolve({name: value}, from_strings=from_strings)
    msg = str(err.value)
    assert repr(name) in msg and repr(value) in msg and "accepted:" in msg


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("n = 3  # no annotation", "is not `name: type = default  # help`"),
        ("n: int  # no default", "has no default"),
        ("n: int = len([1])  # call", "must be a literal"),
        ("n: dict = {}  # dict", "unsupported type 'dict'"),
        ("n: int | str = 1  # union", "unsupported type"),
        ("n: int = 'x'  # mismatch", "does not match int"),
        ("n: int = 1  # a\nn: int = 2  # b", "defined twice"),
        ("import os", "is not `name: type"),
    ],
)
def test_malformed_parameters_cell(source, fragment):
    with pytest.raises(ParameterError, match="nb") as err:
        parse_parameter_source(source, "nb")
    assert fragment in str(err.value)


def test_comment_lines_and_missing_help(make_notebook):
    params = parse_parameter_source("# a comment\n\nseed: int = 0\n")
    assert [(p.name, p.help) for p in params] == [("seed", "")]


def test_notebook_needs_exactly_one_parameters_cell(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("x: int = 1  # x")])
    path = tmp_path / "none.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(ParameterError, match="exactly one cell tagged 'parameters', found 0"):
        read_parameters(path)
    nb.cells = [new_code_cell("x: int = 1  # x", metadata={"tags": ["parameters"]}) for _ in range(2)]
    nbformat.write(nb, path)
    with pytest.raises(ParameterError, match="found 2"):
        read_parameters(path)
    with pytest.raises(ParameterError, match="notebook not found: 'missing.ipynb'"):
        read_parameters("missing.ipynb")
