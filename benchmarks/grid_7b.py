"""Notebooks 01-04 on the photo set at 7B size: the path from a user's checkpoint and data to figures, on the GPU.

Runs every notebook of ``NOTEBOOKS`` with ``data=photos`` on the full-size random-weight LLaVA-1.5-7B and
LLaVA-NeXT-7B shapes (``model="full_size:<name>"``, bf16, cuda: ``vtrlab.testing.full_size`` reached through
the notebooks' ``model`` parameter) as one ``vtrlab`` grid (local back-end, ``--workers`` runs at a time on the
one GPU, longest expected first), together with the memory check: notebook 01 on LLaVA-NeXT-7B at N and 4N
samples (batches are streamed, so its peak GPU memory should not grow with ``n_samples``). Every run's peak GPU
memory is its own kernel's ``torch.cuda.max_memory_allocated`` (recorded by the runner in ``run.json``), so
runs sharing the GPU do not blur each other's numbers. Random weights make the figures meaningless; what is
measured is that every notebook completes at 7B size, how long it takes and how many samples per second it
gets through.

GPU, through the device tool, in ONE call (the grid ends within ``--budget-s``, default 420 s; what finished
by then is written, the rest is listed as not run)::

    python benchmarks/grid_7b.py --out $OUT --project /tmp/grid_7b

CPU dry run with tiny models (``tiny:llava``, ``tiny:llava_next``; same code path, smaller parameters)::

    python benchmarks/grid_7b.py --tiny --out /tmp/grid_tiny

Render the table into benchmarks/README.md (between ``<!-- grid7b -->`` markers) from fetched results (several
files, e.g. one device call per model with ``--models``, are merged)::

    python benchmarks/grid_7b.py --render DIR/grid_7b.json [DIR2/grid_7b.json]

Writes ``OUT/grid_7b.json`` (environment; one row per run: status, seconds, samples, samples/s, peak GPU and
host memory, its slowest cells, error; the memory check's verdict; rewritten after every run), ``OUT/grid_7b.md``
(the table) and ``OUT/runs.tar.gz`` (every run's run.json and metrics.json, the executed notebook of each failed
run); the runs themselves (executed notebooks, tables, figures) stay in ``--project``. Every run's duration
includes starting its kernel and building the random-weight model (no checkpoint is read).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = HERE / "README.md"
NOTEBOOKS = ("01_attention_per_layer", "02_information_flow", "03_reconstruction_selector", "04_reduction_methods")
GPU_MODELS = ("full_size:llava-1.5-7b", "full_size:llava-next-7b")
TINY_MODELS = ("tiny:llava", "tiny:llava_next")
MARK, END = "<!-- grid7b -->", "<!-- /grid7b -->"

# Parameters per notebook at 7B size (only those the notebook has are passed, so the grid keeps working when a
# notebook gains or loses one); every other parameter keeps its default (n_causal included: the causal sections
# run). Sizes keep the whole grid within one device call (--budget-s).
GPU_PARAMS = {
    # batch 2: the causal section's saliency keeps ~12 GiB of activations per LLaVA-NeXT sample for its backward
    "01_attention_per_layer": dict(n_samples=8, batch_size=2, n_examples=2, n_layers_shown=4),
    "02_information_flow": dict(n_samples=2, batch_size=2, window=9),
    "03_reconstruction_selector": dict(
        train=True,
        n_train=64,
        steps=40,
        d_model=64,
        layers=1,
        n_eval=1,
        budgets=[0.3, 1.0],
        n_layer_samples=2,
        n_maps=2,
        batch_size=4,
    ),
    "04_reduction_methods": dict(
        n_samples=1,
        batch_size=6,
        methods=["random", "oracle", "fastv", "visionzip", "dart"],
        budgets=[0.25],
        n_random_seeds=2,
        agreement_budget=0.25,
    ),
}
TINY_PARAMS = {  # overrides for the CPU dry run
    "01_attention_per_layer": dict(n_samples=4, batch_size=2),
    "02_information_flow": dict(n_samples=2, window=1),
    "03_reconstruction_selector": dict(n_train=8, steps=2, d_model=16, n_eval=1, n_layer_samples=2, n_maps=1),
    "04_reduction_methods": dict(methods=["random", "oracle", "fastv"], n_random_seeds=1),
}
# The memory check: notebook 01 on the larger model at n_samples N and 4N (streamed batches of MEMORY_BATCH, so its
# peak GPU memory should not grow), without the causal section (n_causal=0: it runs on n_causal samples whatever
# n_samples is, and its peak would hide the streamed part's). Its two runs join the grid like any other job; each
# run's peak is its own kernel's torch.cuda.max_memory_allocated (run.json "resources"), so concurrency is harmless.
MEMORY_NOTEBOOK = "01_attention_per_layer"
MEMORY_SAMPLES, TINY_MEMORY_SAMPLES = (2, 8), (2, 8)
MEMORY_BATCH, TINY_MEMORY_BATCH = 2, 2
# Expected seconds per run at 2 runs at a time on one H200 (2026-11-30, 4 at a time: 1.5 nb01 47 s, nb02 67 s,
# nb04 42 s; NeXT nb02 121 s; 2026-12-01, 2 at a time: NeXT nb01 140 s, nb03 355 s, 1.5 nb03 200 s). Only the order
# uses them: longest first, so the grid's wall time is close to (sum / workers).
EXPECTED_S = {
    ("llava-next-7b", "03_reconstruction_selector"): 355,
    ("llava-next-7b", "01_attention_per_layer"): 140,
    ("llava-next-7b", "02_information_flow"): 120,
    ("llava-1.5-7b", "03_reconstruction_selector"): 200,
    ("llava-1.5-7b", "01_attention_per_layer"): 80,
    ("llava-1.5-7b", "02_information_flow"): 50,
    ("llava-next-7b", "04_reduction_methods"): 50,
    ("llava-1.5-7b", "04_reduction_methods"): 40,
    ("llava-next-7b", "memory"): 45,
}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def environment(device: str, commit: str | None = None) -> dict:
    """Versions, host and device; ``commit`` (``--commit``) names the source's commit when this runs from a copy
    of the tree whose ``.git`` is absent or stale (a GPU machine's staging copy)."""
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None,
    }
    if commit:
        env["commit"], env["commit_from"] = commit, "--commit"
        return env
    try:
        env["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


class GpuMemory:
    """The GPU's used memory (nvidia-smi, all processes) sampled every ``every_s`` seconds; ``peak_gib``."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak_mib, self._stop = every_s, None, threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                used = max(float(x) for x in out.split())
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.every_s)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join(timeout=10)

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_mib is None else round(self.peak_mib / 1024, 2)


class Deadline(BaseException):
    """The budget ran out: the grid stops every job process (as on Ctrl-C) and the table is written."""


def _short(model: str) -> str:
    return model.split(":", 1)[-1]


def _label(phase: str, model: str, notebook: str, n_samples) -> str:
    """A run's name in "not run" lists (the memory check's runs carry their n_samples)."""
    return f"{model} {notebook}" + (f" n_samples={n_samples}" if phase == "memory" else "")


def parse_skip(text: str, models) -> set[tuple[str, str]]:
    """``--skip`` as ``{(model, notebook)}``: ``MODEL:NOTEBOOK`` items, the model by its short name, the notebook by
    its name or number; a ValueError names an item that matches nothing and what is accepted."""
    out = set()
    for item in (x.strip() for x in (text or "").split(",")):
        if not item:
            continue
        model, _, nb = item.partition(":")
        full = [m for m in models if _short(m) == model.strip()]
        nbs = [n for n in NOTEBOOKS if nb.strip() and (n == nb.strip() or n.split("_", 1)[0] == nb.strip())]
        if not full or len(nbs) != 1:
            raise ValueError(
                f"--skip {item!r}; accepted: MODEL:NOTEBOOK with MODEL one of "
                f"{', '.join(_short(m) for m in models)} and NOTEBOOK one of {', '.join(NOTEBOOKS)} (or its number)"
            )
        out.add((full[0], nbs[0]))
    return out


def plan(models, notebooks, params, device: str, memory: bool, tiny: bool, skip=()) -> list[tuple[str, object]]:
    """``(phase, job)`` for every run: each notebook on each model ("grid") but those in ``skip``, and the memory
    check's two runs ("memory"), longest expected first."""
    from vtrlab.runner.params import read_parameters
    from vtrlab.runner.run import prepare_job

    specs: dict[str, object] = {}

    def job(model: str, nb: str, extra: dict | None = None):
        path = ROOT / "notebooks" / f"{nb}.ipynb"
        spec = specs.setdefault(nb, read_parameters(path))
        values = {"model": model, "data": "photos", "device": device, "seed": 0, **params[nb], **(extra or {})}
        values = {k: v for k, v in values.items() if k in spec}
        return prepare_job(path, values, figures="run", force=True, spec=spec)

    out = [
        ("grid", job(m, nb), EXPECTED_S.get((_short(m), nb), 60))
        for m in models
        for nb in notebooks
        if (m, nb) not in set(skip)
    ]
    if memory:
        sizes = TINY_MEMORY_SAMPLES if tiny else MEMORY_SAMPLES
        batch = TINY_MEMORY_BATCH if tiny else MEMORY_BATCH
        model = models[-1]
        for n in sizes:
            extra = {"n_samples": n, "batch_size": batch, "n_causal": 0}
            out.append(("memory", job(model, MEMORY_NOTEBOOK, extra), EXPECTED_S.get((_short(model), "memory"), 60)))
    out.sort(key=lambda x: -x[2])  # stable: ties keep the model / notebook order
    return [(phase, j) for phase, j, _ in out]


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_dir(result, project: Path) -> Path:
    path = Path(result.run_dir)
    path = path if path.is_absolute() else (Path.cwd() / path)
    return path.parent if path.suffix == ".ipynb" else path  # a failed run names its executed notebook


def slowest_cells(notebook: Path, k: int = 3) -> list[list]:
    """The ``k`` slowest cells of an executed notebook: ``[index, seconds]`` (papermill's cell durations)."""
    nb = _read(notebook) or {}
    cells = [
        (i, (c.get("metadata", {}).get("papermill", {}) or {}).get("duration"))
        for i, c in enumerate(nb.get("cells", []))
        if c.get("cell_type") == "code"
    ]
    cells = [(i, round(float(d), 1)) for i, d in cells if d is not None]
    return [list(c) for c in sorted(cells, key=lambda c: -c[1])[:k]]


def row_of(phase: str, job, result, project: Path) -> dict:
    run_dir = _run_dir(result, project)
    record = _read(run_dir / "run.json") or {}
    metrics = _read(run_dir / "metrics.json") or {}
    resources = record.get("resources") or {}
    try:
        n = int(metrics["data"]["n_samples"]) if result.status == "ok" else None
    except (KeyError, TypeError, ValueError):
        n = None
    seconds = round(float(result.duration_s), 1)
    return {
        "phase": phase,
        "model": job.parameters.get("model"),
        "notebook": result.notebook,
        "status": result.status,
        "seconds": seconds,
        "n_samples": n,
        "samples_per_s": round(n / seconds, 3) if n and seconds > 0 else None,
        "peak_gpu_allocated_gib": resources.get("gpu_peak_allocated_gib"),
        "peak_gpu_reserved_gib": resources.get("gpu_peak_reserved_gib"),
        "peak_cpu_rss_gib": resources.get("cpu_peak_rss_gib"),
        "slowest_cells": slowest_cells(run_dir / f"{result.notebook}.ipynb"),
        "run_dir": str(run_dir),
        "error": None if result.ok else result.line(),
        "parameters": job.parameters,
    }


def memory_check(runs: list[dict]) -> dict | None:
    """The memory check's verdict from its two runs: peak GPU memory at N and 4N samples and their ratio."""
    mem = sorted((r for r in runs if r["phase"] == "memory"), key=lambda r: r["parameters"].get("n_samples", 0))
    if len(mem) < 2 or any(r["status"] != "ok" for r in mem):
        return None
    peaks = [r["peak_gpu_allocated_gib"] or r["peak_cpu_rss_gib"] for r in mem]
    which = "gpu_allocated" if mem[0]["peak_gpu_allocated_gib"] else "cpu_rss"
    return {
        "model": mem[0]["model"],
        "notebook": mem[0]["notebook"],
        "n_samples": [r["parameters"].get("n_samples") for r in mem],
        "batch_size": mem[0]["parameters"].get("batch_size"),
        "measure": which,
        "peak_gib": peaks,
        "ratio": round(peaks[-1] / peaks[0], 3) if peaks[0] else None,
    }


def _cell(v) -> str:
    return "—" if v is None else str(v)


def _wall(report: dict) -> str:
    """The grid's wall time: one call's, or each merged call's ("not recorded" where a file lacks it)."""
    walls = report.get("grid_wall_s")
    walls = walls if isinstance(walls, list) else [walls]
    text = [f"{w} s" if w is not None else "not recorded" for w in walls]
    return text[0] if len(text) == 1 else f"{' + '.join(text)} ({len(text)} device calls)"


def _budget(report: dict) -> str:
    b = report.get("budget_s")
    return " + ".join(f"{x} s" for x in b) if isinstance(b, list) else f"{b} s"


def markdown(report: dict) -> str:
    env = report["environment"]
    merged = len(report.get("calls") or []) > 1
    commits = ", ".join(str(c["commit"])[:12] for c in report["calls"]) if merged else str(env.get("commit"))[:12]
    workers = report["workers"]
    per = f"{workers} notebook runs at a time on one {'GPU' if env.get('gpu') else 'host'}"
    if merged:
        per = "per device call: " + "; ".join(f"{c['workers']} runs at a time" for c in report["calls"])
    lines = [
        f"<!-- generated by benchmarks/grid_7b.py from {report.get('source', 'grid_7b.json')}; do not edit by hand -->",
        f"Device: {env.get('gpu') or env.get('device')}; torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}; commit{'s' if merged else ''} {commits}; data=photos; random weights (the "
        f"figures mean nothing; what is shown is that every notebook completes at this size). {per}; seconds "
        "include the kernel start and building the model; samples/s = samples "
        f"analysed / seconds. Peak GPU memory is each run's own kernel's `torch.cuda.max_memory_allocated` (weights "
        f"included). Grid wall time {_wall(report)} (budget {_budget(report)}), peak memory used on "
        f"the GPU by all runs together (nvidia-smi) {report.get('grid_peak_gpu_memory_gib')} GiB. Slowest cells: "
        "index in the executed notebook (papermill adds one cell after the parameters), seconds.",
        "",
        "| model | notebook | status | seconds | samples | samples/s | peak GPU memory (GiB) | slowest cells (#: s) |"
        + (" commit |" if merged else ""),
        "|---|---|---|---:|---:|---:|---:|---|" + ("---|" if merged else ""),
    ]
    for r in report["runs"]:
        if r["phase"] != "grid":
            continue
        slow = ", ".join(f"{i}: {d}" for i, d in r.get("slowest_cells") or []) or "—"
        lines.append(
            f"| {r['model']} | {r['notebook']} | {r['status']} | {r['seconds']} | {_cell(r['n_samples'])} | "
            f"{_cell(r['samples_per_s'])} | {_cell(r.get('peak_gpu_allocated_gib'))} | {slow} |"
            + (f" {str(r.get('commit'))[:12]} |" if merged else "")
        )
    mem = sorted((r for r in report["runs"] if r["phase"] == "memory"), key=lambda r: r["parameters"]["n_samples"])
    if mem:
        lines += [
            "",
            f"Memory as `n_samples` grows ({mem[0]['notebook']} on {mem[0]['model']}, batches of "
            f"{mem[0]['parameters'].get('batch_size')} streamed, `n_causal=0`):",
            "",
            "| n_samples | status | seconds | samples/s | peak GPU memory (GiB) | peak host memory (GiB) |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in mem:
            lines.append(
                f"| {r['parameters'].get('n_samples')} | {r['status']} | {r['seconds']} | "
                f"{_cell(r['samples_per_s'])} | {_cell(r.get('peak_gpu_allocated_gib'))} | "
                f"{_cell(r.get('peak_cpu_rss_gib'))} |"
            )
        check = memory_check(report["runs"])
        if check and check["ratio"] is not None:
            n0, n1 = check["n_samples"][0], check["n_samples"][-1]
            lines += ["", f"Peak memory at {n1} samples / at {n0}: {check['ratio']}× ({check['measure']})."]
    not_run = report.get("not_run") or []
    if not_run:
        lines += ["", f"Not run (budget of {_budget(report)} spent): {', '.join(not_run)}."]
    for r in report["runs"]:
        if r["status"] == "failed":
            lines.append(f"\nFailed: {r['error']}")
    return "\n".join(lines) + "\n"


def merge(reports: list[dict]) -> dict:
    """Several grid_7b.json (e.g. one device call per model) as one report: runs joined, later ones win."""
    out = dict(reports[0])
    runs: dict[tuple, dict] = {}
    for rep in reports:
        for r in rep["runs"]:
            r = {**r, "commit": rep["environment"].get("commit")}  # which call (code) this row comes from
            runs[(r["phase"], r["model"], r["notebook"], r["parameters"].get("n_samples"))] = r
    out["runs"] = list(runs.values())
    done = {_label(r["phase"], r["model"], r["notebook"], r["parameters"].get("n_samples")) for r in out["runs"]}
    out["not_run"] = sorted({n for rep in reports for n in rep.get("not_run") or []} - done)
    if len(reports) > 1:
        out["calls"] = [{"commit": rep["environment"].get("commit"), "workers": rep.get("workers")} for rep in reports]
        out["grid_wall_s"] = [rep.get("grid_wall_s") for rep in reports]
        out["budget_s"] = [rep.get("budget_s") for rep in reports]
        peaks = [rep.get("grid_peak_gpu_memory_gib") for rep in reports if rep.get("grid_peak_gpu_memory_gib")]
        out["grid_peak_gpu_memory_gib"] = max(peaks) if peaks else None
        out["memory_check"] = memory_check(out["runs"])
    return out


def render(results: list[Path], readme: Path = README) -> None:
    report = merge([json.loads(p.read_text()) for p in results])
    report["source"] = ", ".join(f"{p.parent.name}/{p.name}" for p in results)
    table = markdown(report)
    text = readme.read_text()
    block = f"{MARK}\n{table}{END}"
    if MARK in text and END in text:
        head, rest = text.split(MARK, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Notebooks at 7B size (`grid_7b.py`, GPU)\n\n" + block + "\n"
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, readme)
    print(f"rendered {', '.join(map(str, results))} into {readme}")


def check_models(models) -> None:
    from vtrlab.models.loader import model_schemes

    schemes = {m.split(":", 1)[0] for m in models}
    missing = sorted(schemes - set(model_schemes()))
    if missing:
        sys.exit(
            f"model builders {missing} are not registered (entry points of group 'vtrlab.model_builders'): install "
            "vtrlab in this Python (pip install -e . --no-deps --no-build-isolation works offline)"
        )


def export_runs(report: dict, project: Path, dest: Path) -> Path:
    """``dest/runs.tar.gz``: every run's run.json and metrics.json, and the executed notebook of each failed run
    (no figures: small enough to come back from the device)."""
    import tarfile

    path = dest / "runs.tar.gz"
    tmp = dest / ".runs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for r in report["runs"]:
            run_dir = Path(r["run_dir"])
            names = ["run.json", "metrics.json"] + ([f"{r['notebook']}.ipynb"] if r["status"] == "failed" else [])
            for name in names:
                if (run_dir / name).is_file():
                    tar.add(
                        run_dir / name,
                        arcname=f"{r['phase']}/{_short(r['model'])}/{r['notebook']}/"
                        f"{r['parameters'].get('n_samples')}/{name}",
                    )
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for grid_7b.json, grid_7b.md and runs.tar.gz")
    ap.add_argument("--project", type=Path, help="folder for the runs (runs/, figures/; default: OUT/project)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with tiny models (tiny:llava, tiny:llava_next)")
    ap.add_argument("--models", help="comma-separated subset of the models, e.g. llava-next-7b (default: both)")
    ap.add_argument("--workers", type=int, default=2, help="notebook runs at a time on the one GPU (default 2)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop every job and write the table after this")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory check (notebook 01 at N and 4N)")
    ap.add_argument("--render", type=Path, nargs="+", help="render grid_7b.json file(s) into benchmarks/README.md")
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated MODEL:NOTEBOOK runs to leave out (e.g. llava-next-7b:03 — a notebook by its name or its "
        "number), for a call that completes an earlier call's grid; render both files together",
    )
    ap.add_argument(
        "--commit",
        help="the source's git commit, when this runs from a copy of the tree whose .git is absent or stale (a GPU "
        "machine's staging copy); recorded in grid_7b.json and, through $VTRLAB_SOURCE_COMMIT, in every run.json",
    )
    args = ap.parse_args(argv)
    if args.render:
        render(args.render)
        return 0
    if args.out is None:
        ap.error("--out is required (or --render)")
    if args.workers < 1:
        ap.error(f"--workers={args.workers}; accepted: an integer >= 1")
    start = time.monotonic()
    device = "cpu" if args.tiny else "cuda"
    models = TINY_MODELS if args.tiny else GPU_MODELS
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in wanted if m not in {_short(x) for x in models}]
        if bad:
            ap.error(f"--models {bad}; accepted: {', '.join(_short(x) for x in models)}")
        models = tuple(m for m in models if _short(m) in wanted)
    params = {nb: {**GPU_PARAMS[nb], **(TINY_PARAMS[nb] if args.tiny else {})} for nb in NOTEBOOKS}
    try:
        skip = parse_skip(args.skip, models)
    except ValueError as e:
        ap.error(str(e))
    if args.commit:
        os.environ["VTRLAB_SOURCE_COMMIT"] = args.commit
    workers = args.workers
    # BLAS / OpenMP threads per kernel: the host's cores shared by the runs at a time, not each run taking all
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    check_models(models)
    from vtrlab.runner.grid import run_grid

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    project = (args.project or out / "project").resolve()
    project.mkdir(parents=True, exist_ok=True)
    report = {
        "environment": environment(device, args.commit),
        "skipped": sorted(f"{m} {nb}" for m, nb in skip),
        "workers": workers,
        "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "budget_s": args.budget_s,
        "tiny": args.tiny,
        "runs": [],
        "not_run": [],
        "grid_wall_s": None,
        "grid_peak_gpu_memory_gib": None,
        "memory_check": None,
    }
    result_path = out / "grid_7b.json"
    _write_json(result_path, report)
    planned = plan(models, NOTEBOOKS, params, device, not args.no_memory, args.tiny, skip)
    jobs = [j for _, j in planned]
    phase_of = {j.hash: ph for ph, j in planned}
    done: set[str] = set()

    def on_result(result):
        job = next(j for j in jobs if j.hash == result.hash)
        done.add(result.hash)
        report["runs"].append(row_of(phase_of[job.hash], job, result, project))
        print(result.line(), flush=True)
        _write_json(result_path, report)

    def on_alarm(signum, frame):
        raise Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(args.budget_s - (time.monotonic() - start), 1.0))
    t0 = time.monotonic()
    mem = GpuMemory()
    try:
        with mem:
            run_grid(
                jobs,
                workers=workers,
                gpus=["0"] * workers if device == "cuda" else None,
                root=project,
                on_result=on_result,
                progress=False,
            )
    except Deadline:
        report["not_run"] = [
            _label(phase_of[j.hash], j.parameters.get("model"), Path(j.notebook).stem, j.parameters.get("n_samples"))
            for j in jobs
            if j.hash not in done
        ]
        print(f"budget of {args.budget_s} s spent: stopped; not run: {report['not_run']}", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        report["grid_wall_s"] = round(time.monotonic() - t0, 1)
        report["grid_peak_gpu_memory_gib"] = mem.peak_gib
        report["memory_check"] = memory_check(report["runs"])
        _write_json(result_path, report)
        (out / "grid_7b.md").write_text(markdown(report))
        export_runs(report, project, out)
    print(markdown(report))
    failed = [r for r in report["runs"] if r["status"] == "failed"]
    return 1 if failed or report["not_run"] else 0


if __name__ == "__main__":
    sys.exit(main())
