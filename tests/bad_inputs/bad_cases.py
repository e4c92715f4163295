"""The bad-input suite's table helpers: every case asserts a clear error (type + a message naming
the bad value) or the correct behaviour."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class Case:
    """One row: `call(ctx)` must raise `error` with every `names` fragment in its message, or, when
    `error` is None, return a value `check` accepts."""

    id: str
    call: Callable[[Any], Any]
    error: type[BaseException] | tuple[type[BaseException], ...] | None
    names: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None
    ours: bool = True  # the error is raised by vtrlab's own code (not deep inside a dependency)


def params(cases: list[Case]):
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), f"duplicate case ids: {sorted({i for i in ids if ids.count(i) > 1})}"
    return pytest.mark.parametrize("case", cases, ids=ids)


def run_case(case: Case, ctx: Any) -> None:
    if case.error is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = case.call(ctx)
        if case.check is not None:
            assert case.check(result), f"{case.id}: unexpected result {result!r}"
        return
    with pytest.raises(case.error) as info:
        case.call(ctx)
    message = str(info.value)
    assert "\n" not in message.strip(), f"{case.id}: multi-line error: {message!r}"
    for fragment in case.names:
        assert fragment in message, f"{case.id}: {fragment!r} not in error message {message!r}"
    if case.ours:  # a clear error is ours, not a raw one from deep inside a dependency
        where = str(info.traceback[-1].path)
        assert "vtrlab" in where and "site-packages" not in where, f"{case.id}: raised in {where}: {message}"


def write_notebook(path: Path, parameters: str, *cells: str) -> Path:
    """A notebook: a markdown title, the `parameters` cell, then `cells` (code)."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook()
    nb.cells = [new_markdown_cell(f"# {path.stem}"), new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path
