"""Where the host-side time of ``vtrlab.capture`` goes, phase by phase (CPU, no GPU needed).

    python benchmarks/profile_capture.py                          # organism + llava-1.5-mid, batch 1 and 8
    python benchmarks/profile_capture.py --shapes llava-1.5-tiny --batch 8 --calls 20
    python benchmarks/profile_capture.py --cprofile last_vision   # also a cProfile of one case

Every case runs interleaved with a plain sdpa forward of the same batch (``--calls`` rounds; the
minimum is reported as well as the median, since the development host is shared). The phases are
timed by wrapping the functions ``capture`` calls (``time.perf_counter`` around each; nested phases
are counted in their own row and in the enclosing one):

  specs        query/key/layer selection (``probes.spec``)
  switch       entering/leaving ``attention_switched`` (the config walk)
  forward      the model's forward inside capture (includes the probe work below)
  rows         ``row_probabilities`` for LM rows and vision [CLS] (compute of the probe itself)
  record       ``_record`` minus ``rows``: copies into the buffer, vision probs kept per call
  labels       ``key_coordinates`` (labels of every position)
  vision       ``_vision_gather`` + ``_vision_labels`` (the vision tokens of every vision layer, their labels)
  dataset      ``xarray.Dataset(...)`` construction

Prints one table per shape (ms per call) and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import json
import pstats
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_capture", _HERE / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)

PHASES = ("specs", "switch", "forward", "rows", "record", "labels", "vision", "dataset")


class Timers:
    """Wrap module attributes with timers; ``phase -> list of seconds`` per call of capture."""

    def __init__(self):
        self.acc = defaultdict(float)
        self._undo = []

    def wrap(self, module, attr: str, phase: str, ctx: bool = False) -> None:
        fn = getattr(module, attr)
        acc = self.acc

        if ctx:

            @contextlib.contextmanager
            def wrapped(*a, **k):
                t = time.perf_counter()
                cm = fn(*a, **k)
                value = cm.__enter__()
                acc[phase] += time.perf_counter() - t
                try:
                    yield value
                finally:
                    t = time.perf_counter()
                    cm.__exit__(None, None, None)
                    acc[phase] += time.perf_counter() - t
        else:

            def wrapped(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    acc[phase] += time.perf_counter() - t

        setattr(module, attr, wrapped)
        self._undo.append((module, attr, fn))

    def restore(self):
        for module, attr, fn in reversed(self._undo):
            setattr(module, attr, fn)
        self._undo.clear()


def instrument(vlm) -> Timers:
    import xarray as xr

    from vtrlab.probes import attention, engine

    t = Timers()
    for name in ("queries_per_sample", "layer_indices", "head_indices", "padded_rows"):
        if hasattr(engine, name):
            t.wrap(engine, name, "specs")
    t.wrap(engine, "attention_switched", "switch", ctx=True)
    t.wrap(attention, "row_probabilities", "rows")
    t.wrap(attention, "_record", "record")
    t.wrap(engine, "key_coordinates", "labels")
    for name in ("_vision_gather", "_vision_labels") if hasattr(engine, "_vision_gather") else ("_vision_table",):
        t.wrap(engine, name, "vision")  # session 5: gathered at launch, labelled at build
    t.wrap(engine.xr, "Dataset", "dataset")
    del xr
    # the model's forward as called from capture
    model = vlm.model
    orig = model.forward
    acc = t.acc

    def fwd(*a, **k):
        s = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            acc["forward"] += time.perf_counter() - s

    model.forward = fwd
    t._undo.append((model, "forward", orig))
    return t


def profile_shape(name: str, batch_size: int, calls: int, threads: int, cprofile: str | None) -> dict:
    import vtrlab.probes as cap

    torch.set_num_threads(threads)
    vlm = _capture.cpu_model(name) if name in _capture.CPU else None
    if vlm is None:
        from vtrlab import testing

        vlm = testing.tiny(_capture.TINY[name][0])
    size = (_capture.CPU | _capture.TINY)[name][1]
    batch = vlm.prepare([_capture._image(size, seed=i) for i in range(batch_size)], [_capture.PROMPT] * batch_size)
    inputs = dict(batch.inputs)

    def sdpa():
        with torch.no_grad():
            vlm.model(**inputs, use_cache=False)

    cases = {
        "sdpa": sdpa,
        "capture_last": lambda: cap.capture(vlm, batch, queries="last", vision=False),
        "capture_question": lambda: cap.capture(vlm, batch, queries="question", vision=False),
        "capture_last_vision": lambda: cap.capture(vlm, batch, queries="last", vision=True),
    }
    for fn in cases.values():
        fn()  # warm-up
    times = {k: [] for k in cases}
    for _ in range(calls):  # interleaved: load on the shared host hits every case alike
        for k, fn in cases.items():
            s = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - s)
    phases = {}
    for k in list(cases)[1:]:
        timers = instrument(vlm)
        try:
            per_call = defaultdict(list)
            for _ in range(calls):
                timers.acc.clear()
                s = time.perf_counter()
                cases[k]()
                total = time.perf_counter() - s
                for p in PHASES:
                    per_call[p].append(timers.acc.get(p, 0.0))
                per_call["total"].append(total)
        finally:
            timers.restore()
        med = {p: statistics.median(v) for p, v in per_call.items()}
        med["record"] = max(0.0, med["record"] - med["rows"])
        med["host_outside_forward"] = med["total"] - med["forward"]
        phases[k] = med
    base_med, base_min = statistics.median(times["sdpa"]), min(times["sdpa"])
    out = {
        "shape": name,
        "batch": batch_size,
        "n_tokens": int(inputs["input_ids"].shape[1]),
        "threads": threads,
        "calls": calls,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "min_s": {k: min(v) for k, v in times.items()},
        "ratio_median": {k: statistics.median(v) / base_med for k, v in times.items()},
        "ratio_min": {k: min(v) / base_min for k, v in times.items()},
        "phases_s": phases,
    }
    if cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            cases[cprofile]()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(r"vtrlab|xarray/core/dataset\.py", 30)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | batch | tokens | case | median ms | × sdpa (median) | × sdpa (min) | "
        + " | ".join(PHASES)
        + " | host outside forward |",
        "|---|---:|---:|---|---:|---:|---:|" + "---:|" * (len(PHASES) + 1),
    ]
    for r in rows:
        for k, med in r["median_s"].items():
            ph = r["phases_s"].get(k)
            cells = (
                [f"{1000 * ph[p]:.1f}" for p in PHASES] + [f"{1000 * ph['host_outside_forward']:.1f}"]
                if ph
                else [""] * (len(PHASES) + 1)
            )
            lines.append(
                f"| {r['shape']} | {r['batch']} | {r['n_tokens']} | {k} | {1000 * med:.1f} | "
                f"{r['ratio_median'][k]:.3f} | {r['ratio_min'][k]:.3f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="organism,llava-1.5-mid")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cprofile", default=None, help="also cProfile this case (e.g. capture_last_vision)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    a = ap.parse_args(argv)
    rows = []
    for name in a.shapes.split(","):
        for bs in (int(b) for b in a.batch.split(",")):
            rows.append(profile_shape(name, bs, a.calls, a.threads, a.cprofile))
            print(table(rows[-1:]), flush=True)
    print()
    print(table(rows))
    if a.out:
        from vtrlab.io import atomic_write_text

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.out), json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
