"""Where a capture call's time goes on the GPU: a small JSON summary of torch.profiler runs (not the trace).

Run by ``capture.py --profile PATH`` on the model it has already built (``run.py`` passes it for the
LLaVA-1.5-7B unit: batch 1, every capture case; and for LLaVA-NeXT-7B: batch 1, every capture case),
or on its own::

    python benchmarks/profile_gpu.py --out $OUT/profile_gpu.json                     # LLaVA-1.5-7B, batch 1
    python benchmarks/profile_gpu.py --tiny --out /tmp/profile_gpu.json              # CPU smoke run

Per case (a plain sdpa forward, then each capture case), after ``--warmup`` calls:

* ``wall_ms``: median of ``--calls`` synchronised calls with phase timers on (no profiler), and the host
  time per phase (``profile_capture.py``'s phases: specs, switch, forward, rows, record, labels, vision,
  dataset; ``host_outside_forward`` = wall - forward);
* from ``--calls`` calls under ``torch.profiler`` (CPU + CUDA activities), per call: ``gpu_kernel_ms`` (sum
  of kernel times), ``gpu_busy_ms`` (union of kernel and copy intervals: the GPU is idle for the rest of
  the wall time, i.e. waiting for the host), ``kernels`` (device kernels run), ``memcpy`` (device copies by
  kind), ``runtime`` (CUDA runtime calls by name: launches, ``cudaStreamSynchronize``,
  ``cudaEventSynchronize``, ``cudaMemcpy*``, ``cudaHostAlloc``...), ``host_syncs`` (the synchronising ones,
  the harness's own ``cudaDeviceSynchronize`` after each call excluded), ``aten_ops`` (operator calls);
* ``added_over_sdpa``: per capture case, the operators called more often than in the plain forward, by the
  self host time they add (top 12), and the differences of the totals above.

On CPU only the CPU activity is recorded (no kernel, copy or sync numbers).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", _HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# CUDA runtime / driver calls that block the host until the device (or a stream / event) is done
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpy2D")


def _is_sync(name: str) -> bool:
    return name in SYNC_CALLS or (name.startswith("cuMemcpy") and "Async" not in name)


HARNESS_SYNC = "cudaDeviceSynchronize"  # torch.cuda.synchronize() after each profiled call


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _is_device(evt) -> bool:
    from torch.autograd import DeviceType

    return getattr(evt, "device_type", None) == DeviceType.CUDA


def summarise(prof, calls: int, cuda: bool) -> dict:
    """Per-call numbers of one profiled case (see the module docstring)."""
    events = list(prof.events())
    ops = Counter()
    self_us = defaultdict(float)
    runtime = Counter()
    runtime_us = defaultdict(float)
    kernels, kernel_us, intervals, memcpy = 0, 0.0, [], Counter()
    for e in events:
        name = e.name
        if _is_device(e):
            tr = e.time_range
            intervals.append((tr.start, tr.end))
            if name.startswith("Memcpy") or name.startswith("Memset"):
                memcpy[name] += 1
            else:
                kernels += 1
                kernel_us += tr.end - tr.start
            continue
        if name.startswith("aten::"):
            ops[name] += 1
            self_us[name] += getattr(e, "self_cpu_time_total", 0.0)
        elif name.startswith("cuda") or name.startswith("cu"):
            runtime[name] += 1
            runtime_us[name] += e.time_range.end - e.time_range.start
    out = {
        "aten_ops": sum(ops.values()) / calls,
        "aten_self_host_ms": sum(self_us.values()) / calls / 1000,
        "ops": {k: v / calls for k, v in ops.items()},
        "ops_self_ms": {k: v / calls / 1000 for k, v in self_us.items()},
    }
    if cuda:
        syncs = sum(v for k, v in runtime.items() if _is_sync(k)) - min(runtime.get(HARNESS_SYNC, 0), calls)
        out.update(
            {
                "gpu_kernel_ms": kernel_us / calls / 1000,
                "gpu_busy_ms": _union_us(intervals) / calls / 1000,
                "kernels": kernels / calls,
                "memcpy": {k: v / calls for k, v in memcpy.items()},
                "runtime": {k: v / calls for k, v in sorted(runtime.items())},
                "runtime_ms": {k: round(v / calls / 1000, 4) for k, v in sorted(runtime_us.items())},
                "host_syncs": syncs / calls,
            }
        )
    return out


def _added(case: dict, base: dict, top: int) -> dict:
    names = set(case["ops"]) | set(base["ops"])
    rows = []
    for n in names:
        d_calls = case["ops"].get(n, 0) - base["ops"].get(n, 0)
        d_ms = case["ops_self_ms"].get(n, 0) - base["ops_self_ms"].get(n, 0)
        if d_calls > 0:  # operators the plain forward also runs as often differ only by timing noise
            rows.append({"op": n, "calls": round(d_calls, 2), "self_host_ms": round(d_ms, 4)})
    rows.sort(key=lambda r: (-r["self_host_ms"], -r["calls"]))
    out = {"top_ops": rows[:top]}
    for k in ("aten_ops", "aten_self_host_ms", "gpu_kernel_ms", "gpu_busy_ms", "kernels", "host_syncs"):
        if k in case and k in base:
            out[k] = round(case[k] - base[k], 4)
    return out


def profile_cases(cases: dict, device, calls: int = 3, warmup: int = 2, top: int = 12, vlm=None) -> dict:
    """Profile every case of ``cases`` (name -> fn; the first is the baseline). With ``vlm``, the capture
    cases also get phase times (``profile_capture.instrument``)."""
    from torch.profiler import ProfilerActivity, profile

    pc = _load("profile_capture") if vlm is not None else None
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    result = {}
    base_name = next(iter(cases))
    for name, fn in cases.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        timers = pc.instrument(vlm) if (pc is not None and name != base_name) else None
        walls, phases = [], defaultdict(list)
        try:
            for _ in range(calls):
                if timers is not None:
                    timers.acc.clear()
                t = time.perf_counter()
                fn()
                _sync(device)
                walls.append(time.perf_counter() - t)
                if timers is not None:
                    for p in pc.PHASES:
                        phases[p].append(timers.acc.get(p, 0.0))
        finally:
            if timers is not None:
                timers.restore()
        entry = {"wall_ms": 1000 * statistics.median(walls), "walls_ms": [round(1000 * w, 3) for w in walls]}
        if phases:
            med = {p: statistics.median(v) for p, v in phases.items()}
            med["record"] = max(0.0, med["record"] - med["rows"])
            entry["phases_ms"] = {p: round(1000 * v, 3) for p, v in med.items()}
            entry["phases_ms"]["host_outside_forward"] = round(1000 * (statistics.median(walls) - med["forward"]), 3)
        try:
            with profile(activities=activities) as prof:
                for _ in range(calls):
                    fn()
                    _sync(device)
            entry.update(summarise(prof, calls, cuda))
        except Exception as err:  # noqa: BLE001 - keep the timings even if the profiler fails here
            entry["profiler_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        result[name] = entry
    base = result[base_name]
    for name, entry in result.items():
        if name != base_name and "ops" in entry and "ops" in base:
            entry["added_over_" + base_name] = _added(entry, base, top)
    for entry in result.values():  # the full per-op tables stay out of the JSON (small summary)
        entry.pop("ops", None)
        entry.pop("ops_self_ms", None)
    return result


def capture_cases(vlm, batch, which=("capture_last", "capture_question", "capture_last_vision")) -> dict:
    import vtrlab.probes as cap

    inputs = dict(batch.inputs)

    def sdpa():
        with torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    all_cases = {
        "capture_last": lambda: cap.capture(vlm, batch, queries="last", vision=False),
        "capture_question": lambda: cap.capture(vlm, batch, queries="question", vision=False),
        "capture_last_vision": lambda: cap.capture(vlm, batch, queries="last", vision=True),
    }
    return {"sdpa": sdpa, **{k: all_cases[k] for k in which}}


def profile_shape(vlm, name: str, image_size, batch_size: int, which, calls: int, warmup: int) -> dict:
    capture = _load("capture")
    batch = vlm.prepare([capture._image(image_size, seed=i) for i in range(batch_size)], [capture.PROMPT] * batch_size)
    t0 = time.perf_counter()
    cases = profile_cases(capture_cases(vlm, batch, which), vlm.device, calls=calls, warmup=warmup, vlm=vlm)
    return {
        "shape": name,
        "batch": batch_size,
        "n_tokens": int(batch.inputs["input_ids"].shape[1]),
        "n_lm_modules": sum(1 for _ in vlm.model.modules()),
        "calls": calls,
        "warmup": warmup,
        "seconds": round(time.perf_counter() - t0, 1),
        "host": capture.host_info(),
        "cases": cases,
    }


# what capture.py --profile runs per shape: (batch, cases, calls, warm-up); NeXT batch 8 checks the vision path
PLAN = {
    "llava-1.5-7b": (1, ("capture_last", "capture_question", "capture_last_vision"), 3, 2),
    "llava-next-7b": (1, ("capture_last", "capture_question", "capture_last_vision"), 3, 2),
    "llava-1.5-tiny": (1, ("capture_last", "capture_question", "capture_last_vision"), 1, 0),
    "llava-next-tiny": (2, ("capture_last", "capture_last_vision"), 1, 0),
}


def append(path: Path, entry: dict, meta: dict) -> None:
    """Add ``entry`` (one shape) to the summary JSON at ``path`` (atomic)."""
    from vtrlab.io import atomic_write_text

    report = json.loads(path.read_text()) if path.exists() else dict(meta, shapes=[])
    report["shapes"] = [s for s in report["shapes"] if (s["shape"], s["batch"]) != (entry["shape"], entry["batch"])]
    report["shapes"].append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2))


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report.get('device')}; torch {report.get('torch')}; per call (wall: median of "
        f"{', '.join(sorted({str(s['calls']) for s in report['shapes']}))} calls); GPU busy = union of kernel and copy "
        "intervals; host syncs exclude the harness's own; added host ops: calls and self host ms over sdpa.",
        "",
        "| shape | batch | case | wall ms | host outside forward ms | GPU busy ms | kernels | aten ops | host syncs "
        "| added: top host ops (calls, ms) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in report["shapes"]:
        for case, e in s["cases"].items():
            added = e.get("added_over_sdpa", {}).get("top_ops", [])[:4]
            top = "; ".join(
                f"{a['op'].removeprefix('aten::')} +{a['calls']:g} ({a['self_host_ms']:.2f})" for a in added
            )
            busy = f"{e['gpu_busy_ms']:.1f}" if "gpu_busy_ms" in e else "n/a"
            kern = f"{e['kernels']:.0f}" if "kernels" in e else "n/a"
            syncs = f"{e['host_syncs']:g}" if "host_syncs" in e else "n/a"
            outside = e.get("phases_ms", {}).get("host_outside_forward")
            lines.append(
                f"| {s['shape']} | {s['batch']} | {case} | {e['wall_ms']:.1f} | "
                f"{'' if outside is None else f'{outside:.1f}'} | {busy} | {kern} | {e.get('aten_ops', 0):.0f} | "
                f"{syncs} | {top} |"
            )
    return "\n".join(lines)


def meta(device) -> dict:
    import transformers

    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON summary to write")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny LLaVA-1.5")
    ap.add_argument("--shape", default=None, help=f"one of {list(PLAN)} (default llava-1.5-7b, or tiny)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    from vtrlab import testing

    capture = _load("capture")
    name = args.shape or ("llava-1.5-tiny" if args.tiny else "llava-1.5-7b")
    if name not in PLAN:
        ap.error(f"--shape {name!r}: choose from {list(PLAN)}")
    table = capture.TINY if name in capture.TINY else capture.SHAPES
    builder, size = table[name]
    if name in capture.TINY:
        vlm = testing.tiny(builder)
    else:
        if not torch.cuda.is_available():
            ap.error("full-size shapes need a CUDA GPU; use --tiny on CPU")
        vlm = testing.full_size(builder, dtype="bfloat16", device="cuda")
    bs, which, _, _ = PLAN[name]
    out = Path(args.out)
    append(out, profile_shape(vlm, name, size, bs, which, args.calls, args.warmup), meta(vlm.device))
    print(markdown(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
