"""Where a capture call's host time goes, as a timeline of its parts (GPU; no profiler).

    python benchmarks/timeline_capture.py --out $OUT/timeline.json                      # LLaVA-1.5-7B, batch 1
    python benchmarks/timeline_capture.py --tiny --out /tmp/timeline.json               # CPU smoke run
    python benchmarks/timeline_capture.py --floor --phases --out $OUT/t.json            # beside the floor, by phase
    PYTHONPATH=old python benchmarks/timeline_capture.py --compare vtrlab_old ...       # A/B of two versions

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
plain forward's (``forward_added_ms``); the table prints them, with the garbage collector's time and collections
inside the timed calls (``gc``: a gen-0 collection there cost ~0.12-0.15 ms on the H200's host, session 10).

Options beside the three captures (session 10):

  --floor        the least any capture that intercepts each layer's attention in Python can cost
                 (:func:`floor_cases`: an attention function that only keeps each layer's query and key, then one
                 batched computation; its rows are checked against capture's before timing)
  --phases       the forward split at the vision tower's entry and exit and the LM's first / last layer
                 (pre_tower, tower, bridge, lm, tail), each beside the plain forward's
  --flush-after  every capture also with its groups flushed after the forward (the tower and LM phases then
                 hold the per-layer holds alone)
  --compare PKG  the same captures through another copy of vtrlab importable as PKG (e.g. ``git archive`` of the
                 previous commit with its imports renamed to ``vtrlab_old``), interleaved in the same rounds: an
                 A/B of two versions whose per-round differences are paired (separate processes differ by more
                 than most changes do: session 10, call 3)
"""

from __future__ import annotations

import argparse
import gc
import importlib
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


def _flushed_after(engine, vlm, batch, queries, vision):
    """Capture with every group (LM rows, vision [CLS]) flushed after the forward, not at its last layer."""
    saved = engine.FLUSH_AT_LAST_LAYER
    engine.FLUSH_AT_LAST_LAYER = False
    try:
        return engine.capture(vlm, batch, queries=queries, vision=vision)
    finally:
        engine.FLUSH_AT_LAST_LAYER = saved


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

    def held_keep():
        try:
            return held_patched(keep)()
        finally:
            kept.clear()

    return {
        "capture_last_flush_after": lambda: _flushed_after(engine, vlm, batch, "last", False),
        "capture_question_flush_after": lambda: _flushed_after(engine, vlm, batch, "question", False),
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


class _FloorState:
    """What the floor's attention function does on the current call: nothing (``held`` None) or append the
    (query, key) of each call of a module in ``modules`` (their ids) to ``held``."""

    held: list | None = None
    modules: frozenset = frozenset()


def _floor_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    held = _FloorState.held
    if held is not None and id(module) in _FloorState.modules:
        held.append((query, key))
    return out


FLOOR_ATTN = "vtrlab_floor_sdpa"


def floor_cases(vlm, batch) -> dict:
    """The least any capture that intercepts each layer's attention in Python can cost (``--floor``): the model's
    LM (and vision) configs point at a registered attention function that calls transformers' sdpa and appends
    the layer's query and key to a list (no site, no check, no signature, no memory cap); after the forward one
    stack of each tower's queries and keys, one ``bmm``, one softmax and one asynchronous copy to pinned memory of
    the last row's (and [CLS]'s) probabilities. No labels, no Dataset, no padding or mask handling (batch 1,
    unpadded: the last row sees every key). A floor for measurement, not a capture: what it computes is checked once
    against capture's rows before any timing (so it does capture's device work), then not again.

    floor_passthrough       the configs switched to that function, nothing appended (the indirection alone)
    floor_last              last row of every LM layer
    floor_last_vision       last row of every LM layer + [CLS] row of every vision layer
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(FLOOR_ATTN, _floor_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLOOR_ATTN, sdpa_mask)
    from vtrlab.probes import engine
    from vtrlab.probes.switch import _configs, configs_set

    inputs = dict(batch.inputs)
    lm = engine.attention_modules(vlm, vision=False)
    vis = engine.attention_modules(vlm, vision=True)
    lm_configs = _configs(vlm.model, lm)  # (the model's config with its sub-configs: the tower's too)
    all_configs = _configs(vlm.model, lm + vis)
    lm_ids, all_ids = frozenset(map(id, lm)), frozenset(map(id, lm + vis))

    def rows(held: list, row: int) -> torch.Tensor:
        q = torch.stack([q for q, _ in held]).narrow(-2, row if row >= 0 else held[0][0].shape[-2] + row, 1)
        k = torch.stack([k for _, k in held])
        G, B, H, _, D = q.shape
        Hkv, N = k.shape[2], k.shape[3]
        scores = torch.bmm(q.reshape(G * B * Hkv, H // Hkv, D), k.reshape(G * B * Hkv, N, D).transpose(1, 2))
        probs = torch.softmax(scores.float().mul_(D**-0.5), dim=-1)
        host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=probs.is_cuda)
        host.copy_(probs, non_blocking=True)
        return host

    def floor(configs, record: bool, vision: bool):
        modules = all_ids if vision else lm_ids

        def fn():
            held = [] if record else None
            _FloorState.held, _FloorState.modules = held, modules
            try:
                with configs_set(configs, FLOOR_ATTN), torch.no_grad():
                    vlm.model(**inputs, use_cache=False)
                    if not record:
                        return None
                    n_vis = len(vis) if vision else 0
                    if len(held) != n_vis + len(lm):
                        raise RuntimeError(f"the floor held {len(held)} attention calls, not {n_vis + len(lm)}")
                    out = [rows(held[n_vis:], -1)]  # the tower runs first
                    if vision:
                        out.append(rows(held[:n_vis], 0))
                    return out
            finally:
                _FloorState.held = None

        return fn

    # the floor does capture's device work: its rows are capture's (checked once, before any timing)
    got = floor(all_configs, True, True)()
    ref = engine.capture(vlm, batch, queries="last", vision=True)
    _capture._sync(vlm.device)  # (the floor's copies are asynchronous)
    lm_rows = got[0].view(len(lm), -1, ref.sizes["key"]).numpy()  # (layers, heads, keys) at batch 1
    vis_rows = got[1].view(len(vis), -1, ref.sizes["vision_key"]).numpy()
    for name, mine, theirs in (
        ("LM last row", lm_rows, ref["lm_attn"].values[0, :, :, 0]),
        ("vision [CLS]", vis_rows, ref["vision_attn"].values[0]),
    ):
        if mine.shape != theirs.shape or not np.allclose(mine, theirs, atol=1e-3):
            raise RuntimeError(f"the floor's {name} rows differ from capture's: the floor would not measure its work")
    return {
        "floor_passthrough": floor(all_configs, False, False),
        "floor_last": floor(lm_configs, True, False),
        "floor_last_vision": floor(all_configs, True, True),
    }


PHASES = ("pre_tower", "tower", "bridge", "lm", "tail")


def _phase_hooks(vlm, t: dict) -> list:
    """Clock readings at the vision tower's entry and exit and the first LM layer's entry / last LM layer's exit
    (``--phases``), written into the stamps ``t``; returns the hook handles. Every case runs with them."""
    from time import perf_counter

    def at(name):
        def hook(*_):
            t[name] = perf_counter()

        return hook

    tower = vlm.adapter.vision_tower(vlm.model)
    layers = vlm.lm_layers
    return [
        tower.register_forward_pre_hook(at("tower0")),
        tower.register_forward_hook(at("tower1")),
        layers[0].register_forward_pre_hook(at("lm0")),
        layers[-1].register_forward_hook(at("lm1")),
    ]


def phases_of(t: dict) -> dict[str, float]:
    """The forward's phases (seconds) from the ``--phases`` clock readings: up to the tower, the tower, from the
    tower to the first LM layer (projector, LLaVA's image-token check and its device wait, the masks), the LM
    layers, and after them (final norm, LM head)."""
    f0, f1 = t["forward"]
    return {
        "pre_tower": t["tower0"] - f0,
        "tower": t["tower1"] - t["tower0"],
        "bridge": t["lm0"] - t["tower1"],
        "lm": t["lm1"] - t["lm0"],
        "tail": f1 - t["lm1"],
    }


def run(
    vlm,
    batch,
    rounds: int,
    warmup: int,
    seed: int = 0,
    effects: bool = False,
    floor: bool = False,
    phases: bool = False,
    compare: str | None = None,
    flush_after: bool = False,
) -> dict:
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
    if floor:
        cases.update(floor_cases(vlm, batch))
    if flush_after:  # every group flushed after the forward: the forward's phases then hold the holds alone
        for name, (queries, vision) in CASES.items():
            cases[f"capture_{name}_flush_after"] = lambda q=queries, v=vision: _flushed_after(engine, vlm, batch, q, v)
    other = None
    if compare:  # the same captures through another copy of vtrlab (an A/B of two versions in one process)
        other = importlib.import_module(f"{compare}.probes.engine")
        for name, (queries, vision) in CASES.items():
            cases[f"{compare}:capture_{name}"] = lambda q=queries, v=vision: other.capture(
                vlm, batch, queries=q, vision=v
            )
    stamps = Stamps()
    stamps.wrap(vlm.model, "forward", "forward")  # an instance attribute: the forward as capture calls it
    stamps.wrap(engine, "_build", "build")
    if other is not None:
        stamps.wrap(other, "_build", "build")
    if device.type == "cuda":
        stamps.wrap(torch.cuda.Event, "synchronize", "wait")
    handles = _phase_hooks(vlm, stamps.t) if phases else []
    parts: dict[str, list[dict]] = {k: [] for k in cases}
    collected = [0.0, 0]  # the garbage collector inside the timed call: seconds, collections (automatic ones)
    started = [0.0]

    def on_gc(phase, _info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collected[0] += time.perf_counter() - started[0]
            collected[1] += 1

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
                collected[:] = [0.0, 0]
                gc.callbacks.append(on_gc)
                t0 = time.perf_counter()
                try:
                    out = cases[names[i]]()
                    _capture._sync(device)
                    t1 = time.perf_counter()
                finally:
                    gc.callbacks.remove(on_gc)
                m1 = _allocator_counts(device)
                del out
                p = parts_of(stamps.t, t0, t1)
                if phases:
                    p.update(phases_of(stamps.t))
                p["total"] = t1 - t0
                p["gc"], p["gc_collections"] = collected
                p.update({k: m1[k] - m0[k] for k in m0})
                parts[names[i]].append(p)
    finally:
        gc.unfreeze()
        for handle in handles:
            handle.remove()
        stamps.restore()
        vlm.model.__dict__.pop("forward", None)
    base = parts["sdpa"]
    out = {}
    for name, calls in parts.items():
        keys = [k for k in calls[0] if k not in ALLOCATOR_COUNTS and k != "gc_collections"]
        out.setdefault(name, {})["gc_collections_per_call"] = statistics.mean(c["gc_collections"] for c in calls)
        for k in ALLOCATOR_COUNTS:  # device allocator events per call (cudaMalloc / cudaFree, retries)
            if k in calls[0]:
                out.setdefault(name, {})[f"{k}_per_call"] = statistics.mean(c[k] for c in calls)
        res = {f"{k}_ms": 1e3 * statistics.median(c[k] for c in calls) for k in keys}
        res["total_min_ms"] = 1e3 * min(c["total"] for c in calls)
        if name != "sdpa":
            res["forward_added_ms"] = 1e3 * statistics.median(c["forward"] - b["forward"] for c, b in zip(calls, base))
            res["total_added_ms"] = 1e3 * statistics.median(c["total"] - b["total"] for c, b in zip(calls, base))
            for k in PHASES if phases else ():
                res[f"{k}_added_ms"] = 1e3 * statistics.median(c[k] - b[k] for c, b in zip(calls, base))
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
        "| case | total | added | setup | forward | forward added | after | build | wait | rest | gc (per call) | "
        "cudaMalloc/Free |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in r.items():

        def f(key, res=res):
            v = res.get(key)
            return "—" if v is None else f"{v:.2f}"

        lines.append(
            f"| {name} | {f('total_ms')} | {f('total_added_ms')} | {f('setup_ms')} | {f('forward_ms')} | "
            f"{f('forward_added_ms')} | {f('after_ms')} | {f('build_ms')} | {f('wait_ms')} | {f('rest_ms')} | "
            f"{f('gc_ms')} ({f('gc_collections_per_call')}) | "
            f"{f('num_device_alloc_per_call')} / {f('num_device_free_per_call')} |"
        )
    if any("tower_added_ms" in res for res in r.values()):
        lines += [
            "",
            "The forward's phases, added over the plain forward's (ms; median of per-round differences):",
            "",
            "| case | " + " | ".join(PHASES) + " |",
            "|---|" + "---:|" * len(PHASES),
        ]
        for name, res in r.items():
            if "tower_added_ms" in res:
                lines.append(f"| {name} | " + " | ".join(f"{res[f'{k}_added_ms']:.2f}" for k in PHASES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _capture.add_one_shape_args(ap)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--effects", action="store_true", help="also the cases that isolate the forward's added time")
    ap.add_argument("--floor", action="store_true", help="also the least a per-layer capture can cost (floor_*)")
    ap.add_argument("--phases", action="store_true", help="also split the forward: tower, bridge, LM, tail")
    ap.add_argument(
        "--flush-after", action="store_true", help="also every capture with its groups flushed after the forward"
    )
    ap.add_argument(
        "--compare",
        default=None,
        metavar="PACKAGE",
        help="also capture through another copy of vtrlab importable as PACKAGE (e.g. the previous commit's, its "
        "imports renamed), interleaved with this one's: an A/B in one process",
    )
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
        "results": run(
            vlm,
            batch,
            args.rounds,
            args.warmup,
            effects=args.effects,
            floor=args.floor,
            phases=args.phases,
            compare=args.compare,
            flush_after=args.flush_after,
        ),
    }
    print(markdown(report), flush=True)
    _capture.write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
