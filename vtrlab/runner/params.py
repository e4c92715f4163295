"""A notebook's parameters: read them from its `parameters` cell, check user values against them.

The `parameters`-tagged cell holds only annotated assignments with a help comment::

    n_samples: int = 64  # number of held-out organism samples
    layers: list[int] = [0, 1]  # LM layers to plot
    checkpoint: str | None = None  # optional local path

Everything here works on the notebook file alone (no kernel), so a bad name or a value of the
wrong type is reported before anything starts.
"""

from __future__ import annotations

import ast
import io
import json
import math
import tokenize
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtrlab.runner.errors import ParameterError

SCALARS = {"int": int, "float": float, "str": str, "bool": bool}
SUPPORTED_TYPES = "int, float, str, bool, list[int|float|str|bool], Literal['a', 'b'], and 'X | None'"
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NONE = {"none", "null", "~"}


@dataclass(frozen=True)
class ParamType:
    """A parsed annotation: a scalar, a list of scalars, or a Literal choice; optionally None."""

    base: str  # "int" | "float" | "str" | "bool" | "literal"
    is_list: bool = False
    optional: bool = False
    choices: tuple = ()  # for Literal

    def __str__(self) -> str:
        if self.base == "literal":
            text = "Literal[" + ", ".join(repr(c) for c in self.choices) + "]"
        else:
            text = self.base
        if self.is_list:
            text = f"list[{text}]"
        return f"{text} | None" if self.optional else text


@dataclass(frozen=True)
class Parameter:
    name: str
    type: ParamType
    default: Any
    help: str

    def describe(self) -> str:
        """`name: type = default  # help`, the way it is written in the notebook."""
        text = f"{self.name}: {self.type} = {self.default!r}"
        return f"{text}  # {self.help}" if self.help else text


class ParameterSpec:
    """The ordered parameters of one notebook."""

    def __init__(self, notebook: str, parameters: list[Parameter], cell_index: int):
        self.notebook = notebook
        self.parameters = {p.name: p for p in parameters}
        self.cell_index = cell_index  # index of the `parameters` cell in the notebook

    def __iter__(self):
        return iter(self.parameters.values())

    def __contains__(self, name: str) -> bool:
        return name in self.parameters

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self}

    def accepted(self) -> str:
        """One-line list of accepted parameters with their types, for error messages."""
        if not self.parameters:
            return "this notebook takes no parameters"
        return "accepted: " + ", ".join(f"{p.name} ({p.type})" for p in self)

    def resolve(self, values: Mapping[str, Any] | None = None, *, from_strings: bool = False) -> dict[str, Any]:
        """Defaults overlaid with `values`, every value checked (and converted when `from_strings`).

        `from_strings=True` is for command-line values (`-p n_samples 8`); otherwise values are
        typed already (YAML, Python). Raises ParameterError naming the bad name or value.
        """
        resolved = self.defaults
        for name, value in (values or {}).items():
            if name not in self.parameters:
                raise ParameterError(f"{self.notebook}: unknown parameter {name!r}; {self.accepted()}")
            param = self.parameters[name]
            try:
                resolved[name] = parse_string(value, param.type) if from_strings else coerce(value, param.type)
            except (TypeError, ValueError) as exc:
                raise ParameterError(
                    f"{self.notebook}: bad value {value!r} for parameter {name!r} ({param.type}): {exc}; "
                    f"{self.accepted()}"
                ) from None
        return resolved


# --- reading ------------------------------------------------------------------------------


def read_parameters(notebook: str | Path) -> ParameterSpec:
    """Parse the single `parameters`-tagged cell of `notebook`."""
    path = Path(notebook)
    if not path.is_file():
        raise ParameterError(f"notebook not found: {str(path)!r}")
    # plain JSON rather than nbformat: nbformat's schema validation costs a second at CLI start
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        nb_cells = nb["cells"]
        if not isinstance(nb_cells, list) or not all(isinstance(c, dict) for c in nb_cells):
            raise TypeError("cells is not a list of cells")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ParameterError(f"{str(path)!r} is not a readable .ipynb notebook ({type(exc).__name__})") from None
    name = path.stem
    cells = [i for i, c in enumerate(nb_cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(
            f"{name}: expected exactly one cell tagged 'parameters', found {len(cells)} (cells {cells})"
        )
    index = cells[0]
    cell = nb_cells[index]
    if cell.get("cell_type") != "code":
        raise ParameterError(f"{name}: the 'parameters' cell (cell {index}) is {cell.get('cell_type')}, not code")
    source = cell.get("source", "")
    source = "".join(source) if isinstance(source, list) else source
    return ParameterSpec(name, parse_parameter_source(source, name), index)


def parse_parameter_source(source: str, notebook: str = "<cell>") -> list[Parameter]:
    """Annotated assignments of a parameters cell -> Parameters (help from the trailing comment)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ParameterError(f"{notebook}: the parameters cell does not parse: {exc.msg} (line {exc.lineno})") from None
    comments = _line_comments(source)
    params: list[Parameter] = []
    for node in tree.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            line = source.splitlines()[node.lineno - 1].strip()
            raise ParameterError(
                f"{notebook}: parameters cell line {node.lineno} ({line!r}) is not `name: type = default  # help`"
            )
        name = node.target.id
        if node.value is None:
            raise ParameterError(f"{notebook}: parameter {name!r} has no default value")
        ptype = parse_annotation(node.annotation, f"{notebook}: parameter {name!r}")
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            raise ParameterError(
                f"{notebook}: default of parameter {name!r} must be a literal, got {ast.unparse(node.value)!r}"
            ) from None
        try:
            default = coerce(default, ptype)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"{notebook}: default of parameter {name!r} does not match {ptype}: {exc}") from None
        if name in {p.name for p in params}:
            raise ParameterError(f"{notebook}: parameter {name!r} is defined twice")
        params.append(Parameter(name, ptype, default, comments.get(node.end_lineno, "")))
    return params


def _line_comments(source: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def parse_annotation(node: ast.expr, where: str) -> ParamType:
    def fail():
        raise ParameterError(f"{where}: unsupported type {ast.unparse(node)!r}; supported: {SUPPORTED_TYPES}")

    def strip_optional(n: ast.expr) -> tuple[ast.expr, bool]:
        # X | None, None | X, Optional[X]
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
            sides = [n.left, n.right]
            nones = [s for s in sides if isinstance(s, ast.Constant) and s.value is None]
            if len(nones) == 1:
                return next(s for s in sides if s is not nones[0]), True
            fail()
        if isinstance(n, ast.Subscript) and _name(n.value) == "Optional":
            return n.slice, True
        return n, False

    inner, optional = strip_optional(node)
    is_list = False
    if isinstance(inner, ast.Subscript) and _name(inner.value) in {"list", "List"}:
        is_list, inner = True, inner.slice
    if isinstance(inner, ast.Subscript) and _name(inner.value) == "Literal":
        elts = inner.slice.elts if isinstance(inner.slice, ast.Tuple) else [inner.slice]
        if not elts or not all(isinstance(e, ast.Constant) and isinstance(e.value, (str, int)) for e in elts):
            fail()
        return ParamType("literal", is_list, optional, tuple(e.value for e in elts))
    base = _name(inner)
    if base not in SCALARS:
        fail()
    return ParamType(base, is_list, optional)


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):  # typing.Optional, typing.List
        return node.attr
    return None


# --- checking values ----------------------------------------------------------------------


def _coerce_scalar(value: Any, ptype: ParamType) -> Any:
    if ptype.base == "literal":
        if value not in ptype.choices or isinstance(value, bool):
            raise ValueError(f"expected one of {list(ptype.choices)}")
        return value
    if ptype.base == "bool":
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if ptype.base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("expected an integer")
        return value
    if ptype.base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("expected a number")
        if not math.isfinite(value):
            raise ValueError("expected a finite number (inf and nan are not accepted)")
        return float(value)
    if not isinstance(value, str):  # str: never silently turn 1 into "1"
        raise TypeError("expected a string (quote it in YAML)")
    return value


def coerce(value: Any, ptype: ParamType) -> Any:
    """Check an already-typed value (YAML/Python) against `ptype`; ints widen to float."""
    if value is None:
        if ptype.optional:
            return None
        raise TypeError("None is not allowed")
    if ptype.is_list:
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        return [_coerce_scalar(v, ptype) for v in value]
    return _coerce_scalar(value, ptype)


def _parse_scalar_string(text: str, ptype: ParamType) -> Any:
    text = text.strip()
    if ptype.base == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected true or false")
    if ptype.base in ("int", "float"):
        try:
            value = int(text) if ptype.base == "int" else float(text)
        except ValueError:
            raise ValueError("expected an integer" if ptype.base == "int" else "expected a number") from None
        return _coerce_scalar(value, ptype)
    if ptype.base == "literal":
        for choice in ptype.choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {list(ptype.choices)}")
    return text


def parse_string(text: Any, ptype: ParamType) -> Any:
    """Convert a command-line string to a value of `ptype`.

    Lists: `1,2,3` or JSON `[1, 2, 3]` (`[]` for empty). Optionals: `none`/`null` -> None.
    """
    if not isinstance(text, str):
        return coerce(text, ptype)
    if ptype.optional and text.strip().lower() in _NONE:
        return None
    if ptype.is_list:
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError:
                raise ValueError("expected a JSON list like [1, 2] or a comma-separated list") from None
            return coerce(items, ptype)
        parts = [p for p in stripped.split(",")] if stripped else []
        return [_parse_scalar_string(p, ptype) for p in parts]
    return _parse_scalar_string(text, ptype)


# --- YAML ---------------------------------------------------------------------------------


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely, refusing a key given twice in one mapping (PyYAML keeps the last silently).

    Raises ParameterError naming `where`, the key and its line.
    """
    import yaml

    class _StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                line = key_node.start_mark.line + 1
                raise ParameterError(f"{where}: unhashable mapping key on line {line}") from None
            if key in seen:
                raise ParameterError(
                    f"{where}: key {key!r} given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                    "YAML keeps only the last one — merge them"
                )
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping_plain(node, deep=deep)

    _StrictLoader.construct_mapping_plain = yaml.SafeLoader.construct_mapping
    _StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ParameterError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}") from None
