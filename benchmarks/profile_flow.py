"""Where the host-side cost of a knocked-out forward and of saliency goes, at a host-bound shape (CPU, no GPU).

    python benchmarks/profile_flow.py                         # llava-1.5-host: ops, syncs, phases, times
    python benchmarks/profile_flow.py --shape llava-1.5-mid   # capture.py's mid_llava (8 LM layers, width 1024)
    python benchmarks/profile_flow.py --cprofile saliency_last

At LLaVA-1.5-7B on an H200 (617 tokens, batch 1) a plain forward is host-bound: every torch operator, Python
call, host sync and pageable host->device copy that a probe adds costs its full host time. So the host work
is counted here on the CPU, where it does not depend on a GPU:

* ``llava-1.5-host`` (default): LLaVA-1.5's layout (336 px, 14 px patches: 576 image tokens, 617 tokens with
  :data:`capture.PROMPT`) with the 7B's depth (24 CLIP layers, 32 LM layers) at tiny width (CLIP 64, LM 128,
  4 heads), float32: a forward of the 7B's operator count whose arithmetic is small, so Python costs show.
* ``llava-1.5-mid``: ``benchmarks/capture.py: mid_llava`` (8 LM layers of width 1024).

Cases (as in ``benchmarks/flow.py``): ``sdpa`` (plain forward), ``knocked_forward`` /
``knocked_forward_question`` (one forward inside ``vtrlab.knocked_out(keys="image", queries="last" /
"question", layers=first quarter)``, the context entered on every call), ``saliency_last``
(``vtrlab.saliency(queries="last", layers="all")``).

Reported per case:

* ``ops``: torch operators dispatched per call, counted with a ``TorchDispatchMode`` (views included; exact
  and independent of the host's load), and ``+ops`` over the plain forward;
* ``syncs``: operators that wait for the device on CUDA (``aten._local_scalar_dense`` = ``.item()`` /
  ``bool()`` / ``int()``, ``aten.is_nonzero``, ``aten.equal``, ``aten.nonzero``);
* ``h2d``: host->device tensor creations from host data (``torch.as_tensor`` / ``torch.tensor`` with a
  ``device=``, ``Tensor.to(device)`` of a CPU tensor): counted on the CPU by the device-agnostic
  :func:`_CountH2D` wrapper of ``vtrlab.probes.attention.to_device`` and of ``Tensor.to`` calls whose
  destination is ``vlm.device`` (on CPU they are no-ops; on CUDA a pageable copy is a sync);
* phases (ms per call, median; nested phases counted in their own row and in the enclosing one):

  ko_sites      ``knockout_sites`` (positions, masks, the binding)
  switch        entering/leaving ``attention_switched`` (the config walk)
  check         the batch check (``Binding.check_ids``) in the forward pre-hook
  forward       the model's forward
  splice_build  ``RowSplice.build`` (once per forward)
  splice_apply  ``RowSplice.apply`` (per cut layer)
  ko_mask       ``knockout_mask`` (the full cut mask: recorders / many rows)
  sal_setup     saliency's specs and ``RowPlan.build``
  graph         entering/leaving ``_graph_from`` (the parameters' requires_grad toggling)
  rows          ``row_probabilities`` (saliency's rows, per layer)
  grad          ``torch.autograd.grad`` (the backward)
  a_times_g     ``attention_times_grad``
  dataset       ``key_coordinates`` + ``xarray.Dataset``

Prints one table and writes JSON with ``--out``. The development host is shared: milliseconds are indicative
(min and median of ``--calls`` interleaved rounds), the counts exact.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import pstats
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_HERE = Path(__file__).resolve().parent


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, _HERE / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_capture = _load("_bench_capture", "capture.py")
_profile_capture = _load("_bench_profile_capture", "profile_capture.py")
Timers = _profile_capture.Timers

PHASES = (
    "ko_sites",
    "switch",
    "check",
    "forward",
    "splice_build",
    "splice_apply",
    "ko_mask",
    "sal_setup",
    "graph",
    "rows",
    "grad",
    "a_times_g",
    "dataset",
)
SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero")


def host_llava(seed: int = 0):
    """LLaVA-1.5's layout (576 image tokens) at the 7B's depth (24 CLIP + 32 LM layers), tiny width, 4 heads."""
    return _profile_capture.narrow_7b(seed, lm_heads=4, vision_heads=4, name="llava-1.5-host")


SHAPES = {"llava-1.5-host": host_llava, "llava-1.5-mid": _capture.mid_llava}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.c = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.c[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class _CountH2D:
    """Count host->device tensor creations (no-ops on a CPU model, copies on CUDA): ``to_device`` calls (pinned,
    no sync) and ``torch.as_tensor``/``torch.tensor``/``Tensor.to`` calls that name the model's device
    (pageable: a sync on CUDA). The probe code names ``vlm.device`` explicitly, so this sees its copies."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.c = Counter()
        self._undo = []

    def _is_dev(self, d) -> bool:
        try:
            return d is not None and torch.device(d) == self.device
        except (TypeError, RuntimeError):
            return False

    def __enter__(self):
        import vtrlab.flow  # noqa: F401
        from vtrlab.probes import attention

        knockout = sys.modules["vtrlab.flow.knockout"]
        c, is_dev = self.c, self._is_dev
        as_tensor, tensor, to, to_device = torch.as_tensor, torch.tensor, torch.Tensor.to, attention.to_device
        inside = [0]  # Tensor.to calls inside to_device are its own copy, counted once as to_device

        def as_tensor_(*a, **k):
            if is_dev(k.get("device")):
                c["pageable as_tensor(device=)"] += 1
            return as_tensor(*a, **k)

        def tensor_(*a, **k):
            if is_dev(k.get("device")):
                c["pageable tensor(device=)"] += 1
            return tensor(*a, **k)

        def to_(self_, *a, **k):
            dst = k.get("device", a[0] if a and not isinstance(a[0], torch.dtype | torch.Tensor) else None)
            if self_.device.type == "cpu" and is_dev(dst) and not inside[0]:
                c["Tensor.to(device)"] += 1
            return to(self_, *a, **k)

        def to_device_(array, device):
            c["to_device (pinned)"] += 1
            inside[0] += 1
            try:
                return to_device(array, device)
            finally:
                inside[0] -= 1

        torch.as_tensor, torch.tensor, torch.Tensor.to, attention.to_device = as_tensor_, tensor_, to_, to_device_
        self._undo = [(torch, "as_tensor", as_tensor), (torch, "tensor", tensor), (torch.Tensor, "to", to)]
        self._undo.append((attention, "to_device", to_device))
        if hasattr(knockout, "to_device"):
            knockout.to_device = to_device_
            self._undo.append((knockout, "to_device", to_device))
        return self

    def __exit__(self, *exc):
        for mod, attr, fn in reversed(self._undo):
            setattr(mod, attr, fn)


def instrument(vlm) -> Timers:
    """Timers around the functions the cases call (see the module docstring for the phases)."""
    import vtrlab.flow  # noqa: F401  (the package's ``knockout`` / ``saliency`` names are functions)
    from vtrlab.probes import attention

    ko_mod, sal_mod = sys.modules["vtrlab.flow.knockout"], sys.modules["vtrlab.flow.saliency"]

    t = Timers()
    t.wrap(ko_mod, "knockout_sites", "ko_sites")
    t.wrap(ko_mod, "attention_switched", "switch", ctx=True)
    t.wrap(sal_mod, "attention_switched", "switch", ctx=True)
    t.wrap(attention.Binding, "check_ids", "check")
    t.wrap(attention.RowSplice, "apply", "splice_apply")
    t.wrap(attention, "knockout_mask", "ko_mask")
    t.wrap(attention, "row_probabilities", "rows")
    for name in ("queries_per_sample", "padded_rows", "layer_indices"):
        t.wrap(sal_mod, name, "sal_setup")
    t.wrap(sal_mod, "_graph_from", "graph", ctx=True)
    t.wrap(sal_mod, "attention_times_grad", "a_times_g")
    for name in ("key_coordinates",):
        t.wrap(sal_mod, name, "dataset")
    t.wrap(sal_mod.xr, "Dataset", "dataset")
    t.wrap(torch.autograd, "grad", "grad")
    # RowSplice.build / RowPlan.build are classmethods: wrap the bound method on the class
    acc = t.acc
    for cls, phase in ((attention.RowSplice, "splice_build"), (attention.RowPlan, "sal_setup")):
        fn = cls.__dict__["build"]

        def build(klass, *a, _fn=fn, _phase=phase, **k):
            s = time.perf_counter()
            try:
                return _fn.__func__(klass, *a, **k)
            finally:
                acc[_phase] += time.perf_counter() - s

        cls.build = classmethod(build)
        t._undo.append((cls, "build", fn))
    t.wrap_forward(vlm.model)
    return t


def cases(vlm, batch) -> dict:
    import vtrlab as vl

    inputs = dict(batch.inputs)
    window = list(range(max(1, len(vlm.lm_layers) // 4)))

    def sdpa():
        with torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    def knocked(queries):
        with vl.knocked_out(vlm, batch, keys="image", queries=queries, layers=window), torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    return {
        "sdpa": sdpa,
        "knocked_forward": lambda: knocked("last"),
        "knocked_forward_question": lambda: knocked("question"),
        "saliency_last": lambda: vl.saliency(vlm, batch, queries="last"),
    }


def profile(shape: str, calls: int, threads: int, cprofile: str | None) -> dict:
    torch.set_num_threads(threads)
    vlm = SHAPES[shape]()
    vlm.model.requires_grad_(True)  # as benchmarks/flow.py (a loaded model's parameters require grad)
    batch = vlm.prepare([_capture._image((336, 336))], [_capture.PROMPT])
    fns = cases(vlm, batch)
    for fn in fns.values():
        fn()  # warm-up
    counts, syncs, h2d = {}, {}, {}
    for k, fn in fns.items():
        with _CountOps() as m, _CountH2D(vlm.device) as c:
            fn()
        counts[k], syncs[k] = sum(m.c.values()), {op: m.c[op] for op in SYNC_OPS if m.c[op]}
        h2d[k] = dict(c.c)
    times = {k: [] for k in fns}
    for _ in range(calls):  # interleaved: load on the shared host hits every case alike
        for k, fn in fns.items():
            s = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - s)
    phases = {}
    timers = instrument(vlm)
    try:
        for k, fn in fns.items():
            per_call = defaultdict(list)
            for _ in range(calls):
                timers.acc.clear()
                fn()
                for p in PHASES:
                    per_call[p].append(timers.acc.get(p, 0.0))
            phases[k] = {p: statistics.median(v) for p, v in per_call.items()}
    finally:
        timers.restore()
    if cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fns[cprofile]()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(r"vtrlab|torch/autograd|xarray/core/dataset\.py", 30)
    return {
        "shape": shape,
        "n_tokens": int(dict(batch.inputs)["input_ids"].shape[1]),
        "n_lm_layers": len(vlm.lm_layers),
        "threads": threads,
        "calls": calls,
        "ops": counts,
        "syncs": syncs,
        "h2d": h2d,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "min_s": {k: min(v) for k, v in times.items()},
        "phases_s": phases,
    }


def table(r: dict) -> str:
    used = [p for p in PHASES if any(ph.get(p, 0.0) > 0 for ph in r["phases_s"].values())]
    lines = [
        f"{r['shape']}: {r['n_tokens']} tokens, {r['n_lm_layers']} LM layers, {r['threads']} thread(s), "
        f"{r['calls']} interleaved rounds",
        "",
        "| case | ops | +ops | syncs | h2d | median ms | min ms | + min ms | " + " | ".join(used) + " |",
        "|---|---:|---:|---|---|---:|---:|---:|" + "---:|" * len(used),
    ]
    o0, m0 = r["ops"]["sdpa"], r["min_s"]["sdpa"]
    for k in r["ops"]:
        sy = ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in r["syncs"][k].items()) or "0"
        h2 = ", ".join(f"{op} {n}" for op, n in r["h2d"][k].items()) or "0"
        ph = r["phases_s"][k]
        lines.append(
            f"| {k} | {r['ops'][k]:,} | {r['ops'][k] - o0:+,} | {sy} | {h2} | {1000 * r['median_s'][k]:.1f} | "
            f"{1000 * r['min_s'][k]:.1f} | {1000 * (r['min_s'][k] - m0):+.1f} | "
            + " | ".join(f"{1000 * ph.get(p, 0.0):.2f}" for p in used)
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llava-1.5-host", choices=list(SHAPES))
    ap.add_argument("--calls", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cprofile", default=None, help="also cProfile this case (e.g. saliency_last)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    a = ap.parse_args(argv)
    r = profile(a.shape, a.calls, a.threads, a.cprofile)
    print(table(r))
    if a.out:
        from vtrlab.io import atomic_write_text

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.out), json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
