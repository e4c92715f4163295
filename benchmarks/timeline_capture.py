"""Where a capture call's host time goes, as a timeline of its parts (GPU; no profiler).

    python benchmarks/timeline_capture.py --out $OUT/timeline.json                      # LLaVA-1.5-7B, batch 1
    python benchmarks/timeline_capture.py --tiny --out /tmp/timeline.json               # CPU smoke run

``ablate_capture.py`` measures the parts by subtraction, which on a noisy host needs many rounds per step. This
script times the parts of every call directly, with a clock read at the entry and exit of the functions that
bound them (a few wrappers per call, ~1 µs each), in interleaved rounds with the plain forward:

  setup        from the call to the model's forward (specs, sites, buffers, the attention switch, the session)
  forward      the model's forward as capture calls it (the held rows included), beside the plain forward's
  after        from the forward's return to the builder (the groups' last flushes, the vision gather, events)
  build        the builder up to its wait (labels, the Dataset)
  wait         ``Event.synchronize`` in the builder (the GPU finishing the forward and the copies)
  rest         the builder after its wait, and the return

Per case the JSON has each part's median and the median of the per-round differences of the forward to the
plain forward's (``forward_added_ms``); the table prints them.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_capture", _HERE / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)

PARTS = ("setup", "forward", "after", "build", "wait", "rest")
CASES = {"last": ("last", False), "question": ("question", False), "last_vision": ("last", True)}


class Stamps:
    """Entry / exit clock readings of the wrapped functions during one call (first entry, last exit)."""

    def __init__(self):
        self.t: dict[str, list[float]] = {}
        self._undo: list = []

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
        t = self.t

        def wrapped(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                end = time.perf_counter()
                if name in t:
                    t[name][1] = end
                else:
                    t[name] = [start, end]

        setattr(owner, attr, wrapped)
        self._undo.append((owner, attr, raw if raw is not None else fn))

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def _allocator_counts(device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}


def parts_of(t: dict, t0: float, t1: float) -> dict[str, float]:
    """A capture call's parts (seconds) from its stamps; a plain forward has only ``setup`` and ``forward``."""
    f0, f1 = t["forward"]
    if "build" not in t:
        return {"setup": f0 - t0, "forward": f1 - f0, "rest": t1 - f1}
    b0, b1 = t["build"]
    w0, w1 = t.get("wait", (b1, b1))
    return {
        "setup": f0 - t0,
        "forward": f1 - f0,
        "after": b0 - f1,
        "build": w0 - b0,
        "wait": w1 - w0,
        "rest": t1 - w1,
    }


def _pollute(n: int = 20) -> None:
    """About a millisecond of unrelated Python and numpy work (a Dataset built and dropped): what a capture call
    does around its forward, minus the capture (see ``--effects``)."""
    import xarray as xr

    data = {f"v{i}": (("a", "b"), np.full((4, 617), i, dtype=np.int64)) for i in range(n)}
    xr.Dataset(data, coords={"a": np.arange(4), "b": np.arange(617)})
    [{"k": i} for i in range(500)]


def effect_cases(vlm, batch) -> dict:
    """Cases that isolate what makes a capture's forward slower than a plain one (``--effects``):

    polluted     the plain forward right after ~1 ms of unrelated Python work (CPU caches no longer warm)
    switched     the forward on vtrlab's attention function, no site
    held         capture's set-up and forward, every layer holding its query and key, no flush (as
                 ``ablate_capture.py``'s ``held``)
    held_noop    the same, but ``LayerGroup.add`` returns at once (the sites' calls without holding anything)
    held_keep    the same, ``add`` only keeping the layer's query and key alive (no other work)
    held_drop    the same, ``add`` doing its work and then dropping what it held (nothing kept alive)
    held_q_only / held_k_only / held_copies   ``held`` with the key / the query / both replaced by a small
                 copy (one more operator each), so that the layer's own tensor is not kept alive
    capture_last_one_group   capture's last row with no cap on a group's memory (one flush)
    capture_*_flush_after    capture with the LM rows flushed after the forward, not at the last layer
    """
    from vtrlab.probes import engine, grouped
    from vtrlab.probes.attention import session
    from vtrlab.probes.switch import attention_switched

    _ablate = importlib.util.spec_from_file_location("_bench_ablate", _HERE / "ablate_capture.py")
    ablate = importlib.util.module_from_spec(_ablate)
    _ablate.loader.exec_module(ablate)
    inputs = dict(batch.inputs)
    lm = engine.attention_modules(vlm, vision=False)

    def polluted():
        _pollute()
        with torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    def switched():
        with attention_switched(vlm.model, lm), session({}), torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    def held():
        with ablate._flushes_dropped():
            return engine.launch(vlm, batch, queries="last", vision=False)

    def held_patched(add):
        """``held`` with ``LayerGroup.add`` replaced by ``add`` for the call."""

        def fn():
            saved = grouped.LayerGroup.add
            grouped.LayerGroup.add = add
            try:
                return held()
            finally:
                grouped.LayerGroup.add = saved

        return fn

    real_add = grouped.LayerGroup.add
    held_noop = held_patched(lambda self, *a, **k: None)

    def held_variant(keep_q: bool, keep_k: bool):
        """``held`` with the query and/or key replaced by a small copy before it is held (the layer's own tensor
        is then not kept alive past the layer; one more operator per replaced tensor)."""

        def small(self, site, query, key, *rest):
            q = query if keep_q else query[:, :, -1:].clone()
            k = key if keep_k else key[:, :, -1:].clone()
            return real_add(self, site, q, k, *rest)

        return held_patched(small)

    kept: list = []

    def keep(self, site, query, key, *rest):  # the layer's query and key kept alive, no other work
        kept.append((query, key))

    def add_then_drop(self, *a, **k):  # the hold's Python work, nothing kept alive past the layer
        real_add(self, *a, **k)
        self.pending.clear()

    def one_group():
        saved = grouped.GROUP_MAX_BYTES
        grouped.GROUP_MAX_BYTES = 2**40
        try:
            return engine.capture(vlm, batch, queries="last", vision=False)
        finally:
            grouped.GROUP_MAX_BYTES = saved

    def flushed_after(queries):  # the LM rows' flush after the forward instead of at the last layer
        def fn():
            saved = engine.FLUSH_AT_LAST_LAYER
            engine.FLUSH_AT_LAST_LAYER = False
            try:
                return engine.capture(vlm, batch, queries=queries, vision=False)
            finally:
                engine.FLUSH_AT_LAST_LAYER = saved

        return fn

    def held_keep():
        try:
            return held_patched(keep)()
        finally:
            kept.clear()

    return {
        "capture_last_flush_after": flushed_after("last"),
        "capture_question_flush_after": flushed_after("question"),
        "held_keep": held_keep,
        "held_drop": held_patched(add_then_drop),
        "capture_last_one_group": one_group,
        "polluted": polluted,
        "switched": switched,
        "held": held,
        "held_noop": held_noop,
        "held_q_only": held_variant(True, False),
        "held_k_only": held_variant(False, True),
        "held_copies": held_variant(False, False),
    }


def run(vlm, batch, rounds: int, warmup: int, seed: int = 0, effects: bool = False) -> dict:
    from vtrlab.probes import engine

    inputs = dict(batch.inputs)
    device = vlm.device

    def sdpa():
        with torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    cases = {"sdpa": sdpa}
    for name, (queries, vision) in CASES.items():
        cases[f"capture_{name}"] = lambda q=queries, v=vision: engine.capture(vlm, batch, queries=q, vision=v)
    if effects:
        cases.update(effect_cases(vlm, batch))
    stamps = Stamps()
    stamps.wrap(vlm.model, "forward", "forward")  # an instance attribute: the forward as capture calls it
    stamps.wrap(engine, "_build", "build")
    if device.type == "cuda":
        stamps.wrap(torch.cuda.Event, "synchronize", "wait")
    parts: dict[str, list[dict]] = {k: [] for k in cases}
    try:
        for fn in cases.values():
            for _ in range(warmup):
                fn()
        _capture._sync(device)
        gc.collect()
        gc.freeze()
        rng = np.random.default_rng(seed)
        names = list(cases)
        for _ in range(rounds):
            for i in rng.permutation(len(names)):
                gc.collect()
                _capture._sync(device)
                stamps.t.clear()
                m0 = _allocator_counts(device)
                t0 = time.perf_counter()
                out = cases[names[i]]()
                _capture._sync(device)
                t1 = time.perf_counter()
                m1 = _allocator_counts(device)
                del out
                p = parts_of(stamps.t, t0, t1)
                p["total"] = t1 - t0
                p.update({k: m1[k] - m0[k] for k in m0})
                parts[names[i]].append(p)
    finally:
        gc.unfreeze()
        stamps.restore()
        vlm.model.__dict__.pop("forward", None)
    base = parts["sdpa"]
    out = {}
    for name, calls in parts.items():
        keys = [k for k in calls[0] if k not in ALLOCATOR_COUNTS]
        for k in ALLOCATOR_COUNTS:  # device allocator events per call (cudaMalloc / cudaFree, retries)
            if k in calls[0]:
                out.setdefault(name, {})[f"{k}_per_call"] = statistics.mean(c[k] for c in calls)
        res = {f"{k}_ms": 1e3 * statistics.median(c[k] for c in calls) for k in keys}
        res["total_min_ms"] = 1e3 * min(c["total"] for c in calls)
        if name != "sdpa":
            res["forward_added_ms"] = 1e3 * statistics.median(c["forward"] - b["forward"] for c, b in zip(calls, base))
            res["total_added_ms"] = 1e3 * statistics.median(c["total"] - b["total"] for c, b in zip(calls, base))
        res["calls"] = calls
        out[name] = {**res, **out.get(name, {})}
    return out


def markdown(report: dict) -> str:
    r = report["results"]
    head = (
        f"Device: {report['device']}; torch {report['torch']}; {report['shape']} batch {report['batch']} "
        f"({report['n_tokens']} tokens); {report['rounds']} interleaved rounds after {report['warmup']} warm-up. "
        "Medians per call (ms); *added* = median of per-round differences to the plain forward."
    )
    lines = [
        head,
        "",
        "| case | total | added | setup | forward | forward added | after | build | wait | rest | cudaMalloc/Free |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in r.items():

        def f(key, res=res):
            v = res.get(key)
            return "—" if v is None else f"{v:.2f}"

        lines.append(
            f"| {name} | {f('total_ms')} | {f('total_added_ms')} | {f('setup_ms')} | {f('forward_ms')} | "
            f"{f('forward_added_ms')} | {f('after_ms')} | {f('build_ms')} | {f('wait_ms')} | {f('rest_ms')} | "
            f"{f('num_device_alloc_per_call')} / {f('num_device_free_per_call')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _capture.add_one_shape_args(ap)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--effects", action="store_true", help="also the cases that isolate the forward's added time")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.warmup < 1:
        ap.error(f"need --batch, --rounds, --warmup >= 1 (got {args.batch}, {args.rounds}, {args.warmup})")
    name, vlm, batch = _capture.one_shape(ap, args)
    report = {
        "device": torch.cuda.get_device_name() if vlm.device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "shape": name,
        "batch": args.batch,
        "n_tokens": int(batch.inputs["input_ids"].shape[1]),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "host": _capture.host_info(),
        "results": run(vlm, batch, args.rounds, args.warmup, effects=args.effects),
    }
    print(markdown(report), flush=True)
    _capture.write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
