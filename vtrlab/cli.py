"""The `vtrlab` command: list, run, figures, findings, grid (and `organism` when that sub-app is installed).

Logic lives in `vtrlab.runner`; this module parses arguments, prints one line per run, and turns
user errors into one line on stderr with a non-zero exit code (no traceback).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import typer.core

from vtrlab.runner.errors import RunnerError
from vtrlab.runner.interrupt import describe, exit_cleanly_on_signals


def _exception_classes(name: str) -> tuple[type, ...]:
    """`name` from click and from the copy of click that newer typer versions vendor (typer._click)."""
    import typer.exceptions

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name, None))
        except ImportError:
            pass
    found.append(getattr(typer.exceptions, name, None))
    return tuple({c for c in found if isinstance(c, type)})


_CLICK_ERRORS = _exception_classes("ClickException")
_ABORTS = _exception_classes("Abort")
_UsageError = next(c for c in _exception_classes("UsageError") if issubclass(c, _CLICK_ERRORS))


PARAM_FLAGS = ("-p", "--param")
_JOINED = "\x1f"  # joins NAME and VALUE of `-p NAME VALUE` into the single token typer parses


class _Group(typer.core.TyperGroup):
    """`-p NAME VALUE` for `run` (typer has no repeatable two-value option) and one-line errors.

    Before parsing, every `-p NAME VALUE` after the `run` command becomes `-p NAME<sep>VALUE`;
    `run` splits it back. Usage errors (unknown option, missing argument) are printed as one
    `error: ...` line with exit code 2, like every other user error. Works the same for the
    console script and for test runners.
    """

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, join_param_pairs(list(args)))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with exit_cleanly_on_signals(describe):
                rv = super().main(
                    args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
                )
        except _CLICK_ERRORS as exc:
            typer.echo(f"error: {_one_line(exc.format_message())}", err=True)
            rv = exc.exit_code
        except (*_ABORTS, KeyboardInterrupt):
            typer.echo("error: interrupted", err=True)
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _count_option(flag: str, text: str, what: str) -> int:
    """An option that counts something (``--workers``, ``--timeout-min``): an integer >= 1, read by us so that
    the error names the value given (``1.5``, ``abc``) and what is accepted."""
    text = str(text).strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        _fail(f"{flag} {text!r} is not an integer; accepted: an integer >= 1 ({what})")
    if int(text) < 1:
        _fail(f"{flag} {text!r}; accepted: an integer >= 1 ({what})")
    return int(text)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_NUMBER = re.compile(r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


def join_param_pairs(args: list[str]) -> list[str]:
    if not args or args[0] != "run":
        return args
    out, i = args[:1], 1
    while i < len(args):
        if args[i] == "--":  # everything after -- is positional
            out += args[i:]
            break
        if args[i] in PARAM_FLAGS:
            pair = args[i + 1 : i + 3]
            looks_like_option = [t for t in pair if t.startswith("-") and not _NUMBER.match(t)]
            if len(pair) < 2 or looks_like_option:
                got = " ".join([args[i], *pair[:1]]) if pair else args[i]
                hint = f"; {looks_like_option[0]!r} looks like an option, not a value" if looks_like_option else ""
                raise _UsageError(f"{got}: -p needs a NAME and a VALUE{hint}")
            out += [args[i], f"{args[i + 1]}{_JOINED}{args[i + 2]}"]
            i += 3
            continue
        out.append(args[i])
        i += 1
    return out


def _split_pair(token: str) -> tuple[str, str]:
    if _JOINED not in token:
        _fail(f"-p needs a NAME and a VALUE, got only {token!r}")
    name, value = token.split(_JOINED, 1)
    return name, value


typer_app = typer.Typer(
    cls=_Group,
    name="vtrlab",
    help="Run vtrlab notebooks with checked parameters and recorded provenance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

NOTEBOOK_DIR = "notebooks"
EXIT_USAGE = 2  # bad input (parameters, grid file, names)
EXIT_FAILED = 1  # a notebook failed


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _user_errors(fn: Callable) -> Callable:
    """Report RunnerError and missing files as one line, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RunnerError, FileNotFoundError) as exc:
            _fail(_one_line(str(exc)))

    return wrapper


def _notebooks() -> list[Path]:
    from vtrlab.runner.paths import project_root

    folder = project_root() / NOTEBOOK_DIR
    return sorted(folder.glob("*.ipynb")) if folder.is_dir() else []


def _finish(results) -> None:
    failed = [r for r in results if r.status == "failed"]
    if len(results) > 1:
        typer.echo(f"{len(results) - len(failed)} ok or skipped, {len(failed)} failed")
    if failed:
        raise typer.Exit(EXIT_FAILED)


@typer_app.command("list")
@_user_errors
def list_notebooks() -> None:
    """Notebooks in notebooks/ and their parameters (type, default, help)."""
    from vtrlab.runner.params import read_parameters

    found = _notebooks()
    if not found:
        _fail(f"no notebooks found in {NOTEBOOK_DIR}/")
    for nb in found:
        typer.echo(nb.stem)
        try:
            spec = read_parameters(nb)
        except RunnerError as exc:
            typer.echo(f"    (unreadable parameters: {exc})")
            continue
        for param in spec:
            typer.echo(f"    {param.describe()}")


@typer_app.command("run")
@_user_errors
def run(
    notebook: Path = typer.Argument(..., help="path to the .ipynb"),
    param: list[str] = typer.Option(
        [], "--param", "-p", metavar="NAME VALUE", help="NAME VALUE (repeatable); lists as 1,2,3 or [1,2]"
    ),
    params_file: Path | None = typer.Option(None, "--params-file", "-f", help="YAML mapping of parameters"),
    force: bool = typer.Option(False, "--force", help="re-run even if this run is complete"),
) -> None:
    """Run one notebook; -p values override -f values, which override the notebook defaults."""
    from vtrlab.runner.params import read_parameters
    from vtrlab.runner.run import Job, run_job

    spec = read_parameters(notebook)
    values = spec.resolve(_read_yaml_params(params_file) if params_file else {})
    pairs = [_split_pair(p) for p in param]
    names = [name for name, _ in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        _fail(f"-p {twice[0]!r} given more than once; give each parameter once")
    cli_values = spec.resolve(dict(pairs), from_strings=True)
    values.update({name: cli_values[name] for name, _ in pairs})
    result = run_job(Job(str(notebook), values, "notebook", force))
    typer.echo(result.line())
    _finish([result])


def _read_yaml_params(path: Path) -> dict[str, Any]:
    from vtrlab.runner.params import load_yaml

    if not path.is_file():
        raise FileNotFoundError(f"parameters file not found: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{path}: cannot read the parameters file ({type(exc).__name__})")
    data = load_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return data


@typer_app.command("figures")
@_user_errors
def figures(
    only: list[str] = typer.Option([], "--only", help="notebook name or prefix (repeatable), e.g. 01"),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda: sets each notebook's `device`"),
    resume: bool = typer.Option(False, "--resume", help="skip notebooks whose default run is complete"),
) -> None:
    """Regenerate every figure: each notebook in notebooks/ with its default parameters."""
    from vtrlab.runner.params import read_parameters
    from vtrlab.runner.run import prepare_job, run_job

    if device is not None and device not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda, got {device!r}")
    found = _notebooks()
    if not found:
        _fail(f"no notebooks found in {NOTEBOOK_DIR}/")
    if only:
        chosen = [nb for nb in found if any(nb.stem == o or nb.stem.startswith(o) for o in only)]
        unmatched = [o for o in only if not any(nb.stem == o or nb.stem.startswith(o) for nb in found)]
        if unmatched:
            _fail(f"--only {unmatched[0]!r} matches no notebook; available: {', '.join(nb.stem for nb in found)}")
        found = chosen
    jobs = []
    for nb in found:  # check every notebook before running any
        spec = read_parameters(nb)
        overrides = {"device": device} if device is not None and "device" in spec else {}
        jobs.append(prepare_job(nb, overrides, figures="notebook", force=not resume, spec=spec))
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(jobs), unit="notebook", desc="figures", file=sys.stderr) as bar:
        for job in jobs:
            result = run_job(job)
            results.append(result)
            bar.write(result.line())
            bar.update(1)
    _finish(results)


@typer_app.command("grid")
@_user_errors
def grid(
    grid_file: Path = typer.Argument(..., help="GRID.yaml: notebooks + parameter lists (cartesian product) + jobs"),
    workers: str | None = typer.Option(None, "--workers", "-w", help="jobs at a time (default: one per GPU, else 1)"),
    gpus: str | None = typer.Option(None, "--gpus", help="comma-separated GPU ids; each job sees one"),
    backend: str = typer.Option("local", "--backend", help="local | ray | slurm"),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray address (else $RAY_ADDRESS, else local)"),
    slurm_partition: str | None = typer.Option(None, "--slurm-partition", help="Slurm partition"),
    slurm_cluster: str = typer.Option(
        "slurm", "--slurm-cluster", help="submitit cluster: slurm, or local to try without Slurm"
    ),
    timeout_min: str = typer.Option("240", "--timeout-min", help="Slurm time limit per job, minutes"),
    force: bool = typer.Option(False, "--force", help="re-run complete runs"),
) -> None:
    """Run a grid of notebook runs; completed runs are skipped, failures reported, others continue."""
    from vtrlab.runner.grid import BACKENDS, load_grid, run_grid

    if backend not in BACKENDS:
        _fail(f"--backend {backend!r} unknown; accepted: {', '.join(BACKENDS)}")
    workers = None if workers is None else _count_option("--workers", workers, "jobs at a time")
    timeout_min = _count_option("--timeout-min", timeout_min, "minutes per Slurm job")
    if slurm_cluster not in ("slurm", "local", "debug"):
        _fail(f"--slurm-cluster {slurm_cluster!r} unknown; accepted: slurm, local, debug")
    jobs = load_grid(grid_file, force=force)
    typer.echo(f"{len(jobs)} jobs from {grid_file}", err=True)
    results = run_grid(
        jobs,
        backend=backend,
        workers=workers,
        gpus=gpus.split(",") if gpus else None,
        ray_address=ray_address,
        slurm_cluster=slurm_cluster,
        slurm_partition=slurm_partition,
        timeout_min=timeout_min,
    )
    _finish(results)


@typer_app.command("findings")
@_user_errors
def findings(
    source: Path | None = typer.Argument(
        None, help="findings.json or a run directory of notebook 05 (default: the run behind figures/05_findings/)"
    ),
    readme: Path | None = typer.Option(None, "--readme", help="README to render into (default: the project's)"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if the README's table is stale"),
) -> None:
    """Render notebook 05's findings table (claims, values, CIs, verdicts) into the README between its markers."""
    from vtrlab.runner.findings import render_findings
    from vtrlab.runner.paths import project_root

    changed = render_findings(project_root(), source, readme, check=check)
    if check and changed:
        _fail("the README's findings table differs from findings.json; run `vtrlab findings`", code=1)
    typer.echo("README findings table " + ("up to date" if not changed else "rendered"))


ORGANISM_CLI = "vtrlab.organism.cli"


def organism_cli_available() -> bool:
    """Whether vtrlab/organism/cli.py exists, found without importing vtrlab.organism (heavy)."""
    spec = importlib.util.find_spec("vtrlab.organism")
    locations = (spec.submodule_search_locations or []) if spec else []
    return any((Path(loc) / "cli.py").is_file() or (Path(loc) / "cli").is_dir() for loc in locations)


@typer_app.command(
    "organism",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="Embedded organism model: train, inspect, ... (`vtrlab organism --help`).",
)
def organism(ctx: typer.Context) -> None:
    # Imported on use: the organism sub-app pulls in torch/transformers and may not exist yet.
    if not organism_cli_available():
        _fail(f"`vtrlab organism` is not available: module {ORGANISM_CLI} not found")
    module = importlib.import_module(ORGANISM_CLI)
    sub = typer.main.get_command(module.app)
    sub.main(args=list(ctx.args), prog_name="vtrlab organism", standalone_mode=True)


@typer_app.command(
    "data",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="Data: check a source, export the organism's samples as a manifest (`vtrlab data --help`).",
)
def data(ctx: typer.Context) -> None:
    from vtrlab.data.cli import app as data_app

    typer.main.get_command(data_app).main(args=list(ctx.args), prog_name="vtrlab data", standalone_mode=True)


@typer_app.command("export-task")
def export_task(
    out: Path = typer.Argument(..., help="task folder to write (YAML + parquet + utils.py); replaced whole"),
    data: str = typer.Option("organism", "--data", help="organism, photos, or a path (.jsonl/.json/.parquet, HF)"),
    name: str | None = typer.Option(None, "--name", help="lmms-eval task name (default vtrlab_<data>)"),
    n_samples: int | None = typer.Option(None, "--n-samples", help="seeded random subset (organism: default 64)"),
    seed: int = typer.Option(0, "--seed"),
    family: str = typer.Option("all", "--family", help="'all' or one task family / group"),
    prompt_template: str = typer.Option("{question}", "--prompt-template", help="e.g. '{question} One word.'"),
    metric: str = typer.Option("exact", "--metric", help="exact or vqa (vtrlab.data.answers)"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens"),
    question: str | None = typer.Option(None, "--question", help="question for an image folder"),
    answer_column: str | None = typer.Option(None, "--answer-column"),
    split: str | None = typer.Option(None, "--split", help="split of a saved HF DatasetDict"),
) -> None:
    """Write an lmms-eval task folder from DATA (answers scored as in the notebooks); prints the YAML path."""
    from vtrlab.integrations.lmms_eval_task import export_task as export

    try:
        path = export(
            out,
            data,
            name=name,
            n_samples=n_samples,
            seed=seed,
            family=family,
            prompt_template=prompt_template,
            metric=metric,
            max_new_tokens=max_new_tokens,
            question=question,
            answer_column=answer_column,
            split=split,
        )
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as exc:
        _fail(str(exc))
    typer.echo(str(path))


app = typer_app  # console entry point: vtrlab = vtrlab.cli:app

if __name__ == "__main__":  # pragma: no cover
    app()
