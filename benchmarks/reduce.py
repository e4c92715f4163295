"""Real latency of every registered reduction method vs keeping all image tokens.

GPU (bf16, random weights, full-size shapes; run through the device tool)::

    python benchmarks/reduce.py --out $OUT/reduce.json

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

``keep_all`` is the unreduced model through the same path. Writes JSON to ``--out`` and a markdown
table beside it (``.md``), and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {"llava-1.5-7b": ("llava-1.5-7b", (336, 336)), "llava-next-7b": ("llava-next-7b", (672, 672))}
TINY = {"llava-1.5-tiny": ("llava", (40, 40)), "llava-next-tiny": ("llava_next", (64, 48))}
BUDGETS = (64 / 576, 128 / 576, 192 / 576)
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
        from vtrlab.reduce.stages.lm import lm_removal

        red = reduced_decoder_inputs(vlm, batch, None, dec)

        def prefill():
            with (
                _Timed(method, device) as t,
                lm_removal(vlm, batch, method, keep, red.source_positions),
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


def bench_shape(label, vlm, size, args) -> dict:
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
    names = ["keep_all"] + [n for n in R.names() if n not in SKIP]
    if args.methods:
        names = ["keep_all"] + [n for n in args.methods.split(",") if n != "keep_all"]
    base_forward = None
    for name in names:
        budgets = [1.0] if name == "keep_all" else BUDGETS
        for b in budgets:
            key = f"{name}@{b:.3f}"
            try:
                params = {} if name == "keep_all" else depth_scaled_params(vlm, name, collapse=args.smoke)
                res = bench_method(vlm, batch, name, params, b, args)
            except Exception as err:  # noqa: BLE001 - one method failing must not hide the others' numbers
                res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                print(f"  {key:28s} failed: {res['error']}", flush=True)
                row["results"][key] = res
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
        n = row["n_image_tokens"]
        for key, r in row["results"].items():
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
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (a .md table is written beside it)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run on tiny random models")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(SHAPES)} (or the tiny ones)")
    ap.add_argument("--methods", default=None, help="comma-separated registry names (default: all but oracle)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1:
        ap.error("--repeats and --new-tokens must be >= 1, --warmup >= 0")
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
        "shapes": [],
    }
    for name in names:
        builder, size = table[name]
        torch.manual_seed(0)
        vlm = testing.tiny(builder) if args.smoke else testing.full_size(builder, dtype="bfloat16", device="cuda")
        report["shapes"].append(bench_shape(name, vlm, size, args))
        del vlm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(report, indent=2, default=str)), (out.with_suffix(".md"), markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
