"""Real latency of every registered reduction method vs keeping all image tokens.

GPU (bf16, random weights, full-size shapes; run through the device tool)::

    python benchmarks/reduce.py --out $OUT/reduce.json            # both 7B shapes, ~9 min time box

CPU smoke run (tiny models, depth-scaled layers, seconds)::
CPU smoke run (tiny models, depth-scaled layers, seconds)::

    python benchmarks/reduce.py --smoke --out /tmp/reduce-smoke.json

Per shape (LLaVA-1.5-7B: 576 image tokens; LLaVA-NeXT-7B at 672x672: ~2,900 tokens), per method
and budget (64 / 128 / 192 of 576, the same ratios at NeXT), median of ``--repeats`` after
``--warmup``, one sample:

  ttft_s        time to first token: vision tower + the method's scoring + prefill (``generate_ids``
                with one new token, the head on the last column only)
  prefill_s     the LM prefill alone on the (reduced) decoder inputs — for in-LM methods with their
                scoring inside, as it runs
  scoring_s     the method's own scoring: ``select`` on cached decoder inputs (pre-LM methods; includes
                any extra vision forward its signal needs) or the summed time of its in-LM
                ``lm_score``/``lm_keep`` calls; relative to a full keep-all forward in ``scoring_vs_forward``
  decode_s      per generated token over ``--new-tokens`` cached steps (EOS disabled so every run
                decodes the same number of tokens)
  peak_extra    ``max_memory_allocated`` during the TTFT call minus memory before it (CUDA only)

``keep_all`` is the unreduced model through the same path; ``random@0.250`` (a pre-LM drop with no
scoring) gives the prefill speed-up of removal itself at 25% keep. The JSON (``--out``) and a markdown
table beside it (``.md``) are rewritten atomically after EVERY method, so a crash or a time-out keeps
what was measured. ``--time-budget`` (seconds, default 510) is shared between the shapes (each gets its
share of what is left); methods that no longer fit are recorded as ``skipped``, and one method call
running past ``--method-timeout`` is interrupted (``error``). ``summary`` per shape: the prefill speed-up
at 25% keep, and per method the largest scoring time as a share of a keep-all forward (target <= 10%).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {"llava-1.5-7b": ("llava-1.5-7b", (336, 336)), "llava-next-7b": ("llava-next-7b", (672, 672))}
TINY = {"llava-1.5-tiny": ("llava", (40, 40)), "llava-next-tiny": ("llava_next", (64, 48))}
BUDGETS = (64 / 576, 128 / 576, 192 / 576)
QUARTER = 0.25  # the headline ratio: prefill at 25% keep vs keeping all
SCORING_TARGET = 0.10  # no method's scoring should add more than 10% of a full forward
PROMPT = "What color is the car?"
SKIP = {"oracle": "needs ground-truth relevance (organism only)"}


_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_capture", _HERE / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)
_sync, measure = _capture._sync, _capture.measure  # one timing loop for every benchmark


def _image(size, seed=0):
    from PIL import Image

    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


class _Timed:
    """Wrap an in-LM method's scoring calls with a synchronised timer (sum over stages)."""

    def __init__(self, method, device):
        self.total = 0.0
        self.method, self.device = method, device
        self._score, self._keep = method.lm_score, method.lm_keep

    def __enter__(self):
        def timed(fn):
            def call(*a, **k):
                _sync(self.device)
                t0 = time.perf_counter()
                out = fn(*a, **k)
                _sync(self.device)
                self.total += time.perf_counter() - t0
                return out

            return call

        self.method.lm_score, self.method.lm_keep = timed(self._score), timed(self._keep)
        return self

    def __exit__(self, *exc):
        self.method.lm_score, self.method.lm_keep = self._score, self._keep


def bench_method(vlm, batch, name, params, budget, args) -> dict:
    import importlib

    from vtrlab import reduce as R
    from vtrlab.reduce.apply import select

    A = importlib.import_module("vtrlab.reduce.answer")
    F = importlib.import_module("vtrlab.reduce.forward")
    from vtrlab.reduce.keep import reduced_decoder_inputs

    device = vlm.device
    dec = R.decoder_inputs(vlm, batch)
    method = None if name == "keep_all" else R.get(name, **params)
    keep = None if method is None else budget
    res: dict = {}
    res["ttft"] = measure(
        lambda: A.generate_ids(vlm, batch, keep, max_new_tokens=1, method=method), device, args.warmup, args.repeats
    )

    if method is None or method.stage != "lm":
        sel = None if method is None else select(vlm, batch, method, keep, dec)
        red = reduced_decoder_inputs(
            vlm,
            batch,
            None if sel is None else sel.keep,
            dec,
            embeds=None if sel is None else sel.embeds,
            positions="kept" if method is None else method.positions,
        )

        def prefill():
            with torch.no_grad():
                F.forward_embeds(
                    vlm,
                    red.inputs_embeds,
                    red.attention_mask,
                    red.position_ids,
                    use_cache=False,
                    extras=red.per_token,
                    last_only=True,
                )

        res["prefill"] = measure(prefill, device, args.warmup, args.repeats)
        if method is not None:
            res["scoring"] = measure(lambda: select(vlm, batch, method, keep, dec), device, args.warmup, args.repeats)
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
            with (
                _Timed(method, device) as t,
                lm_removal(vlm, batch, method, keep, red.source_positions, pre=pre),
                torch.no_grad(),
            ):
                F.forward_embeds(
                    vlm,
                    red.inputs_embeds,
                    red.attention_mask,
                    red.position_ids,
                    use_cache=False,
                    extras=red.per_token,
                    last_only=True,
                )
            return {"scoring_s": t.total}

        res["prefill"] = measure(prefill, device, args.warmup, args.repeats)
        res["scoring"] = {"median_s": res["prefill"]["inner"]["scoring_s"]}

    n = args.new_tokens
    long = measure(
        lambda: A.generate_ids(vlm, batch, keep, max_new_tokens=n + 1, method=method),
        device,
        max(args.warmup - 1, 0),
        args.repeats,
    )
    res["decode_s_per_token"] = max(long["median_s"] - res["ttft"]["median_s"], 0.0) / n
    if method is not None:
        res["params"] = {k: v for k, v in method.params.items()}
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
    names = [n for n in R.names() if n not in SKIP]
    if args.methods:
        names = [n for n in args.methods.split(",") if n != "keep_all"]
    base_forward = base_ttft = None
    for name, b in plan(names):
        key = f"{name}@{b:.3f}"
        left = deadline - time.monotonic()
        if left <= 0:
            row["results"][key] = {"skipped": "time budget spent", "method": name, "budget": b}
            continue
        try:
            if name != "keep_all" and base_forward is None:
                raise RuntimeError("keep_all was not measured; no baseline")
            params = {} if name == "keep_all" else depth_scaled_params(vlm, name, collapse=args.smoke)
            res = _call_with_timeout(
                lambda name=name, params=params, b=b: bench_method(vlm, batch, name, params, b, args),
                min(args.method_timeout, left),
            )
        except Exception as err:  # noqa: BLE001 - one method failing must not hide the others' numbers
            res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
            res.update(method=name, budget=b)
            print(f"  {key:28s} failed: {res['error']}", flush=True)
            row["results"][key] = res
            if on_result is not None:
                on_result(row)
            continue
        if name == "keep_all":
            base_forward = res["prefill"]["median_s"]
            base_ttft = res["ttft"]["median_s"]
        res["budget"] = b
        res["method"] = name
        res["ttft_speedup"] = base_ttft / res["ttft"]["median_s"]
        res["prefill_speedup"] = base_forward / res["prefill"]["median_s"]
        if "scoring" in res:
            res["scoring_vs_forward"] = res["scoring"]["median_s"] / base_forward
        row["results"][key] = res
        print(
            f"  {key:28s} ttft {res['ttft']['median_s']:.4f}s ({res['ttft_speedup']:.2f}x) "
            f"prefill {res['prefill']['median_s']:.4f}s ({res['prefill_speedup']:.2f}x)",
            flush=True,
        )
        if on_result is not None:
            on_result(row)
    row["summary"] = summarise(row)
    return row


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}; "
        f"median of {report['repeats']} after {report['warmup']} warm-up; "
        f"decode over {report['new_tokens']} tokens.",
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
                lines.append(f"| {row['shape']} | {key} | — | — | — | — | — | — | — | {r['error']} |")
                continue
            peak = r["ttft"]["peak_extra_bytes"]
            lines.append(
                f"| {row['shape']} | {r['method']} | {int(round(r['budget'] * n))} | {r['ttft']['median_s']:.4f} | "
                f"{r['ttft_speedup']:.2f} | {r['prefill']['median_s']:.4f} | {r['prefill_speedup']:.2f} | "
                f"{r.get('scoring_vs_forward', float('nan')):.3f} | {1000 * r['decode_s_per_token']:.2f} | "
                f"{'n/a' if peak is None else f'{peak / 2**30:.3f}'} |"
            )
    for row in report["shapes"]:
        sm = row.get("summary") or summarise(row)
        q = sm["prefill_speedup_at_25pct"]
        lines.append("")
        lines.append(
            f"**{row['shape']}** ({row.get('n_tokens', '?')} tokens): prefill at 25% keep "
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--time-budget", type=float, default=510.0, help="seconds for all shapes (model loads included)")
    ap.add_argument("--method-timeout", type=float, default=60.0, help="seconds one method at one budget may take")
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
        share = (end - time.monotonic()) / (len(names) - i)  # this shape's share of what is left
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
