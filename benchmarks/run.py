"""Every benchmark in one time-boxed command; one JSON per benchmark; the README tables regenerated.

GPU (the lead, through the device tool, in ONE call of at most 9 minutes)::

    python benchmarks/run.py --out $OUT                        # everything, ends within --budget-s (510 s)
    python benchmarks/run.py --out $OUT --only capture,reduce  # a subset
    python benchmarks/run.py --out $OUT --only capture,flow --budget-s 280 --wheels .whl/bench,.whl/store
    python benchmarks/run.py --out $OUT --only reduce --gpus 2 --budget-s 400   # reduce's 2 shapes at once

capture and flow time at least ``--rounds`` (15) interleaved rounds after ``--warmup`` (2) calls of each case, on
the GPU more until 20 s of rounds (``capture.measure_interleaved``, ``MIN_ROUND_SECONDS``); capture's units also
write a torch.profiler summary per shape (``profile_gpu.py``: LLaVA-1.5-7B and LLaVA-NeXT-7B at batch 1) to
``DIR/profile_gpu.json``, rendered between ``<!-- bench:profile_gpu -->`` markers (``--no-profile`` skips it).

CPU smoke run (tiny models, all parts, about two minutes on an idle 2-core machine)::

    python benchmarks/run.py --out /tmp/bench --smoke

Re-render benchmarks/README.md from JSONs fetched back from the device (no measuring)::

    python benchmarks/run.py --render DIR

Parts, in order: ``organism`` (the embedded model's CPU forward, organism_forward.py), ``capture``
(capture.py: vtrlab capture vs plain sdpa, eager ``output_attentions`` and TransformerLens
``run_with_cache``, at batch 1 and 8), ``reduce`` (reduce.py: reduction latency), ``flow``
(flow.py: saliency and other information-flow probes, when that script exists). Each part runs in a
child process, one shape at a time, each with a time-box: a part gets the remaining budget times its
share over the shares still to run, so time a part does not use passes on. A child that runs past its
box is killed; what it wrote so far (the scripts write after each case) is kept and marked partial.

``--gpus N`` (reduce only): its shapes run at once, shape j on GPU j (``CUDA_VISIBLE_DEVICES``) and on its own
slice of the cores (``sched_setaffinity``, ``OMP_NUM_THREADS`` = the slice), each with the part's whole box;
their logs go to ``DIR/run-<shape>.log`` (and into run.log at the end). A reduce child is told its box minus
15 s (``--time-budget``) so it ends its last cell and writes its table before the box would kill it.

Writes ``DIR/<part>.json`` (the shapes merged), ``DIR/run.json`` (what ran, how long, what timed out,
written after every step) and ``DIR/README.md`` (benchmarks/README.md with its tables regenerated).
Without ``--smoke``, benchmarks/README.md itself is regenerated too (``--no-readme`` to skip).
Tables live between ``<!-- bench:<part> -->`` and ``<!-- /bench:<part> -->`` markers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = HERE / "README.md"
PARTS = ("organism", "capture", "reduce", "flow")
# share of the budget; the rest of a part's box passes on to the next parts
SHARES = {"organism": 0.06, "capture": 0.44, "reduce": 0.30, "flow": 0.20}
GPU_SHAPES = ("llava-1.5-7b", "llava-next-7b")
TINY_SHAPES = ("llava-1.5-tiny", "llava-next-tiny")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _load_module(name: str):
    # the benchmark scripts import vtrlab: from a checkout where it is not installed (the device machine) the repo
    # root is where it is, as the children's PYTHONPATH says (session 10's first render failed without it)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    path = HERE / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"vtrlab_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PROFILE = "profile_gpu"  # capture's units add their torch.profiler summary (profile_gpu.py) to parts/profile_gpu.json


def _units(
    part: str, out: Path, smoke: bool, repeats: int, warmup: int, profile: bool = True
) -> list[tuple[str, list[str], Path]]:
    """(label, argv, json path) per child process of ``part``."""
    py = sys.executable
    shapes = TINY_SHAPES if smoke else GPU_SHAPES
    tmp = out / "parts"
    rw = ["--repeats", str(repeats), "--warmup", str(warmup)]
    if part == "organism":
        path = tmp / "organism.json"
        small = ["--batch", "2"] if smoke else []
        return [("organism", [py, str(HERE / "organism_forward.py"), "--out", str(path), *small, *rw], path)]
    if part == "capture":
        flag = ["--tiny", "--batch", "1,2"] if smoke else ["--batch", "1,8"]
        if profile:
            flag += ["--profile", str(tmp / f"{PROFILE}.json")]
        return [
            (
                s,
                [py, str(HERE / "capture.py"), "--shapes", s, "--out", str(tmp / f"capture-{s}.json"), *flag, *rw],
                tmp / f"capture-{s}.json",
            )
            for s in shapes
        ]
    if part == "reduce":
        # reduce.py's own defaults (median of 7 after 2, 4 decode tokens) unless smoke
        flag = ["--smoke", "--new-tokens", "2", *rw] if smoke else []
        return [
            (
                s,
                [py, str(HERE / "reduce.py"), "--shapes", s, "--out", str(tmp / f"reduce-{s}.json"), *flag],
                tmp / f"reduce-{s}.json",
            )
            for s in shapes
        ]
    if part == "flow":
        path = tmp / "flow.json"
        return [("flow", [py, str(HERE / "flow.py"), "--out", str(path), *(["--smoke"] if smoke else []), *rw], path)]
    raise ValueError(f"unknown part {part!r}; choose from {PARTS}")


# Wheels the TransformerLens peer needs on the GPU image (python 3.12, torch 2.11, transformers 5.17), carried
# as files: transformer_lens and what it imports at import time that the image lacks. Checked on CPU with every
# other package blocked that the image lacks (see benchmarks/README.md): beartype, fancy_einsum, typeguard
# (.whl/bench) and datasets, dill, multiprocess (.whl/store); wandb and transformers_stream_generator are
# imported lazily and not needed.
PEER_WHEELS = ("transformer_lens", "beartype", "fancy_einsum", "typeguard", "datasets", "dill", "multiprocess")
EXTRA_PATH: list[str] = []  # directories put on the children's PYTHONPATH (after the repo), e.g. --wheels'


def install_wheels(dirs: list[Path], log: Path) -> dict:
    """``pip install --no-index --no-deps`` the peer wheels found in ``dirs`` into a fresh directory outside
    ``--out`` (so nothing of it is fetched back), put on the children's PYTHONPATH. Returns what happened."""
    import tempfile

    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    wheels, missing, other_python = [], [], []
    for name in PEER_WHEELS:
        found = sorted(w for d in dirs for w in d.glob(f"{name}-*.whl"))
        fits = [w for w in found if parse_wheel_filename(w.name)[3] & supported]
        if fits:
            wheels.append(fits[-1])  # one version of each (two would stop the whole install)
        elif found:  # e.g. multiprocess's py312 wheel on a 3.11 CPU host: the installed one is used
            other_python.append(found[-1].name)
        else:
            missing.append(name)
    info = {"dirs": [str(d) for d in dirs], "wheels": [w.name for w in wheels], "missing": missing}
    if other_python:
        info["not_for_this_python"] = other_python
    if not wheels:
        info["status"] = "no wheels found"
        return info
    target = Path(tempfile.mkdtemp(prefix="vtrlab-bench-site-"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--target", str(target), *map(str, wheels)]  # fmt: skip
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    info["status"] = "ok" if rc == 0 else f"pip failed (exit {rc}); see run.log"
    if rc == 0:
        EXTRA_PATH.append(str(target))
        info["site"] = str(target)
    return info


def _run_child(argv: list[str], timeout: float, log: Path) -> tuple[str, float]:
    """Run ``argv`` in its own process group, killed (the whole group) after ``timeout`` s."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *EXTRA_PATH] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    t0 = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        status = _wait_or_kill(proc, max(1.0, timeout), timeout)
    return status, time.monotonic() - t0


def _wait_or_kill(proc: subprocess.Popen, wait_s: float, box_s: float) -> str:
    """Wait up to ``wait_s`` for a child started in its own session; past it, SIGTERM its process group (SIGKILL
    after 10 s). Returns its status line ("ok", "failed (exit N)", "timed out after <box_s> s")."""
    try:
        rc = proc.wait(timeout=wait_s)
        return "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return f"timed out after {box_s:.0f} s"


PARALLEL_PARTS = ("reduce",)  # parts whose units (one shape each) may run at once, one GPU each (--gpus)


def core_slices(n: int, cores: list[int] | None = None) -> list[list[int]]:
    """The CPU cores this process may use split into ``n`` disjoint, equal, contiguous slices (the remainder
    left unused), so that children pinned to them do not share cores."""
    if cores is None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    if n < 1 or len(cores) < n:
        raise ValueError(f"cannot split {len(cores)} cores into {n} slices")
    k = len(cores) // n
    return [cores[j * k : (j + 1) * k] for j in range(n)]


def _gpu_ids(n: int) -> list[str]:
    """The first ``n`` GPUs as CUDA_VISIBLE_DEVICES entries (respecting a CUDA_VISIBLE_DEVICES already set)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(j) for j in range(n)]
    if len(ids) < n:
        raise ValueError(f"--gpus {n}: CUDA_VISIBLE_DEVICES={visible!r} names only {len(ids)} device(s)")
    return ids[:n]


def _run_children_parallel(jobs: list[tuple[str, list[str]]], timeout: float, out: Path, gpus: int) -> dict:
    """Run ``jobs`` ((label, argv), at most ``gpus``) at once: job j sees only GPU j (CUDA_VISIBLE_DEVICES) and
    runs on its own slice of the cores (``sched_setaffinity``; OMP/MKL threads = the slice's size), each in
    its own process group with its own log (``out/run-<label>.log``, appended to run.log at the end); a job
    past ``timeout`` is killed (its whole group). Returns {label: (status, seconds)}."""
    if len(jobs) > gpus:
        raise ValueError(f"{len(jobs)} jobs for {gpus} GPUs")
    slices = core_slices(len(jobs))
    ids = _gpu_ids(len(jobs))
    procs, logs, t0 = {}, {}, time.monotonic()
    for (label, argv), cores, gpu in zip(jobs, slices, ids):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *EXTRA_PATH] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["CUDA_VISIBLE_DEVICES"] = gpu
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(len(cores))
        logs[label] = out / f"run-{label}.log"
        fh = open(logs[label], "w")
        fh.write(f"$ CUDA_VISIBLE_DEVICES={gpu} taskset -c {','.join(map(str, cores))} {' '.join(argv)}\n")
        fh.flush()
        procs[label] = (
            subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=(lambda c=cores: os.sched_setaffinity(0, c)) if hasattr(os, "sched_setaffinity") else None,
            ),
            fh,
        )
    result = {}
    for label, (proc, fh) in procs.items():
        left = timeout - (time.monotonic() - t0)
        status = _wait_or_kill(proc, max(1.0, left), timeout)
        fh.close()
        result[label] = (status, time.monotonic() - t0)
    with open(out / "run.log", "a") as fh:
        for label, path in logs.items():
            fh.write(f"----- {label} (parallel) -----\n{path.read_text()}")
    return result


def _merge(paths: list[Path]) -> dict | None:
    """One report from per-shape reports (header of the first, shapes concatenated)."""
    merged = None
    for p in paths:
        if not p.exists():
            continue
        rep = json.loads(p.read_text())
        if merged is None:
            merged = dict(rep)
            merged["shapes"] = list(rep.get("shapes", []))
        else:
            merged["shapes"].extend(rep.get("shapes", []))
    return merged


def _child_budget(part: str, box: float) -> list[str]:
    """The time budget a child is told (so it ends its last cell and writes its table before the box kills it);
    reduce.py plans its cells against it."""
    if part == "reduce":
        return ["--time-budget", f"{max(box - 15.0, 5.0):.0f}"]
    return []


# --------------------------------------------------------------------------------------------
# tables


def _organism_table(rep: dict) -> str:
    return (
        f"Batch of {rep['batch']} ({rep['seq_len']} tokens), {rep['threads']} threads, median of {rep['repeats']} "
        f"after {rep['warmup']} warm-up: **{rep['median_s']:.3f} s** (min {rep['min_s']:.3f}, max "
        f"{rep['max_s']:.3f}; target ≤ {rep['target_s']} s); CPU {rep.get('cpu')}, load average "
        f"{', '.join(f'{x:.1f}' for x in rep.get('load_average') or [])}."
    )


def tables(out: Path) -> dict[str, str]:
    """Markdown per part from the JSONs in ``out`` (parts without a JSON are left out)."""
    found = {}
    for part in PARTS:
        path = out / f"{part}.json"
        if not path.exists():
            continue
        rep = json.loads(path.read_text())
        if part == "organism":
            found[part] = _organism_table(rep)
            continue
        script = HERE / f"{part}.py"
        mod = _load_module(part) if script.exists() else None
        if mod is None or not hasattr(mod, "markdown"):
            found[part] = f"(`{part}.json` written; `{part}.py` has no `markdown(report)` to render it)"
            continue
        text = mod.markdown(rep)
        if rep.get("partial"):
            text += f"\n\nPartial: {rep['partial']}"
        found[part] = text
    path = out / f"{PROFILE}.json"
    if path.exists():
        found[PROFILE] = _load_module(PROFILE).markdown(json.loads(path.read_text()))
    return found


def render(readme_text: str, found: dict[str, str], source: str) -> str:
    """Replace the text between each part's markers with its table (markers without a table: kept)."""
    for part, table in found.items():
        pattern = re.compile(rf"(<!-- bench:{part} -->\n).*?(<!-- /bench:{part} -->)", re.DOTALL)
        if not pattern.search(readme_text):
            print(f"README has no <!-- bench:{part} --> markers; {part} table not placed", file=sys.stderr)
            continue
        body = f"<!-- generated by benchmarks/run.py from {source}/{part}.json; do not edit by hand -->\n{table}\n"
        readme_text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), readme_text)
    return readme_text


def write_readmes(out: Path, update_repo_readme: bool, source: str | None = None) -> dict[str, str]:
    found = tables(out)
    text = render(README.read_text(), found, source or str(out))
    (out / "README.md").write_text(text)
    if update_repo_readme:
        tmp = README.with_name(".README.md.tmp")
        tmp.write_text(text)
        os.replace(tmp, README)
    return found


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="directory for the JSONs, run.json, logs and README.md")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, every part (about two minutes)")
    ap.add_argument("--only", default=None, help=f"comma-separated parts of {list(PARTS)} (default: all)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget for everything (default 510 s; 110 s with --smoke)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5; 1 with --smoke)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs per case (default 2; 0 with --smoke)")
    ap.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="GPUs to spread the reduce part over: its shapes run at once, each on its own GPU and its own slice "
        "of the cores (default 1: one after the other)",
    )
    ap.add_argument("--no-readme", action="store_true", help="do not regenerate benchmarks/README.md")
    ap.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the torch.profiler summary capture adds per shape (profile_gpu.py; ~20 s of GPU time)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved timing rounds of capture and flow (default 15; 1 with --smoke)",
    )
    ap.add_argument(
        "--wheels",
        default=None,
        help="comma-separated directories of carried wheels (e.g. .whl/bench,.whl/store): the TransformerLens "
        "peer's are installed (--no-index --no-deps) into a temporary directory the children import from",
    )
    ap.add_argument(
        "--render",
        metavar="DIR",
        default=None,
        help="only regenerate benchmarks/README.md from the JSONs in DIR (no measuring)",
    )
    args = ap.parse_args(argv)
    if args.render:
        src = Path(args.render)
        if not src.is_dir():
            ap.error(f"--render {src}: no such directory")
        found = write_readmes(src, update_repo_readme=True, source=src.name)
        print(f"regenerated {README} from {sorted(found)}")
        return 0
    if not args.out:
        ap.error("--out DIR is required (or --render DIR)")
    parts = list(PARTS) if args.only is None else [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"--only {args.only!r}: unknown part(s) {unknown}; choose from {list(PARTS)}")
    budget = args.budget_s if args.budget_s is not None else (110.0 if args.smoke else 510.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 5)
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 15)
    warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 2)
    if args.gpus < 1:
        ap.error(f"--gpus {args.gpus}; accepted: an integer >= 1")
    if budget <= 0 or repeats < 1 or warmup < 0 or rounds < 1:
        ap.error(
            f"need --budget-s > 0, --repeats >= 1, --rounds >= 1, --warmup >= 0 "
            f"(got {budget}, {repeats}, {rounds}, {warmup})"
        )
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            ap.error("the full run needs a CUDA GPU; use --smoke on CPU")

    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    log = out / "run.log"
    t_start = time.monotonic()
    deadline = t_start + budget
    summary = {
        "smoke": args.smoke,
        "budget_s": budget,
        "repeats": repeats,
        "warmup": warmup,
        "parts": {},
        "python": sys.version.split()[0],
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.wheels:
        dirs = [Path(d.strip()) for d in args.wheels.split(",") if d.strip()]
        absent = [str(d) for d in dirs if not d.is_dir()]
        summary["wheels"] = {"status": f"no such directory: {absent}"} if absent else install_wheels(dirs, log)
        print(f"[run] wheels: {summary['wheels'].get('status')} {summary['wheels'].get('wheels', '')}", flush=True)
    _write_json(out / "run.json", summary)
    order = [p for p in PARTS if p in parts]
    if "flow" in order and not (HERE / "flow.py").exists():
        order.remove("flow")  # its share of the budget goes to the others
        summary["parts"]["flow"] = {"units": {}, "status": "skipped: benchmarks/flow.py does not exist yet"}
    for i, part in enumerate(order):
        entry = summary["parts"].setdefault(part, {"units": {}})
        remaining = deadline - time.monotonic()
        share = SHARES[part] / sum(SHARES[p] for p in order[i:])
        part_deadline = time.monotonic() + remaining * share
        # capture and flow time interleaved rounds (>= 15 on the GPU); the organism its own repeats
        reps, warm = (rounds, warmup) if part in ("capture", "flow") else (repeats, warmup)
        units = _units(part, out, args.smoke, reps, warm, profile=not args.no_profile)
        if args.gpus > 1 and part in PARALLEL_PARTS and not args.smoke:
            box = part_deadline - time.monotonic()
            jobs = [(label, [*cmd, *_child_budget(part, box)]) for label, cmd, _ in units]
            print(f"[run] {part}: {len(jobs)} units at once on {args.gpus} GPUs, time-box {box:.0f} s", flush=True)
            for j in range(0, len(jobs), args.gpus):
                done = _run_children_parallel(jobs[j : j + args.gpus], part_deadline - time.monotonic(), out, args.gpus)
                for label, (status, took) in done.items():
                    path = next(p for lb, _, p in units if lb == label)
                    rel = str(path.relative_to(out))
                    entry["units"][label] = {"status": status, "seconds": round(took, 1), "json": rel, "parallel": True}
                    print(f"[run] {part}/{label}: {status} in {took:.0f} s", flush=True)
                _write_json(out / "run.json", summary)
            units_left = []
        else:
            units_left = units
        for j, (label, cmd, path) in enumerate(units_left):
            box = (part_deadline - time.monotonic()) / (len(units_left) - j)
            if box < 5:
                entry["units"][label] = {"status": "skipped: no time left in the budget"}
                continue
            print(f"[run] {part}/{label}: time-box {box:.0f} s", flush=True)
            status, took = _run_child([*cmd, *_child_budget(part, box)], box, log)
            entry["units"][label] = {"status": status, "seconds": round(took, 1), "json": str(path.relative_to(out))}
            print(f"[run] {part}/{label}: {status} in {took:.0f} s", flush=True)
            _write_json(out / "run.json", summary)
        merged = _merge([path for _, _, path in units])
        bad = {k: v["status"] for k, v in entry["units"].items() if v["status"] != "ok"}
        entry["status"] = "ok" if not bad else f"partial: {bad}"
        if merged is not None:
            if bad:
                merged["partial"] = "; ".join(f"{k}: {v}" for k, v in bad.items())
            _write_json(out / f"{part}.json", merged)
        if part == "capture" and (out / "parts" / f"{PROFILE}.json").exists():
            _write_json(out / f"{PROFILE}.json", json.loads((out / "parts" / f"{PROFILE}.json").read_text()))
        _write_json(out / "run.json", summary)
    found = write_readmes(out, update_repo_readme=not (args.smoke or args.no_readme))
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    summary["tables"] = sorted(found)
    _write_json(out / "run.json", summary)
    print(
        f"[run] done in {summary['seconds']:.0f} s (budget {budget:.0f} s); tables: {sorted(found)}; "
        f"see {out / 'run.json'} and {out / 'README.md'}",
        flush=True,
    )
    for part, entry in summary["parts"].items():
        print(f"  {part:9s} {entry.get('status')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
