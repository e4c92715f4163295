"""Notebooks 01-04 on the photo set at 7B size: the path from a user's checkpoint and data to figures, on the GPU.

Runs every notebook of ``NOTEBOOKS`` with ``data=photos`` on the full-size random-weight LLaVA-1.5-7B and
LLaVA-NeXT-7B shapes (``model="full_size:<name>"``, bf16, cuda: ``vtrlab.testing.full_size`` reached through
the notebooks' ``model`` parameter) as one ``vtrlab`` grid (local back-end, ``--workers`` jobs at a time on the
GPU), then notebook 01 alone at two ``n_samples`` (the memory check: batches are streamed, so the GPU's peak
memory should not grow with ``n_samples``). Random weights make the figures meaningless; what is measured is
that every notebook completes at 7B size, how long it takes and how many samples per second it gets through.

GPU, the lead through the device tool, in ONE call (ends within ``--budget-s``, default 510 s)::

    python benchmarks/grid_7b.py --out $OUT/grid_7b

CPU dry run with tiny models (``tiny:llava``, ``tiny:llava_next``; same code path, smaller parameters)::

    python benchmarks/grid_7b.py --tiny --out /tmp/grid_tiny

Render the table into benchmarks/README.md (between ``<!-- grid7b -->`` markers) from a fetched result::

    python benchmarks/grid_7b.py --render DIR/grid_7b.json

Writes ``OUT/grid_7b.json`` (environment, one row per run: status, seconds, samples, samples/s, error;
the memory check; rewritten after every run), ``OUT/grid_7b.md`` (the table) and ``OUT/project/`` (the runs
with their provenance records ``run.json``, executed notebooks, tables and figures). Every run's duration
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
# notebook gains or loses one). Sizes keep the whole call within the device tool's 9 minutes.
GPU_PARAMS = {
    # n_causal=0: the causal section's vision [CLS] signal fails on multi-tile layouts (LLaVA-NeXT: "(row, col)
    # outside the 4x4 grid", vtrlab.analysis.randomization.attention_signals); set it > 0 once that is fixed.
    "01_attention_per_layer": dict(n_samples=16, batch_size=4, n_examples=2, n_layers_shown=4, n_causal=0),
    "02_information_flow": dict(n_samples=4, batch_size=2, window=9),
    "03_reconstruction_selector": dict(
        train=True,
        n_train=64,
        steps=40,
        d_model=64,
        layers=1,
        n_eval=2,
        budgets=[0.3, 1.0],
        n_layer_samples=4,
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
MEMORY_SAMPLES = (4, 23)  # notebook 01's n_samples in the memory check (23: the whole photo set)
TINY_MEMORY_SAMPLES = (2, 6)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def environment(device: str) -> dict:
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


def jobs_for(models, notebooks, params, device: str, extra: dict | None = None):
    from vtrlab.runner.params import read_parameters
    from vtrlab.runner.run import prepare_job

    out = []
    for model in models:
        for nb in notebooks:
            path = ROOT / "notebooks" / f"{nb}.ipynb"
            spec = read_parameters(path)
            values = {"model": model, "data": "photos", "device": device, "seed": 0, **params[nb], **(extra or {})}
            values = {k: v for k, v in values.items() if k in spec}
            out.append(prepare_job(path, values, figures="run", force=True, spec=spec))
    return out


def _samples(run_dir: Path) -> int | None:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return int(metrics["data"]["n_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def row_of(job, result, project: Path, phase: str, peak_gib=None) -> dict:
    run_dir = project / result.run_dir if not Path(result.run_dir).is_absolute() else Path(result.run_dir)
    n = _samples(run_dir) if result.status == "ok" else None
    seconds = round(float(result.duration_s), 1)
    return {
        "phase": phase,
        "model": job.parameters.get("model"),
        "notebook": result.notebook,
        "status": result.status,
        "seconds": seconds,
        "n_samples": n,
        "samples_per_s": round(n / seconds, 3) if n and seconds > 0 else None,
        "peak_gpu_memory_gib": peak_gib,
        "run_dir": str(result.run_dir),
        "error": None if result.ok else result.line(),
        "parameters": job.parameters,
    }


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"<!-- generated by benchmarks/grid_7b.py from {report.get('source', 'grid_7b.json')}; do not edit by hand -->",
        f"Device: {env.get('gpu') or env.get('device')}; torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}; commit {str(env.get('commit'))[:12]}; data=photos; random weights (the figures "
        f"mean nothing; what is shown is that every notebook completes at this size). {report['workers']} notebook "
        f"runs at a time on one GPU; seconds include the kernel start and building the model. Grid wall time "
        f"{report['grid_wall_s']} s, peak GPU memory during the grid {report.get('grid_peak_gpu_memory_gib')} GiB.",
        "",
        "| model | notebook | status | seconds | samples | samples/s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in report["runs"]:
        if r["phase"] != "grid":
            continue
        lines.append(
            f"| {r['model']} | {r['notebook']} | {r['status']} | {r['seconds']} | {r['n_samples'] or '—'} | "
            f"{r['samples_per_s'] or '—'} |"
        )
    mem = [r for r in report["runs"] if r["phase"] == "memory"]
    if mem:
        lines += [
            "",
            "Memory as `n_samples` grows (notebook 01 alone on the GPU, streamed batches of "
            f"{mem[0]['parameters'].get('batch_size')}):",
            "",
            "| model | n_samples | status | seconds | samples/s | peak GPU memory (GiB) |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for r in mem:
            peak = "—" if r["peak_gpu_memory_gib"] is None else r["peak_gpu_memory_gib"]
            lines.append(
                f"| {r['model']} | {r['parameters'].get('n_samples')} | {r['status']} | {r['seconds']} | "
                f"{r['samples_per_s'] or '—'} | {peak} |"
            )
    not_run = report.get("not_run") or []
    if not_run:
        lines += ["", f"Not run (budget of {report['budget_s']} s spent): {', '.join(not_run)}."]
    failed = [r for r in report["runs"] if r["status"] == "failed"]
    for r in failed:
        lines.append(f"\nFailed: {r['error']}")
    return "\n".join(lines) + "\n"


def render(result: Path, readme: Path = README) -> None:
    report = json.loads(result.read_text())
    report["source"] = result.name
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
    print(f"rendered {result} into {readme}")


def check_models(models) -> None:
    from vtrlab.models.loader import model_schemes

    schemes = {m.split(":", 1)[0] for m in models}
    missing = sorted(schemes - set(model_schemes()))
    if missing:
        sys.exit(
            f"model builders {missing} are not registered (entry points of group 'vtrlab.model_builders'): install "
            "vtrlab in this Python (pip install -e . --no-deps --no-build-isolation works offline)"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for grid_7b.json, grid_7b.md and project/ (the runs)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with tiny models (tiny:llava, tiny:llava_next)")
    ap.add_argument("--workers", type=int, default=None, help="notebook runs at a time (default: 4 on GPU, 2 tiny)")
    ap.add_argument("--budget-s", type=float, default=510.0, help="stop every job and write the table after this")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory check (notebook 01 at two n_samples)")
    ap.add_argument("--render", type=Path, help="render this grid_7b.json into benchmarks/README.md and exit")
    args = ap.parse_args(argv)
    if args.render:
        render(args.render)
        return 0
    if args.out is None:
        ap.error("--out is required (or --render)")
    start = time.monotonic()
    device = "cpu" if args.tiny else "cuda"
    models = TINY_MODELS if args.tiny else GPU_MODELS
    params = {nb: {**GPU_PARAMS[nb], **(TINY_PARAMS[nb] if args.tiny else {})} for nb in NOTEBOOKS}
    workers = args.workers or (2 if args.tiny else 4)
    if workers < 1:
        ap.error(f"--workers={workers}; accepted: an integer >= 1")
    check_models(models)
    from vtrlab.runner.grid import run_grid

    out = args.out.resolve()
    project = out / "project"
    project.mkdir(parents=True, exist_ok=True)
    report = {
        "environment": environment(device),
        "workers": workers,
        "budget_s": args.budget_s,
        "tiny": args.tiny,
        "runs": [],
        "not_run": [],
        "grid_wall_s": None,
        "grid_peak_gpu_memory_gib": None,
    }
    result_path = out / "grid_7b.json"
    _write_json(result_path, report)

    def on_alarm(signum, frame):
        raise Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(args.budget_s - (time.monotonic() - start), 1.0))

    def phase(jobs, name, n_workers, track_memory):
        done = {}

        def on_result(result):
            job = next(j for j in jobs if j.hash == result.hash)
            done[result.hash] = True
            report["runs"].append(row_of(job, result, project, name))
            print(result.line(), flush=True)
            _write_json(result_path, report)

        t0 = time.monotonic()
        with GpuMemory() as mem:
            try:
                run_grid(
                    jobs,
                    workers=n_workers,
                    gpus=["0"] * n_workers if device == "cuda" else None,
                    root=project,
                    on_result=on_result,
                    progress=False,
                )
            except Deadline:
                report["not_run"] += [
                    f"{j.parameters.get('model')} {Path(j.notebook).stem}"
                    f"{' n_samples=' + str(j.parameters.get('n_samples')) if name == 'memory' else ''}"
                    for j in jobs
                    if j.hash not in done
                ]
                raise
            finally:
                if track_memory and mem.peak_gib is not None and report["runs"]:
                    report["runs"][-1]["peak_gpu_memory_gib"] = mem.peak_gib
        return round(time.monotonic() - t0, 1), mem.peak_gib

    try:
        grid = jobs_for(models, NOTEBOOKS, params, device)
        report["grid_wall_s"], report["grid_peak_gpu_memory_gib"] = phase(grid, "grid", workers, False)
        _write_json(result_path, report)
        if not args.no_memory:  # one run at a time, alone on the GPU: the peak belongs to that run
            model = models[-1]
            for n in TINY_MEMORY_SAMPLES if args.tiny else MEMORY_SAMPLES:
                phase(jobs_for([model], [NOTEBOOKS[0]], params, device, extra={"n_samples": n}), "memory", 1, True)
    except Deadline:
        print(f"budget of {args.budget_s} s spent: stopped; not run: {report['not_run']}", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _write_json(result_path, report)
        (out / "grid_7b.md").write_text(markdown(report))
    print(markdown(report))
    failed = [r for r in report["runs"] if r["status"] == "failed"]
    return 1 if failed or report["not_run"] else 0


if __name__ == "__main__":
    sys.exit(main())
