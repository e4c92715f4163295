"""The house points one way: every import inside ``vtrlab`` (module-level and function-local, relative
ones resolved, plus module paths named in lazy-import tables) goes down the table below, and no
modules import each other in a circle.

Bottom to top (``shared/DESIGN.md``): models → probes → flow / recon → reduce (its registry holds the
learned selector of recon) → analysis → plots → runner → ``vtrlab`` → integrations → cli. ``metrics`` is pure
and may be imported from anywhere (it imports nothing of vtrlab);
``data`` sits just above models (it may read layouts; models never read data); ``organism`` builds a
model from data and sits with the probes' consumers; ``testing`` sits beside models: it may import
models, probes and data, and nothing at runtime imports it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "vtrlab"

# package -> rank. An import must go to a package of strictly lower rank, to itself, or to ANYWHERE.
RANK = {
    "models": 1,
    "data": 2,
    "probes": 2,
    "flow": 3,
    "recon": 3,
    "organism": 3,
    "reduce": 4,  # above recon: the learned selector is one of the registry's methods
    "analysis": 5,
    "plots": 6,
    "runner": 7,
    "vtrlab": 8,  # the package's lazy top-level namespace (vtrlab/__init__.py)
    "integrations": 9,  # harness plugins use the public namespace, as a user's code does
    "cli": 10,
}
ANYWHERE = {"metrics", "io", "_io", "_validate", "_version"}  # pure helpers; they import nothing above themselves
SIDE = {"testing": {"models", "probes", "data"}}  # beside the table; imported by tests only
EXTRA: set[tuple[str, str]] = set()  # explicit exceptions (importer, imported); keep empty

MODULE_PATH = re.compile(r"vtrlab(\.[A-Za-z_][A-Za-z0-9_]*)+")  # a dotted path; bare "vtrlab" is a name


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def owning_module(name: str) -> str:
    """The longest prefix of a dotted name that is a module of the tree (``vtrlab.a.b.func`` -> ``vtrlab.a.b``)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if is_module(".".join(parts[:k])):
            return ".".join(parts[:k])
    return name


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported vtrlab module, line) for every import statement and lazy module path in ``path``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(owning_module(a.name), node.lineno) for a in node.names if a.name.split(".")[0] == "vtrlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                if not base:
                    raise AssertionError(f"{path}:{node.lineno}: relative import climbs out of the package")
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "vtrlab":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                out.append((sub if is_module(sub) else owning_module(mod), node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_PATH.fullmatch(node.value):
            if is_module(node.value):  # lazy-import tables: {"name": "vtrlab.runner.params"}
                out.append((node.value, node.lineno))
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vtrlab"


def graph() -> dict[str, list[tuple[str, int]]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def allowed(src: str, dst: str) -> bool:
    if src == dst or dst in ANYWHERE or (src, dst) in EXTRA:
        return True
    if src in ANYWHERE:
        return False  # pure helpers import nothing of the house
    if src in SIDE:
        return dst in SIDE[src]
    if dst in SIDE:
        return False  # runtime code never imports the test helpers
    return RANK[src] > RANK[dst]


def test_every_package_has_a_place_in_the_table():
    packages = {layer(m) for m in graph()}
    unknown = sorted(packages - set(RANK) - ANYWHERE - set(SIDE))
    assert not unknown, f"packages {unknown} have no place in the import table of {__file__}"


def test_imports_point_down():
    bad = []
    for src, edges in graph().items():
        for dst, line in edges:
            if not allowed(layer(src), layer(dst)):
                bad.append(f"{src} (line {line}) -> {dst}: {layer(src)} may not import {layer(dst)}")
    assert not bad, "imports that point up the house:\n" + "\n".join(sorted(set(bad)))


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-loop), via Tarjan."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    edges = {src: {dst for dst, _ in e if dst != src} for src, e in graph().items()}
    cycles = find_cycles(edges)
    assert not cycles, "modules that import each other in a circle: " + "; ".join(" <-> ".join(c) for c in cycles)


# --- the checker itself --------------------------------------------------------------------------------


def test_checker_sees_function_local_relative_and_lazy_imports(tmp_path, monkeypatch):
    src = tmp_path / "vtrlab" / "recon" / "error.py"
    src.parent.mkdir(parents=True)
    (tmp_path / "vtrlab" / "__init__.py").write_text("")
    (tmp_path / "vtrlab" / "recon" / "__init__.py").write_text("from .error import f\n")
    (tmp_path / "vtrlab" / "analysis").mkdir()
    (tmp_path / "vtrlab" / "analysis" / "__init__.py").write_text("")
    (tmp_path / "vtrlab" / "analysis" / "reconstruction.py").write_text("from ..recon import f\n")
    src.write_text("def f():\n    from ..analysis.reconstruction import token_array\n    return 'vtrlab.analysis'\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    globals()["ROOT"], old = tmp_path, ROOT
    try:
        edges = imports_of(src)
        assert ("vtrlab.analysis.reconstruction", 2) in edges and ("vtrlab.analysis", 3) in edges
        assert not allowed("recon", "analysis") and allowed("analysis", "recon") and allowed("plots", "metrics")
        assert not allowed("runner", "testing") and allowed("testing", "probes") and not allowed("metrics", "models")
        g = {module_name(p): {d for d, _ in imports_of(p)} for p in (tmp_path / "vtrlab").rglob("*.py")}
        assert ["vtrlab.analysis.reconstruction", "vtrlab.recon", "vtrlab.recon.error"] in find_cycles(g)
    finally:
        globals()["ROOT"] = old


@pytest.mark.parametrize("name", ["vtrlab.models.base", "vtrlab.recon", "vtrlab.analysis.reconstruction"])
def test_module_paths_resolve(name):
    assert is_module(name) and owning_module(name + ".something") == name
