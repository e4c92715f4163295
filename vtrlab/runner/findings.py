"""Render notebook 05's findings table into the README (``vtrlab findings``), generated, never typed.

The source is a ``findings.json`` written by ``notebooks/05_findings.ipynb``: a path given by the user, else the
run that published ``figures/05_findings/`` (from ``figures/MANIFEST.json``), else the committed copy
``figures/05_findings/findings.json``. A run's record is copied there (atomically) so that the README's table
always has its source in the repository; the provenance of a run (commit, dirty flag, run hash, duration) is
taken from the runner's own ``run.json`` beside it, which records the commit the run started from. The table
replaces whatever lies between the README's ``<!-- findings:start -->`` and ``<!-- findings:end -->`` markers.
"""

from __future__ import annotations

import json
from pathlib import Path

from vtrlab.io import atomic_write_json, atomic_write_text
from vtrlab.runner.errors import RunnerError
from vtrlab.runner.provenance import read_manifest
from vtrlab.runner.run import RUN_RECORD

NOTEBOOK = "05_findings"
RECORD = "findings.json"


def findings_source(root: Path) -> Path:
    """The findings.json the README is rendered from by default (see the module docstring)."""
    prefix = f"figures/{NOTEBOOK}/"
    runs = sorted(
        {e.get("run_dir") for k, e in read_manifest(root).items() if k.startswith(prefix) and e.get("run_dir")}
    )
    for run in runs:
        path = root / run / RECORD
        if path.is_file():
            return path
    committed = root / "figures" / NOTEBOOK / RECORD
    if committed.is_file():
        return committed
    raise FileNotFoundError(
        f"no {RECORD} found: run notebooks/{NOTEBOOK}.ipynb first (make figures, or vtrlab figures --only 05)"
    )


def render_findings(root: Path, source: Path | None = None, readme: Path | None = None, check: bool = False) -> bool:
    """Render the findings table of ``source`` (default :func:`findings_source`) into ``readme`` (default
    ``root/README.md``) and keep a copy of the record in ``figures/05_findings/``. With ``check`` nothing is
    written. Returns whether the README changed (or, with ``check``, would change)."""
    from vtrlab.analysis.findings import load_findings, markdown_table, provenance_line, render_between_markers

    root = Path(root).resolve()
    src = Path(source) if source is not None else findings_source(root)
    try:
        doc = load_findings(src)
    except ValueError as exc:
        raise RunnerError(str(exc)) from None
    src_file = src / RECORD if src.is_dir() else src
    run_record = src_file.parent / RUN_RECORD
    if run_record.is_file():  # the runner's record: the commit the run started from, its hash and duration
        run = json.loads(run_record.read_text())
        keys = ("git_commit", "git_dirty", "hash", "duration_s")
        doc["provenance"] = {**doc.get("provenance", {}), **{k: run.get(k) for k in keys}}
    readme = Path(readme) if readme is not None else root / "README.md"
    if not readme.is_file():
        raise FileNotFoundError(f"README not found: {str(readme)!r}")
    text = readme.read_text(encoding="utf-8")
    try:
        new = render_between_markers(text, markdown_table(doc["records"]), header=provenance_line(doc))
    except ValueError as exc:
        raise RunnerError(f"{readme}: {exc}") from None
    if check:
        return new != text
    copy = root / "figures" / NOTEBOOK / RECORD
    if src_file.resolve() != copy.resolve():
        atomic_write_json(copy, doc)
    if new != text:
        atomic_write_text(readme, new)
    return new != text
