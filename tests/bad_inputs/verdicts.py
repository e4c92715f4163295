"""Count the bad-input suite's verdicts on a tree (for the closing note's before/after table).

    PYTHONPATH=<tree> python tests/bad_inputs/verdicts.py <tree>

Runs every table row of tests/bad_inputs (not the property tests) outside pytest and classifies
what the code under <tree> does with it:

* ``clear``      the expected error type, one line, naming the bad value, raised by vtrlab;
* ``correct``    a valid input, handled correctly;
* ``unclear``    an error raised by vtrlab, but of another type or not naming the value;
* ``crash``      an error raised deep inside a dependency (torch, transformers, numpy, ...);
* ``silent``     a bad input accepted without an error (a silently wrong result or a run started);
* ``wrong``      a valid input answered wrongly or refused;
* ``absent``     the API the row exercises does not exist on that tree.

On an older tree, names the rows import but that tree lacks are shimmed (they raise
NotImplementedError -> ``absent``), and `queries=` is passed as the old `rows=`.
"""

from __future__ import annotations

import collections
import importlib
import json
import sys
import tempfile
import types
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Absent(NotImplementedError):
    pass


def _absent(*args, **kwargs):
    raise Absent("absent on this tree")


def shim_old_tree(tree: Path) -> None:
    # by file, not by import: an editable install elsewhere may provide modules this tree lacks
    if not (tree / "vtrlab" / "io.py").is_file():
        io = types.ModuleType("vtrlab.io")
        for name in ("atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"):
            setattr(io, name, _absent)
        sys.modules["vtrlab.io"] = io
    import vtrlab.models.loader as loader

    if not hasattr(loader, "WeightsMismatchError"):
        loader.WeightsMismatchError = type("WeightsMismatchError", (loader.ModelLoadError,), {})
    import vtrlab.runner.run as run

    if not hasattr(run, "notebook_code"):
        run.notebook_code = _absent
    import inspect

    import vtrlab as vl

    for verb in ("capture", "saliency"):
        fn = getattr(vl, verb)
        if "queries" not in inspect.signature(fn).parameters:

            def wrapped(*a, _fn=fn, **kw):
                if "queries" in kw:
                    kw["rows"] = kw.pop("queries")
                return _fn(*a, **kw)

            setattr(vl, verb, wrapped)


def classify(case, ctx) -> str:
    if case.error is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = case.call(ctx)
        except Absent:
            return "absent"
        except Exception:
            return "wrong"
        return "correct" if case.check is None or case.check(result) else "wrong"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.call(ctx)
    except Absent:
        return "absent"
    except Exception as exc:
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename
        ours = "vtrlab" in where and "site-packages" not in where
        message = str(exc)
        good = isinstance(exc, case.error) and "\n" not in message.strip() and all(f in message for f in case.names)
        if good and (ours or not case.ours):
            return "clear"
        return "unclear" if ours or not case.ours else "crash"
    return "silent"


def cli_verdicts(mod) -> collections.Counter:
    from typer.testing import CliRunner

    from vtrlab.cli import app

    project = mod.build_project(Path(tempfile.mkdtemp(prefix="cli")))
    counts: collections.Counter = collections.Counter()
    import os

    os.chdir(project)
    os.environ.pop("VTRLAB_ROOT", None)
    for _case_id, args, fragments in mod.RUN_CASES + mod.GRID_CASES + mod.OTHER_CASES:
        import shutil

        shutil.rmtree(project / "runs", ignore_errors=True)
        result = CliRunner().invoke(app, args)
        lines = [x for x in result.output.splitlines() if x.strip()]
        ran = (project / "runs").exists()
        if result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not ran:
            verdict = "clear" if all(f in lines[0] for f in fragments) else "unclear"
        elif ran or result.exit_code == 0:
            verdict = "silent"
        elif result.exception is not None and not isinstance(result.exception, SystemExit):
            verdict = "crash"
        else:
            verdict = "unclear"
        counts[verdict] += 1
    return counts


def main(tree: str) -> dict:
    sys.path.insert(0, str(HERE))
    shim_old_tree(Path(tree).resolve())
    import vtrlab as vl
    from vtrlab.data.synthetic import generate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = vl.load("organism", device="cpu")
    samples = generate(2, 0)
    batch = vlm.prepare([s.image for s in samples], [s.question for s in samples])
    layouts = batch.layouts if hasattr(batch, "layouts") else batch.layout
    n_img = int(layouts[0].table().shape[0])
    out: dict[str, dict] = {}
    for name in (
        "test_bad_load",
        "test_bad_prepare",
        "test_bad_verbs",
        "test_bad_data",
        "test_bad_files",
        "test_bad_reduce",
        "test_bad_cli",
    ):
        try:
            mod = importlib.import_module(name)
        except BaseException as exc:  # pytest.skip at module level, ImportError
            out[name] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        if name == "test_bad_cli":
            out[name] = dict(cli_verdicts(mod))
            continue
        counts: collections.Counter = collections.Counter()
        for case in mod.CASES:
            if name == "test_bad_load":
                root = Path(tempfile.mkdtemp())
                if not hasattr(mod, "_BUNDLES"):
                    mod._BUNDLES = {k: str(mod._variant(root, k, e)) for k, e in mod.VARIANTS.items()}
                ctx = mod._BUNDLES
            elif name == "test_bad_prepare":
                ctx = {"vlm": vlm, "tmp": Path(tempfile.mkdtemp())}
            elif name in ("test_bad_verbs", "test_bad_reduce"):
                ctx = {"vlm": vlm, "batch": batch, "n_img": n_img}
            else:
                ctx = Path(tempfile.mkdtemp())
            counts[classify(case, ctx)] += 1
        out[name] = dict(counts)
    total: collections.Counter = collections.Counter()
    for counts in out.values():
        total.update({k: v for k, v in counts.items() if isinstance(v, int)})
    out["total"] = dict(total)
    print(json.dumps(out, indent=1, sort_keys=True))
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
