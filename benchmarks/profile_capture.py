"""Where the host-side time of ``vtrlab.capture`` goes, phase by phase (CPU, no GPU needed).

    python benchmarks/profile_capture.py                          # organism + llava-1.5-mid, batch 1 and 8
    python benchmarks/profile_capture.py --shapes llava-1.5-tiny --batch 8 --calls 20
    python benchmarks/profile_capture.py --cprofile last_vision   # also a cProfile of one case
    python benchmarks/profile_capture.py --shapes llava-1.5-7b-narrow --host-only --calls 50   # host work only

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
  dataset      the Dataset's construction (``engine._dataset``; ``xarray.Dataset(...)`` before session 6)

With ``--host-only`` the model's forward runs once per case; every timed call after it *replays* the forward
(each probe site gets what the forward recorded: the LM rows' buffer slice, the vision layers' [CLS] rows), so
only the host work outside the forward is timed, many calls in seconds, at the 7B module tree and layout
(``llava-1.5-7b-narrow``: LLaVA-1.5-7B's 32 LM layers of 32 heads, 24 vision layers of 16 heads, 617 tokens,
at tiny width). Its phases add ``plan`` (``RowPlan.build``) and ``sites`` (``_lm_sites`` / ``_vision_sites``)
and split ``vision`` into ``gather`` (``_vision_gather``: the vision tables' pandas reads and the gather's torch
operators, kernels on a GPU) and ``vision`` (``_vision_labels``: NaN padding and the label arrays); ``rest`` is
the rest of launch + build (buffers, session, the Dataset's attrs, the replay itself, ...). The JSON holds each
phase's median and (``phases_min_s``) its fastest call, the steadier figure on a shared host.

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
HOST_PHASES = ("specs", "plan", "sites", "switch", "labels", "gather", "vision", "dataset", "rest")


class Timers:
    """Wrap module attributes with timers; ``phase -> list of seconds`` per call of capture."""

    def __init__(self):
        self.acc = defaultdict(float)
        self._undo = []

    def wrap(self, module, attr: str, phase: str, ctx: bool = False) -> None:
        raw = module.__dict__.get(attr) if isinstance(module, type) else None  # a class's own descriptor
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

        setattr(module, attr, staticmethod(wrapped) if isinstance(raw, (classmethod, staticmethod)) else wrapped)
        self._undo.append((module, attr, raw if raw is not None else fn))

    def wrap_forward(self, model) -> None:
        """Time ``model.forward`` (as the probes call it) as the phase ``forward``; undone by :meth:`restore`."""
        orig, acc = model.forward, self.acc

        def fwd(*a, **k):
            s = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc["forward"] += time.perf_counter() - s

        model.forward = fwd
        self._undo.append((model, "forward", orig))

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
    t.wrap(attention.RowPlan, "build", "plan")
    for name in ("_lm_sites", "_vision_sites"):
        t.wrap(engine, name, "sites")
    t.wrap(engine, "attention_switched", "switch", ctx=True)
    t.wrap(attention, "row_probabilities", "rows")
    t.wrap(attention, "_record", "record")
    t.wrap(engine, "key_coordinates", "labels")
    if hasattr(engine, "_vision_gather"):  # session 5: gathered at launch, labelled at build
        t.wrap(engine, "_vision_gather", "gather")  # the device gather (torch ops; the tables' reads before s6)
        t.wrap(engine, "_vision_labels", "vision")
    else:
        t.wrap(engine, "_vision_table", "vision")
    if hasattr(engine, "_vision_tables"):  # session 6: the tables read once at launch
        t.wrap(engine, "_vision_tables", "gather")
    if hasattr(engine, "_dataset"):  # session 6: built by engine._dataset (xarray's direct constructor)
        t.wrap(engine, "_dataset", "dataset")
    else:
        t.wrap(engine.xr, "Dataset", "dataset")
    del xr
    t.wrap_forward(vlm.model)  # the model's forward as called from capture
    return t


def narrow_7b(seed: int = 0, lm_heads: int = 32, vision_heads: int = 16, name: str = "llava-1.5-7b-narrow"):
    """LLaVA-1.5-7B's module tree and token layout at tiny width: 32 Llama layers of 32 heads, 24 CLIP layers of
    16 heads, 336 px / 14 px patches (576 image tokens in a 24x24 grid, 617 tokens with the prompt), head
    dimension 4: capture's fixed per-call Python work (sites, config walk, labels, Dataset) as at 7B.
    ``lm_heads`` / ``vision_heads``: fewer heads for a cheaper CPU forward (profile_flow.py's shape)."""
    return _capture.random_llava(
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=24,
            num_attention_heads=vision_heads,
            projection_dim=64,
        ),
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=32,
            num_attention_heads=lm_heads,
            num_key_value_heads=lm_heads,
        ),
        name=name,
        seed=seed,
    )


# shapes of this script beside capture.py's CPU and TINY ones: name -> (builder, image size). Its forward is not
# cheap on CPU (PyTorch's CPU flash kernel takes ~23 ms a call at 617 tokens, 32 heads of dimension 4: ~1.6 s a
# forward at batch 1, ~13 s at batch 8; the math kernel is 4x slower): use few --calls; the phases are per call.
NARROW = {"llava-1.5-7b-narrow": (narrow_7b, (336, 336))}


def _model(name: str):
    if name in NARROW:
        return NARROW[name][0]()
    if name in _capture.CPU:
        return _capture.cpu_model(name)
    from vtrlab import testing

    return testing.tiny(_capture.TINY[name][0])


def profile_shape(name: str, batch_size: int, calls: int, threads: int, cprofile: str | None) -> dict:
    import vtrlab.probes as cap

    torch.set_num_threads(threads)
    vlm = _model(name)
    size = (_capture.CPU | _capture.TINY | NARROW)[name][1]
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
                timers.acc["vision"] = timers.acc.get("vision", 0.0) + timers.acc.pop("gather", 0.0)
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


def host_only(name: str, batch_size: int, calls: int, threads: int, cprofile: str | None) -> dict:
    """Per-call host work outside the forward (the forward replayed, see the module docstring)."""
    import vtrlab.probes as cap
    from vtrlab.probes import attention

    torch.set_num_threads(threads)
    vlm = _model(name)
    size = (_capture.CPU | _capture.TINY | NARROW)[name][1]
    batch = vlm.prepare([_capture._image(size, seed=i) for i in range(batch_size)], [_capture.PROMPT] * batch_size)
    cases = {
        "capture_last": dict(queries="last", vision=False),
        "capture_question": dict(queries="question", vision=False),
        "capture_last_vision": dict(queries="last", vision=True),
    }
    model, orig = vlm.model, vlm.model.forward
    phases, phases_min = {}, {}
    recorded = {}  # (stream, layer) -> what the case's forward left on its site
    for case, kw in cases.items():
        recorded.clear()

        def record_forward(*a, **k):
            out = orig(*a, **k)
            for sites in attention.current_session().sites.values():
                for site in sites:
                    if site.group is not None:  # grouped layers deliver their rows at the flush
                        site.group.flush()
                    recorded[(site.stream, site.layer)] = (list(site.probs), list(site.segments))
                    sink = getattr(site.group, "sink", None)
                    if getattr(sink, "host", None) is not None:  # [CLS] rows sent whole to the host (_ClsSink)
                        recorded["cls_block"] = sink.blocks[0]
            return out

        def replay(*a, **k):
            for sites in attention.current_session().sites.values():
                for site in sites:
                    probs, segments = recorded[(site.stream, site.layer)]
                    site.probs[:] = probs
                    site.segments = list(segments)
            if "cls_block" in recorded:  # the flush's delivery to the [CLS] sink, as the forward would make it
                layers = [s.layer for s in recorded["cls_block"][0]]
                by_layer = {
                    s.layer: s
                    for sites in attention.current_session().sites.values()
                    for s in sites
                    if s.stream == "vision"
                }
                group_sites = [by_layer[layer] for layer in layers]
                group_sites[0].group.sink.put(group_sites, recorded["cls_block"][1][:, :, :, None], False)

        model.forward = record_forward
        try:
            reference = cap.capture(vlm, batch, **kw)
            model.forward = replay
            replayed = cap.capture(vlm, batch, **kw)  # warm-up; same Dataset but for the LM rows' values
            assert set(replayed.variables) == set(reference.variables), "the replay builds another Dataset"
            timers = instrument(vlm)
            model.forward = replay  # instrument wrapped the real forward; time the replay outside it
            try:
                per_call = defaultdict(list)
                for _ in range(calls):
                    timers.acc.clear()
                    s = time.perf_counter()
                    cap.capture(vlm, batch, **kw)
                    total = time.perf_counter() - s
                    for p in HOST_PHASES[:-1]:
                        per_call[p].append(timers.acc.get(p, 0.0))
                    per_call["rest"].append(total - sum(timers.acc.get(p, 0.0) for p in HOST_PHASES[:-1]))
                    per_call["total"].append(total)
            finally:
                timers.restore()
            if cprofile == case:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(calls):
                    cap.capture(vlm, batch, **kw)
                prof.disable()
                pstats.Stats(prof).sort_stats("cumulative").print_stats(r"vtrlab|xarray|pandas", 40)
        finally:
            model.forward = orig
            model.__dict__.pop("forward", None)
        phases[case] = {p: statistics.median(v) for p, v in per_call.items()}
        phases[case]["min_total"] = min(per_call["total"])
        # each phase's fastest call: on a shared host the least disturbed measure of deterministic work
        phases_min[case] = {p: min(v) for p, v in per_call.items()}
    return {
        "shape": name,
        "batch": batch_size,
        "n_tokens": int(batch.inputs["input_ids"].shape[1]),
        "threads": threads,
        "calls": calls,
        "host_only": True,
        "phases_s": phases,
        "phases_min_s": phases_min,
    }


def host_table(rows: list[dict]) -> str:
    lines = [
        "| shape | batch | case | " + " | ".join(HOST_PHASES) + " | total ms (median) | total ms (min) |",
        "|---|---:|---|" + "---:|" * (len(HOST_PHASES) + 2),
    ]
    for r in rows:
        for k, ph in r["phases_s"].items():
            cells = [f"{1000 * ph[p]:.2f}" for p in HOST_PHASES] + [f"{1000 * ph['total']:.2f}"]
            lines.append(
                f"| {r['shape']} | {r['batch']} | {k} | " + " | ".join(cells) + f" | {1000 * ph['min_total']:.2f} |"
            )
    return "\n".join(lines)


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
    ap.add_argument("--host-only", action="store_true", help="time only the host work outside the (replayed) forward")
    ap.add_argument("--out", default=None, help="JSON file to write")
    a = ap.parse_args(argv)
    run, render = (host_only, host_table) if a.host_only else (profile_shape, table)
    rows = []
    for name in a.shapes.split(","):
        for bs in (int(b) for b in a.batch.split(",")):
            rows.append(run(name, bs, a.calls, a.threads, a.cprofile))
            print(render(rows[-1:]), flush=True)
    print()
    print(render(rows))
    if a.out:
        from vtrlab.io import atomic_write_text

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.out), json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
