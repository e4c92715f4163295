"""Real latency of every registered reduction method vs keeping all image tokens.

GPU (bf16, random weights, full-size shapes). One shape per process, each on its own GPU (about 6 minutes
each with the model build; ``benchmarks/run.py --only reduce --gpus 2`` starts both, pinned to their own
cores, and merges the JSONs)::

    CUDA_VISIBLE_DEVICES=0 python benchmarks/reduce.py --shapes llava-1.5-7b --out $OUT/r15.json --time-budget 380
    CUDA_VISIBLE_DEVICES=1 python benchmarks/reduce.py --shapes llava-next-7b --out $OUT/rnext.json --time-budget 380

CPU smoke run (tiny models, one cell per method: every method's code path once)::

    python benchmarks/reduce.py --smoke --out /tmp/reduce-smoke.json

Per shape (LLaVA-1.5-7B: 576 image tokens; LLaVA-NeXT-7B at 672x672: 2,880), per method in priority order
(:data:`ORDER`: keep_all, random, pooling, fastv, fastervlm, ..., cdpruner last) and budget (64 / 128 / 192
of 576, the same ratios at NeXT), median of ``--repeats`` (7) timed calls, one sample, the garbage
collector off inside each timed loop, the device synchronised around every timed region. Warm-up:
``--warmup`` (2) calls before a method's first budget, 1 before each later one (same code, new sizes).

  ttft_s        time to first token: vision tower + the method's scoring + prefill + the first token on
                the host (``generate_ids`` with ``on_token``, step 0) — the whole path as a user calls it
  decode_s      per generated token, the ``--new-tokens`` cached steps that follow in the SAME call
                (EOS disabled so every run decodes the same number of tokens)
  prefill_s     the LM prefill alone, given the reduced decoder inputs (built once, outside the timing);
                for in-LM methods the removal and its scoring run inside it, as in the TTFT path
  scoring_s     the method's own work, timed directly (CUDA events around exactly it), never as a
                difference of two separately timed runs:
                pre-LM methods: ``method.select`` on a context pre-loaded with the tower's raw outputs
                (``ReductionContext.tower_signals``: decoder inputs, recorded [CLS] attention, hooked
                tensors) — every method-side step (mapping to tokens, ranking, merging, projecting merged
                features) and nothing of the tower forward; tower-stage methods (ToMe, FlowCut) run their
                pruned tower pass here, which is all added work;
                in-LM methods: the summed time of their ``lm_score``/``lm_keep`` calls (synchronised; a
                separate loop, so ``prefill_s`` carries no extra synchronisation), plus MustDrop's pre-LM
                stage.
  signals_s     pre-LM methods that record tower signals: what recording them adds to a plain vision
                forward — the method's probe sites / hooks alone (``_vision.replay_signals``) vs a plain
                forward, timed in alternation, median of the paired differences (once per method).
                ``scoring_vs_forward`` = (scoring_s + max(signals_s, 0)) / the keep-all TTFT (one full
                forward: tower + LM); target <= 10%.
  peak_extra    ``max_memory_allocated`` during the TTFT call minus memory before it (CUDA only)

``random@0.250`` (a pre-LM drop with no scoring) gives the prefill speed-up of removal itself at 25% keep.
Methods that do not apply to a family (NotApplicable: e.g. HiRED without anyres, the learned selector off
the organism, CDPruner without a CLIP text tower) get one ``n/a`` row and cost nothing. PruMerge(+) run
budgeted (``adaptive=False``, :data:`BENCH_PARAMS`). The JSON (``--out``) and a markdown table beside it
(``.md``) are rewritten atomically after EVERY cell, so a crash or a time-out keeps what was measured.
``--time-budget`` (seconds, model builds included) is shared between the shapes of this process; cells that
no longer fit are recorded as ``skipped``; a cell running past ``--method-timeout`` is interrupted and
the method's remaining budgets are skipped; a cell interrupted because the time budget ran out is
``skipped``, not an error. ``summary`` per shape: the prefill speed-up at 25% keep, and per method the
largest scoring share (target <= 10%).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {"llava-1.5-7b": ("llava-1.5-7b", (336, 336)), "llava-next-7b": ("llava-next-7b", (672, 672))}
TINY = {"llava-1.5-tiny": ("llava", (40, 40)), "llava-next-tiny": ("llava_next", (64, 48))}
COST = {"llava-1.5-7b": 1.0, "llava-next-7b": 1.6}  # relative time per shape (NeXT's prefill is ~2.5x longer)
BUDGETS = (64 / 576, 128 / 576, 192 / 576)
SMOKE_BUDGETS = (0.6,)  # tiny models (16 / 64 image tokens): one cell per method, a budget every method accepts
# PruMerge(+)'s code default adaptive=True ignores the budget (its IQR outlier count; on random weights possibly
# none, where PruMerge+'s grid step is undefined): the latency table runs the budgeted variant
BENCH_PARAMS = {"prumerge": {"adaptive": False}, "prumerge_plus": {"adaptive": False}}
QUARTER = 0.25  # the headline ratio: prefill at 25% keep vs keeping all
SCORING_TARGET = 0.10  # no method's scoring should add more than 10% of a full forward
PROMPT = "What color is the car?"
SKIP = {"oracle": "needs ground-truth relevance (organism only)"}


# priority: what a time-out leaves unmeasured comes last; any other registered method next; cdpruner last
ORDER = tuple(
    "keep_all random pooling fastv fastervlm visionzip divprune dart sparsevlm pyramiddrop prumerge prumerge_plus "
    "vtc_cls hired vispruner feather fitprune flowcut tome mustdrop".split()
)
LAST = ("cdpruner",)


# One timed-call primitive, one sync and one test picture for every benchmark: capture.py's (as flow.py does).
_spec = importlib.util.spec_from_file_location("_bench_capture", Path(__file__).resolve().parent / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)
_timed_call, _image = _capture._timed_call, _capture._image


def _sync(device) -> None:
    _capture._sync(torch.device(device))


def timed(fn, device, warmup: int, repeats: int) -> dict:
    """Median wall time of ``fn()`` over ``repeats`` after ``warmup`` calls; the device synchronised before
    and after each call, the garbage collector off inside the loop (collected once per cell, before it:
    :func:`bench_method`); peak extra memory per call (CUDA). ``fn`` may return a dict of inner timings
    (medians reported under ``inner``)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times, peaks, inner = [], [], []
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t, peak, out, t0 = _timed_call(fn, device, collect=False)
            times.append(t)
            if peak is not None:
                peaks.append(peak)
            if isinstance(out, dict) and all(isinstance(v, float) for v in out.values()):  # inner timings
                inner.append({k: (v - t0 if k.startswith("at_") else v) for k, v in out.items()})
            del out
    finally:
        if was:
            gc.enable()
    res = {"median_s": statistics.median(times), "times_s": times}
    res["peak_extra_bytes"] = int(statistics.median(peaks)) if peaks else None
    if inner:
        res["inner"] = {k: statistics.median(e[k] for e in inner) for k in inner[0]}
    return res


def _event_time(fn, device) -> float:
    """Seconds of one ``fn()`` between two CUDA events recorded around it (the queue drained before the first,
    the second waited for: the host work inside ``fn`` and the kernels it launched both count);
    ``time.perf_counter`` around the call on the CPU."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_events(fn, device, warmup: int, repeats: int) -> dict:
    """Median :func:`_event_time` of ``fn()`` over ``repeats`` after ``warmup`` calls, GC off in the loop."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    was = gc.isenabled()
    gc.disable()
    try:
        times = [_event_time(fn, device) for _ in range(repeats)]
    finally:
        if was:
            gc.enable()
    return {"median_s": statistics.median(times), "times_s": times}


def paired_difference(fn_a, fn_b, device, warmup: int, repeats: int) -> dict:
    """``fn_b`` minus ``fn_a``, timed alternately (a, b, a, b, ...; CUDA events) so that drift of the host
    or the GPU clock hits both alike: the median of the per-pair differences, and each median. GC off."""
    device = torch.device(device)
    for _ in range(warmup):
        fn_a()
        fn_b()
    a_t, b_t = [], []
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            a_t.append(_event_time(fn_a, device))
            b_t.append(_event_time(fn_b, device))
    finally:
        if was:
            gc.enable()
    return {
        "median_s": statistics.median(b - a for a, b in zip(a_t, b_t)),
        "a_median_s": statistics.median(a_t),
        "b_median_s": statistics.median(b_t),
    }


class _Timed:
    """Wrap an in-LM method's scoring calls with a synchronised timer (sum over stages)."""

    def __init__(self, method, device):
        self.total = 0.0
        self.method, self.device = method, device
        self._score, self._keep = method.lm_score, method.lm_keep

    def __enter__(self):
        def wrap(fn):
            def call(*a, **k):
                _sync(self.device)
                t0 = time.perf_counter()
                out = fn(*a, **k)
                _sync(self.device)
                self.total += time.perf_counter() - t0
                return out

            return call

        self.method.lm_score, self.method.lm_keep = wrap(self._score), wrap(self._keep)
        return self

    def __exit__(self, *exc):
        self.method.lm_score, self.method.lm_keep = self._score, self._keep


def _ttft_decode(vlm, batch, method, keep, args, warmup: int) -> dict:
    """One loop for TTFT and decode: each call generates 1 + new_tokens tokens; TTFT ends when step 0's
    token is on the host (``on_token``), decode is the rest of the call per token."""
    import importlib

    A = importlib.import_module("vtrlab.reduce.answer")
    n = args.new_tokens

    def call():
        mark = {}

        def on_token(step):
            if step == 0:
                mark["at_first"] = time.perf_counter()

        A.generate_ids(vlm, batch, keep, max_new_tokens=n + 1, method=method, on_token=on_token)
        _sync(vlm.device)
        mark["at_end"] = time.perf_counter()
        return mark

    r = timed(call, vlm.device, warmup, args.repeats)
    return {  # medians of each part over the same calls
        "ttft": {"median_s": r["inner"]["at_first"], "peak_extra_bytes": r["peak_extra_bytes"]},
        "decode_s_per_token": (r["inner"]["at_end"] - r["inner"]["at_first"]) / n,
        "call_s": r["median_s"],
    }


def vision_seconds(vlm, batch, args) -> float:
    """A plain vision forward (the adapter's decoder inputs: tower, projector, embeddings merged)."""
    with torch.no_grad():
        return timed_events(
            lambda: vlm.adapter.decoder_inputs(vlm.model, batch.inputs), vlm.device, args.warmup, args.repeats
        )["median_s"]


def _prefill(vlm, red) -> None:
    import importlib

    F = importlib.import_module("vtrlab.reduce.forward")
    F.forward_embeds(
        vlm, red.inputs_embeds, red.attention_mask, red.position_ids, use_cache=False, extras=red.per_token,
        last_only=True,
    )  # fmt: skip


def signal_overhead(vlm, batch, requests, args) -> dict:
    """What recording a method's tower signals adds to a plain vision forward: the instrumented forward
    (:func:`vtrlab.reduce.methods._vision.replay_signals`: the probe sites and hooks its scoring asked for,
    nothing of its scoring) minus a plain one, timed in alternation (:func:`paired_difference`)."""
    from vtrlab.reduce.context import ReductionContext
    from vtrlab.reduce.methods._vision import replay_signals

    def plain():
        with torch.no_grad():
            vlm.adapter.decoder_inputs(vlm.model, batch.inputs)

    def instrumented():
        replay_signals(ReductionContext(vlm, batch), requests)

    return paired_difference(plain, instrumented, vlm.device, min(1, args.warmup), args.repeats)


def bench_method(vlm, batch, dec, name, params, budget, args, first: bool, cache: dict) -> dict:
    """One cell: TTFT + decode (the whole path, as a user calls it), the prefill alone on the reduced
    inputs, and the scoring alone (module doc). ``first``: the method's first budget (more warm-up; its
    tower-signal overhead is measured once per method and kept in ``cache``)."""
    from vtrlab import reduce as R
    from vtrlab.reduce.apply import select_in_context
    from vtrlab.reduce.context import ReductionContext, budgets
    from vtrlab.reduce.keep import reduced_decoder_inputs
    from vtrlab.reduce.registry import prepare

    device = vlm.device
    method = None if name == "keep_all" else R.get(name, **params)
    keep = None if method is None else budget
    gc.collect()  # once per cell (each timed loop runs with the collector off)
    res: dict = _ttft_decode(vlm, batch, method, keep, args, warmup=args.warmup if first else min(1, args.warmup))
    if method is None:
        red = reduced_decoder_inputs(vlm, batch, None, dec, _built_here=True)
        res["lm_tokens"] = int(red.attention_mask[0].sum())
        with torch.no_grad():
            res["prefill"] = timed(lambda: _prefill(vlm, red), device, min(1, args.warmup), args.repeats)
        return res
    res["params"] = {k: v for k, v in method.params.items() if not isinstance(v, (list, tuple)) or len(v) < 40}
    if method.stage != "lm":
        # the selection in a fresh context: its own tower forward, with the method's probes, as in the TTFT path
        sel, ctx = select_in_context(vlm, batch, method, keep)
        signals = ctx.tower_signals()
        red = reduced_decoder_inputs(
            vlm,
            batch,
            sel.keep,
            ctx.decoder_inputs() if ctx.has_decoder_inputs() else dec,
            embeds=sel.embeds,
            positions=method.positions,
            extra=sel.info.get("extra"),
            _built_here=True,
        )
        res["lm_tokens"] = int(red.attention_mask[0].sum())
        with torch.no_grad():
            res["prefill"] = timed(lambda: _prefill(vlm, red), device, min(1, args.warmup), args.repeats)
        prepare(method, vlm)
        n_keep = budgets(batch, keep)

        def scoring():
            with torch.no_grad():
                method.select(ReductionContext(vlm, batch, signals=signals), n_keep)

        res["scoring"] = timed_events(scoring, device, min(1, args.warmup), args.repeats)
        requests = signals.get("vision_requests")
        if requests and (requests["attention"] or requests["tensors"]):
            if name not in cache:
                cache[name] = signal_overhead(vlm, batch, requests, args)
            res["signals"] = cache[name]
        res["scoring_what"] = "tower pass with its merging" if method.stage == "tower" else "selection"
        return res
    from vtrlab.reduce.stages.lm import lm_removal, pre_lm

    pre = pre_lm(vlm, batch, method, keep, dec)  # MustDrop's tower stage (None for the other in-LM methods)
    red = reduced_decoder_inputs(
        vlm,
        batch,
        None if pre is None else pre.keep,
        dec,
        embeds=None if pre is None else pre.embeds,
        positions="kept" if pre is None else method.positions,
        extra=None if pre is None else pre.info.get("extra"),
        _built_here=True,
    )

    def prefill():
        with lm_removal(vlm, batch, method, keep, red.source_positions, pre=pre), torch.no_grad():
            _prefill(vlm, red)

    res["prefill"] = timed(prefill, device, min(1, args.warmup), args.repeats)

    def scored():
        with _Timed(method, device) as t, lm_removal(vlm, batch, method, keep, red.source_positions, pre=pre):
            with torch.no_grad():
                _prefill(vlm, red)
        return {"scoring_s": t.total}

    lm_s = timed(scored, device, 0, args.repeats)["inner"]["scoring_s"]
    res["scoring"] = {"median_s": lm_s, "lm_s": lm_s}
    res["scoring_what"] = "score/keep calls inside the prefill"
    if pre is not None:
        pre_s = timed_events(lambda: pre_lm(vlm, batch, method, keep, dec), device, min(1, args.warmup), args.repeats)[
            "median_s"
        ]
        res["scoring"].update(median_s=lm_s + pre_s, pre_lm_s=pre_s)
        res["scoring_what"] += " + its pre-LM stage"
    return res


class _MethodTimeout(Exception):
    pass


def _call_with_timeout(fn, seconds: float):
    """Run ``fn()``; raise :class:`_MethodTimeout` if it runs past ``seconds`` (SIGALRM, main thread)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        return fn()

    def on_alarm(_sig, _frame):
        raise _MethodTimeout(f"ran past {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def method_order(registered: list[str]) -> list[str]:
    """Registered methods (oracle left out) in priority order: :data:`ORDER`, then any other, then :data:`LAST`."""
    reg = [n for n in registered if n not in SKIP]
    first = [n for n in ORDER if n in reg or n == "keep_all"]
    last = [n for n in LAST if n in reg]
    return first + sorted(n for n in reg if n not in first and n not in last) + last


def plan(names: list[str], budgets=BUDGETS) -> list[tuple[str, float]]:
    """(method, budget) in run order: keep-all, random at 25%, then every method at each budget."""
    out = [("keep_all", 1.0), ("random", QUARTER)]
    for name in names:
        if name != "keep_all":
            out += [(name, b) for b in budgets]
    return out


def bench_params(vlm, name: str, smoke: bool, cache: dict) -> dict:
    """The parameters a method runs with here: the code's defaults, in-LM layers scaled to the LM's depth
    (:func:`vtrlab.analysis.reduction_sweep.depth_scaled_params`), :data:`BENCH_PARAMS`; on the tiny smoke
    models FitPrune's recipe is calibrated on the benchmark's batch (the published one is for 32 layers)."""
    from vtrlab.analysis.reduction_sweep import depth_scaled_params

    params = {**depth_scaled_params(vlm, name, collapse=smoke), **BENCH_PARAMS.get(name, {})}
    if name == "fitprune" and smoke and len(vlm.lm_layers) != 32:
        if "fitprune_scheme" not in cache:
            from vtrlab.reduce.methods.fitprune import calibrate

            cache["fitprune_scheme"] = tuple(int(v) for v in calibrate(vlm, cache["batch"], 0.6))
        params["scheme"] = cache["fitprune_scheme"]
    return params


def summarise(row: dict) -> dict:
    """Prefill speed-up at 25% keep and, per method, the largest scoring share of a keep-all forward."""
    res = row["results"]
    q = res.get(f"random@{QUARTER:.3f}", {})
    shares = {}
    for r in res.values():
        if "scoring_vs_forward" in r:
            m = r["method"]
            shares[m] = max(shares.get(m, 0.0), float(r["scoring_vs_forward"]))
    over = sorted(m for m, v in shares.items() if v > SCORING_TARGET)
    return {
        "prefill_speedup_at_25pct": q.get("prefill_speedup"),
        "ttft_speedup_at_25pct": q.get("ttft_speedup"),
        "scoring_share_max": shares,
        "scoring_target": SCORING_TARGET,
        "scoring_over_target": over,
        "measured": sum("ttft" in r for r in res.values()),
        "not_applicable": sorted({r["method"] for r in res.values() if "not_applicable" in r}),
        "failed": sorted(k for k, r in res.items() if "error" in r),
        "skipped": sorted(k for k, r in res.items() if "skipped" in r),
    }


def bench_shape(label, vlm, size, args, deadline: float = float("inf"), on_result=None) -> dict:
    import importlib

    from vtrlab import reduce as R
    from vtrlab.reduce.registry import NotApplicable, prepare

    A = importlib.import_module("vtrlab.reduce.answer")

    batch = vlm.prepare([_image(size)], [PROMPT])
    lay = batch.layouts[0]
    row = {
        "shape": label,
        "n_tokens": int(batch.inputs["input_ids"].shape[1]),
        "n_image_tokens": lay.n_image_tokens,
        "n_layers": len(vlm.lm_layers),
        "dtype": str(vlm.dtype).removeprefix("torch."),
        "results": {},
    }
    print(f"[{label}] {row['n_tokens']} tokens ({row['n_image_tokens']} image), {row['n_layers']} layers", flush=True)
    A._eos_ids = lambda _vlm: []  # benchmark only: every run decodes exactly the asked number of tokens
    names = method_order(R.names())
    if args.methods:
        names = [n for n in args.methods.split(",") if n != "keep_all"]
    budgets = SMOKE_BUDGETS if args.smoke else BUDGETS
    dec = R.decoder_inputs(vlm, batch)
    row["vision_s"] = vision_seconds(vlm, batch, args)
    base_prefill = base_ttft = None
    cache: dict = {"batch": batch}
    dead: dict[str, str] = {}  # method -> why its remaining budgets are not run
    seen: set[str] = set()
    for name, b in plan(names, budgets):
        key = f"{name}@{b:.3f}"
        left = deadline - time.monotonic()
        if name in dead:
            if not dead[name].startswith("not applicable"):  # n/a: its one row says why
                row["results"][key] = {"skipped": dead[name], "method": name, "budget": b}
            continue
        if left <= 0:
            row["results"][key] = {"skipped": "time budget spent", "method": name, "budget": b}
            continue
        first = name not in seen
        seen.add(name)
        t_cell = time.monotonic()
        limit = min(args.method_timeout, left)
        try:
            if name != "keep_all" and base_prefill is None:
                raise RuntimeError("keep_all was not measured; no baseline")
            params = {} if name == "keep_all" else bench_params(vlm, name, args.smoke, cache)
            if name != "keep_all":
                prepare(R.get(name, **params), vlm)  # NotApplicable before anything is timed
            res = _call_with_timeout(
                lambda name=name, params=params, b=b, first=first: bench_method(
                    vlm, batch, dec, name, params, b, args, first, cache
                ),
                limit,
            )
        except NotApplicable as err:
            res = {"not_applicable": err.why, "method": name, "budget": b}
            dead[name] = f"not applicable: {err.why}"
            print(f"  {key:28s} not applicable: {err.why}", flush=True)
            row["results"][key] = res
            if on_result is not None:
                on_result(row)
            continue
        except Exception as err:  # noqa: BLE001 - one method failing must not hide the others' numbers
            took = time.monotonic() - t_cell
            if isinstance(err, _MethodTimeout) and limit < args.method_timeout:
                # the shape's time budget ran out during the cell: not the method's fault
                res = {"skipped": f"time budget spent (interrupted after {took:.0f} s)"}
            else:
                res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                if isinstance(err, _MethodTimeout):
                    dead[name] = f"timed out at {key}"
            res.update(method=name, budget=b, cell_s=took)
            print(f"  {key:28s} {res.get('error') or res.get('skipped')}", flush=True)
            row["results"][key] = res
            if on_result is not None:
                on_result(row)
            continue
        if name == "keep_all":
            base_prefill = res["prefill"]["median_s"]
            base_ttft = res["ttft"]["median_s"]
        res["budget"] = b
        res["method"] = name
        res["cell_s"] = time.monotonic() - t_cell
        res["ttft_speedup"] = base_ttft / res["ttft"]["median_s"]
        res["prefill_speedup"] = base_prefill / res["prefill"]["median_s"]
        if "scoring" in res:
            extra = max(0.0, res["signals"]["median_s"]) if "signals" in res else 0.0
            res["scoring_vs_forward"] = (res["scoring"]["median_s"] + extra) / base_ttft
        row["results"][key] = res
        print(
            f"  {key:28s} ttft {res['ttft']['median_s']:.4f}s ({res['ttft_speedup']:.2f}x) "
            f"prefill {res['prefill']['median_s']:.4f}s ({res['prefill_speedup']:.2f}x) "
            f"scoring {res.get('scoring_vs_forward', float('nan')):.3f} [{res['cell_s']:.1f}s]",
            flush=True,
        )
        if on_result is not None:
            on_result(row)
    row["summary"] = summarise(row)
    return row


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _ms(r: dict, key: str) -> str:
    v = (r.get(key) or {}).get("median_s")
    return "—" if v is None else f"{1000 * v:.1f}"


HEADER = (
    "prefill = the LM alone on the reduced inputs; scoring = the method's own work timed directly (CUDA events): "
    "pre-LM, its selection given the tower's outputs (ToMe / FlowCut: their pruned tower pass), in-LM, its "
    "score/keep calls (+ MustDrop's pre-LM stage); signals = what recording its tower signals ([CLS] attention, "
    "hooked tensors) adds to a plain vision forward (paired, alternating runs; once per method); scoring / "
    "forward = (scoring + max(signals, 0)) over the keep-all TTFT (target <= 0.10)."
)


def markdown(report: dict) -> str:
    new = any("signals" in r or "scoring_what" in r for row in report["shapes"] for r in row["results"].values())
    warm = f"median of {report['repeats']} after {report['warmup']} warm-up"
    if new:
        warm += " (1 before a method's later budgets)"
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}; {warm}; "
        f"decode over {report['new_tokens']} tokens (same calls as TTFT); "
        + (
            HEADER
            if new
            else "prefill = the LM alone on the reduced inputs; scoring / forward = what the method's scoring adds "
            "(pre-LM: its selection minus a plain vision forward when it ran the tower; in-LM: its score/keep "
            "calls) over the keep-all TTFT."
        )
        + (f" Wall {report['wall_s']:.0f} s." if report.get("wall_s") else ""),
        "",
        "| shape | method | kept | TTFT (s) | TTFT × | prefill (s) | prefill × | scoring (ms) | signals (ms) | "
        "scoring / forward | decode (ms/token) | peak extra (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dash = "| — " * 10
    for row in report["shapes"]:
        n = row.get("n_image_tokens", 0)
        for key, r in row["results"].items():
            if "not_applicable" in r:
                lines.append(f"| {row['shape']} | {r['method']} {dash}| n/a: {r['not_applicable'][:140]} |")
                continue
            if "skipped" in r:
                lines.append(f"| {row['shape']} | {key} {dash}| skipped: {r['skipped']} |")
                continue
            if "error" in r:
                lines.append(f"| {row['shape']} | {key} {dash}| {r['error'][:140]} |")
                continue
            peak = r["ttft"]["peak_extra_bytes"]
            lines.append(
                f"| {row['shape']} | {r['method']} | {int(round(r['budget'] * n))} | {r['ttft']['median_s']:.4f} | "
                f"{r['ttft_speedup']:.2f} | {r['prefill']['median_s']:.4f} | {r['prefill_speedup']:.2f} | "
                f"{_ms(r, 'scoring')} | {_ms(r, 'signals')} | "
                f"{_fmt(r.get('scoring_vs_forward'))} | {1000 * r['decode_s_per_token']:.2f} | "
                f"{'n/a' if peak is None else f'{peak / 2**30:.3f}'} |"
            )
    for row in report["shapes"]:
        if "error" in row and not row.get("results"):
            lines += ["", f"**{row['shape']}**: not measured ({row['error'][:200]})"]
            continue
        sm = row.get("summary") or summarise(row)
        q = sm["prefill_speedup_at_25pct"]
        na = sm.get("not_applicable") or []
        lines.append("")
        lines.append(
            f"**{row['shape']}** ({row.get('n_tokens', '?')} tokens; vision forward "
            f"{1000 * row.get('vision_s', float('nan')):.1f} ms): prefill at 25% keep "
            f"{'not measured' if q is None else f'{q:.2f}x as fast as keeping all'}; scoring above "
            f"{100 * sm['scoring_target']:.0f}% of a forward: {', '.join(sm['scoring_over_target']) or 'none'}; "
            f"{sm['measured']} measured, {len(sm['failed'])} failed, {len(sm['skipped'])} skipped"
            + (f", not applicable: {', '.join(na)}" if na else "")
            + "."
        )
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    """JSON + markdown, each written atomically (temporary file, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(report, indent=2, default=str)), (out.with_suffix(".md"), markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (a .md table is written beside it)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run on tiny random models")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(SHAPES)} (or the tiny ones)")
    ap.add_argument("--methods", default=None, help="comma-separated registry names (default: all but oracle)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=3, help="decode steps timed after the first token")
    ap.add_argument(
        "--time-budget", type=float, default=380.0, help="seconds for all shapes of this process (builds included)"
    )
    ap.add_argument("--method-timeout", type=float, default=60.0, help="seconds one method at one budget may take")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1:
        ap.error("--repeats and --new-tokens must be >= 1, --warmup >= 0")
    if args.time_budget <= 0 or args.method_timeout <= 0:
        ap.error("--time-budget and --method-timeout must be > 0")
    t_start = time.monotonic()
    if args.smoke:
        torch.set_num_threads(1)  # tiny models on a shared CPU: more threads only wait on each other
    from vtrlab import testing

    table = TINY if args.smoke else SHAPES
    names = list(table) if args.shapes is None else args.shapes.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {list(table)}")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("full-size shapes need a CUDA GPU; use --smoke on CPU")
    import transformers

    report = {
        "device": torch.cuda.get_device_name() if not args.smoke else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "new_tokens": args.new_tokens,
        "budgets_of_576": [64, 128, 192],
        "time_budget_s": args.time_budget,
        "host": {
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        },
        "shapes": [],
    }
    out = Path(args.out)
    end = t_start + args.time_budget
    for i, name in enumerate(names):
        builder, size = table[name]
        weights = [COST.get(n, 1.0) for n in names[i:]]
        share = (end - time.monotonic()) * weights[0] / sum(weights)  # this shape's share of what is left
        deadline = time.monotonic() + share
        torch.manual_seed(0)
        report["shapes"].append({"shape": name, "results": {}})
        t_build = time.monotonic()
        try:
            vlm = testing.tiny(builder) if args.smoke else testing.full_size(builder, dtype="bfloat16", device="cuda")
            _sync(vlm.device)
        except Exception as err:  # noqa: BLE001 - the other shape may still be measured
            report["shapes"][i]["error"] = f"{type(err).__name__}: {err}"
            write_report(report, out)
            continue

        def partial(row, i=i):
            report["shapes"][i] = row
            write_report(report, out)

        build_s = time.monotonic() - t_build
        print(f"[{name}] model built in {build_s:.1f} s", flush=True)
        report["shapes"][i] = bench_shape(name, vlm, size, args, deadline=deadline, on_result=partial)
        report["shapes"][i]["build_s"] = build_s
        write_report(report, out)
        del vlm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["wall_s"] = time.monotonic() - t_start
    write_report(report, out)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
