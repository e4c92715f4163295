"""Real latency of every registered reduction method vs keeping all image tokens.

GPU (bf16, random weights, full-size shapes; one device call, about 5 minutes with both model builds)::

    python benchmarks/reduce.py --out $OUT/reduce.json            # both 7B shapes, --time-budget 330 s

CPU smoke run (tiny models, depth-scaled layers, seconds)::

    python benchmarks/reduce.py --smoke --out /tmp/reduce-smoke.json

Per shape (LLaVA-1.5-7B: 576 image tokens; LLaVA-NeXT-7B at 672x672: ~2,900 tokens), per method in
priority order (:data:`ORDER`: keep_all, random, pooling, fastv, fastervlm, ..., cdpruner last) and
budget (64 / 128 / 192 of 576, the same ratios at NeXT), median of ``--repeats`` (7) after ``--warmup``
(2) runs, one sample, the garbage collector off inside each timed loop, the device synchronised around
every timed region:

  ttft_s        time to first token: vision tower + the method's scoring + prefill + the first token on
                the host (``generate_ids`` with ``on_token``, step 0)
  decode_s      per generated token, the ``--new-tokens`` cached steps that follow in the SAME call
                (EOS disabled so every run decodes the same number of tokens)
  prefill_s     the LM prefill alone, given the reduced decoder inputs (built once, outside the timing);
                for in-LM methods the removal and its scoring run inside it, as in the TTFT path
  scoring_s     pre-LM methods: the selection in a fresh context (its own vision forward included) minus
                a plain vision forward (``adapter.decoder_inputs``) when that selection also produced the
                LM inputs — what the method adds over keeping all, the tower running once either way;
                in-LM methods: the summed time of their ``lm_score``/``lm_keep`` calls (synchronised),
                measured in a separate loop so that ``prefill_s`` carries no extra synchronisation.
                ``scoring_vs_forward``: scoring_s over the keep-all TTFT (one full forward: tower + LM)
  peak_extra    ``max_memory_allocated`` during the TTFT call minus memory before it (CUDA only)

``random@0.250`` (a pre-LM drop with no scoring) gives the prefill speed-up of removal itself at 25% keep.
The JSON (``--out``) and a markdown table beside it (``.md``) are rewritten atomically after EVERY cell,
so a crash or a time-out keeps what was measured. ``--time-budget`` (seconds, model builds included) is
shared between the shapes (each gets its share of what is left, NeXT weighted by its cost); cells that no
longer fit are recorded as ``skipped``; one cell running past ``--method-timeout`` is interrupted.
``summary`` per shape: the prefill speed-up at 25% keep, and per method the largest scoring share
(target <= 10%).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {"llava-1.5-7b": ("llava-1.5-7b", (336, 336)), "llava-next-7b": ("llava-next-7b", (672, 672))}
TINY = {"llava-1.5-tiny": ("llava", (40, 40)), "llava-next-tiny": ("llava_next", (64, 48))}
COST = {"llava-1.5-7b": 1.0, "llava-next-7b": 1.6}  # relative time per shape (NeXT's prefill is ~2.5x longer)
BUDGETS = (64 / 576, 128 / 576, 192 / 576)
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


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _image(size, seed=0):
    from PIL import Image

    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def timed(fn, device, warmup: int, repeats: int) -> dict:
    """Median wall time of ``fn()`` over ``repeats`` after ``warmup`` calls; the device synchronised before
    and after each call, the garbage collector off inside the loop (collected once before it); peak extra
    memory per call (CUDA). ``fn`` may return a dict of inner timings (medians reported under ``inner``)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    gc.collect()
    times, peaks, inner = [], [], []
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
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


def _ttft_decode(vlm, batch, method, keep, args) -> dict:
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

    r = timed(call, vlm.device, args.warmup, args.repeats)
    return {  # medians of each part over the same calls
        "ttft": {"median_s": r["inner"]["at_first"], "peak_extra_bytes": r["peak_extra_bytes"]},
        "decode_s_per_token": (r["inner"]["at_end"] - r["inner"]["at_first"]) / n,
        "call_s": r["median_s"],
    }


def vision_seconds(vlm, batch, args) -> float:
    """A plain vision forward (the adapter's decoder inputs: tower, projector, embeddings merged)."""
    with torch.no_grad():
        return timed(
            lambda: vlm.adapter.decoder_inputs(vlm.model, batch.inputs), vlm.device, args.warmup, args.repeats
        )["median_s"]


def bench_method(vlm, batch, name, params, budget, args, vision_s: float) -> dict:
    import importlib

    from vtrlab import reduce as R
    from vtrlab.reduce.apply import select_in_context

    F = importlib.import_module("vtrlab.reduce.forward")
    from vtrlab.reduce.keep import reduced_decoder_inputs

    device = vlm.device
    method = None if name == "keep_all" else R.get(name, **params)
    keep = None if method is None else budget
    res: dict = _ttft_decode(vlm, batch, method, keep, args)
    dec = R.decoder_inputs(vlm, batch)

    def forward(red):
        F.forward_embeds(
            vlm,
            red.inputs_embeds,
            red.attention_mask,
            red.position_ids,
            use_cache=False,
            extras=red.per_token,
            last_only=True,
        )

    if method is None or method.stage != "lm":
        sel = None if method is None else select_in_context(vlm, batch, method, keep, dec)[0]
        red = reduced_decoder_inputs(
            vlm,
            batch,
            None if sel is None else sel.keep,
            dec,
            embeds=None if sel is None else sel.embeds,
            positions="kept" if method is None else method.positions,
            extra=None if sel is None else sel.info.get("extra"),
        )
        with torch.no_grad():
            res["prefill"] = timed(lambda: forward(red), device, args.warmup, args.repeats)
        if method is not None:
            ran_tower = select_in_context(vlm, batch, method, keep)[1].has_decoder_inputs()
            t = timed(lambda: select_in_context(vlm, batch, method, keep), device, args.warmup, args.repeats)
            res["select_s"] = t["median_s"]
            res["select_ran_tower"] = bool(ran_tower)
            res["scoring"] = {"median_s": t["median_s"] - (vision_s if ran_tower else 0.0)}
    else:
        from vtrlab.reduce.stages.lm import lm_removal, pre_lm

        pre = pre_lm(vlm, batch, method, keep, dec)  # MustDrop's tower stage (None for the other in-LM methods)
        red = reduced_decoder_inputs(
            vlm,
            batch,
            None if pre is None else pre.keep,
            dec,
            embeds=None if pre is None else pre.embeds,
            positions="kept" if pre is None else method.positions,
        )

        def prefill():
            with lm_removal(vlm, batch, method, keep, red.source_positions, pre=pre), torch.no_grad():
                forward(red)

        res["prefill"] = timed(prefill, device, args.warmup, args.repeats)

        def scored():
            with _Timed(method, device) as t, lm_removal(vlm, batch, method, keep, red.source_positions, pre=pre):
                with torch.no_grad():
                    forward(red)
            return {"scoring_s": t.total}

        res["scoring"] = {"median_s": timed(scored, device, 1, args.repeats)["inner"]["scoring_s"]}
    if method is not None:
        res["params"] = dict(method.params)
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


def plan(names: list[str]) -> list[tuple[str, float]]:
    """(method, budget) in run order: keep-all, random at 25%, then every method at the three budgets."""
    out = [("keep_all", 1.0), ("random", QUARTER)]
    for name in names:
        if name != "keep_all":
            out += [(name, b) for b in BUDGETS]
    return out


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
        "measured": sum("error" not in r and "skipped" not in r for r in res.values()),
        "failed": sorted(k for k, r in res.items() if "error" in r),
        "skipped": sorted(k for k, r in res.items() if "skipped" in r),
    }


def bench_shape(label, vlm, size, args, deadline: float = float("inf"), on_result=None) -> dict:
    import importlib

    from vtrlab import reduce as R
    from vtrlab.analysis.reduction_sweep import depth_scaled_params

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
    row["vision_s"] = vision_seconds(vlm, batch, args)
    base_prefill = base_ttft = None
    for name, b in plan(names):
        key = f"{name}@{b:.3f}"
        left = deadline - time.monotonic()
        if left <= 0:
            row["results"][key] = {"skipped": "time budget spent", "method": name, "budget": b}
            continue
        t_cell = time.monotonic()
        try:
            if name != "keep_all" and base_prefill is None:
                raise RuntimeError("keep_all was not measured; no baseline")
            params = {} if name == "keep_all" else depth_scaled_params(vlm, name, collapse=args.smoke)
            res = _call_with_timeout(
                lambda name=name, params=params, b=b: bench_method(vlm, batch, name, params, b, args, row["vision_s"]),
                min(args.method_timeout, left),
            )
        except Exception as err:  # noqa: BLE001 - one method failing must not hide the others' numbers
            res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
            res.update(method=name, budget=b, cell_s=time.monotonic() - t_cell)
            print(f"  {key:28s} failed: {res['error']}", flush=True)
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
            res["scoring_vs_forward"] = res["scoring"]["median_s"] / base_ttft
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


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}; "
        f"median of {report['repeats']} after {report['warmup']} warm-up; "
        f"decode over {report['new_tokens']} tokens (same calls as TTFT); prefill = the LM alone on the reduced "
        "inputs; scoring / forward = what the method's scoring adds (pre-LM: its selection minus a plain vision "
        "forward when it ran the tower; in-LM: its score/keep calls) over the keep-all TTFT."
        + (f" Wall {report['wall_s']:.0f} s." if report.get("wall_s") else ""),
        "",
        "| shape | method | kept | TTFT (s) | TTFT × | prefill (s) | prefill × | scoring / forward | "
        "decode (ms/token) | peak extra (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["shapes"]:
        n = row.get("n_image_tokens", 0)
        for key, r in row["results"].items():
            if "skipped" in r:
                lines.append(f"| {row['shape']} | {key} | — | — | — | — | — | — | — | skipped: {r['skipped']} |")
                continue
            if "error" in r:
                lines.append(f"| {row['shape']} | {key} | — | — | — | — | — | — | — | {r['error'][:140]} |")
                continue
            peak = r["ttft"]["peak_extra_bytes"]
            lines.append(
                f"| {row['shape']} | {r['method']} | {int(round(r['budget'] * n))} | {r['ttft']['median_s']:.4f} | "
                f"{r['ttft_speedup']:.2f} | {r['prefill']['median_s']:.4f} | {r['prefill_speedup']:.2f} | "
                f"{_fmt(r.get('scoring_vs_forward'))} | {1000 * r['decode_s_per_token']:.2f} | "
                f"{'n/a' if peak is None else f'{peak / 2**30:.3f}'} |"
            )
    for row in report["shapes"]:
        sm = row.get("summary") or summarise(row)
        q = sm["prefill_speedup_at_25pct"]
        lines.append("")
        lines.append(
            f"**{row['shape']}** ({row.get('n_tokens', '?')} tokens; vision forward "
            f"{1000 * row.get('vision_s', float('nan')):.1f} ms): prefill at 25% keep "
            f"{'not measured' if q is None else f'{q:.2f}x as fast as keeping all'}; scoring above "
            f"{100 * sm['scoring_target']:.0f}% of a forward: {', '.join(sm['scoring_over_target']) or 'none'}; "
            f"{sm['measured']} measured, {len(sm['failed'])} failed, {len(sm['skipped'])} skipped."
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
    ap.add_argument("--new-tokens", type=int, default=4, help="decode steps timed after the first token")
    ap.add_argument("--time-budget", type=float, default=330.0, help="seconds for all shapes (model builds included)")
    ap.add_argument("--method-timeout", type=float, default=30.0, help="seconds one method at one budget may take")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1:
        ap.error("--repeats and --new-tokens must be >= 1, --warmup >= 0")
    if args.time_budget <= 0 or args.method_timeout <= 0:
        ap.error("--time-budget and --method-timeout must be > 0")
    t_start = time.monotonic()
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
        try:
            vlm = testing.tiny(builder) if args.smoke else testing.full_size(builder, dtype="bfloat16", device="cuda")
        except Exception as err:  # noqa: BLE001 - the other shape may still be measured
            report["shapes"][i]["error"] = f"{type(err).__name__}: {err}"
            write_report(report, out)
            continue

        def partial(row, i=i):
            report["shapes"][i] = row
            write_report(report, out)

        report["shapes"][i] = bench_shape(name, vlm, size, args, deadline=deadline, on_result=partial)
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
