"""Cost of the information-flow verbs against a plain sdpa forward: saliency (the GPU number issue 11 asks
for: time ratio and peak extra memory, target <= 3x a plain forward), logit lens, rollout, one knockout.

GPU (bf16, random weights, full-size shapes; run through the device tool)::

    python benchmarks/flow.py --out $OUT/flow.json

CPU smoke run (tiny models, seconds), and CPU at realistic lengths (organism, a mid-size LLaVA-1.5)::

    python benchmarks/flow.py --smoke --out /tmp/flow-tiny.json
    python benchmarks/flow.py --cpu --threads 1 --out /tmp/flow-cpu.json

Methods (``--repeats`` interleaved rounds after ``--warmup``; ratios are medians of per-round ratios; timing
and memory as in ``benchmarks/capture.py``):

  sdpa              plain forward (use_cache=False), the reference cost
  saliency_last     vtrlab.saliency(queries="last", layers="all")  (forward + one autograd.grad)
  logit_lens_image  vtrlab.logit_lens(queries="image", layers="all", targets={"t": 0}, top_k=5)
  rollout_last      vtrlab.rollout(queries="last", layers="all")  (a running (N, N) product)
  knockout_window   vtrlab.knockout(keys="image", queries="last", layers=first quarter)  (two forwards:
                    plain, then cut; so ~2x by construction)
  knocked_forward   one forward inside vtrlab.knocked_out(keys="image", queries="last", layers=first quarter):
                    the cost of a cut forward, target <= 1.05x
  knocked_forward_question  the same with queries="question" (~20 rows recomputed per cut layer)
  knocked_forward_splice    knocked_forward with every cut layer forced to the row splice (plain sdpa + the cut
                    rows recomputed and spliced in; the one path before session 9)
  knocked_forward_full      knocked_forward with every cut layer forced to one sdpa under the full cut mask
                    (``CutMask``); the two forced cases measure where ``attention._FULL_MASK_MAX_ELEMENTS``
                    should sit
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch

from vtrlab.io import atomic_write_text

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_capture", _HERE / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)
measure, _image, markdown, PROMPT = _capture.measure, _capture._image, _capture.markdown, _capture.PROMPT
measure_interleaved, host_info = _capture.measure_interleaved, _capture.host_info
SHAPES, TINY, CPU = _capture.SHAPES, _capture.TINY, _capture.CPU


def bench_shape(name: str, vlm, image_size, warmup: int, repeats: int, only=None, min_seconds: float = 0.0) -> dict:
    import vtrlab as vl

    device = vlm.device
    batch = vlm.prepare([_image(image_size)], [PROMPT])
    inputs = dict(batch.inputs)
    L = batch.layouts[0]
    n = len(vlm.lm_layers)
    row = {
        "shape": name,
        "n_tokens": int(inputs["input_ids"].shape[1]),
        "n_image_tokens": int(L.n_image_tokens),
        "n_layers": n,
        "dtype": str(vlm.dtype).removeprefix("torch."),
        "host": host_info(),
        "results": {},
    }
    print(f"[{name}] {row['n_tokens']} tokens ({row['n_image_tokens']} image), {n} layers", flush=True)
    vlm.model.requires_grad_(True)

    def sdpa():
        with torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    window = list(range(max(1, n // 4)))

    def knocked(layers, queries, full_mask_max=None):
        """One forward with image -> ``queries`` cut at ``layers`` (what vl.knockout runs after its plain one);
        ``full_mask_max``: the CutMask threshold for this call (None: the library's)."""
        from vtrlab.probes import attention as att

        saved = att._FULL_MASK_MAX_ELEMENTS
        if full_mask_max is not None:
            att._FULL_MASK_MAX_ELEMENTS = full_mask_max
        try:
            with vl.knocked_out(vlm, batch, keys="image", queries=queries, layers=layers), torch.no_grad():
                return vlm.model(**inputs, use_cache=False).logits
        finally:
            att._FULL_MASK_MAX_ELEMENTS = saved

    methods = {
        "sdpa": sdpa,
        "saliency_last": lambda: vl.saliency(vlm, batch, queries="last"),
        "logit_lens_image": lambda: vl.logit_lens(vlm, batch, queries="image", targets={"t": 0}, top_k=5),
        "rollout_last": lambda: vl.rollout(vlm, batch, queries="last"),
        "knockout_window": lambda: vl.knockout(
            vlm, batch, keys="image", queries="last", layers=list(range(max(1, n // 4)))
        ),
        "knocked_forward": lambda: knocked(window, "last"),
        "knocked_forward_question": lambda: knocked(window, "question"),
        "knocked_forward_splice": lambda: knocked(window, "last", full_mask_max=0),
        "knocked_forward_full": lambda: knocked(window, "last", full_mask_max=2**62),
    }
    if only:
        methods = {k: fn for k, fn in methods.items() if k == "sdpa" or k in only}
    # interleaved rounds: each ratio is the median of per-round ratios to sdpa (see capture.measure_interleaved)
    row["results"] = measure_interleaved(methods, device, warmup, repeats, min_seconds=min_seconds)
    row["rounds"] = len(row["results"]["sdpa"]["times_s"])
    for method, res in row["results"].items():
        if "median_s" in res:
            print(f"  {method:24s} {res['median_s']:.4f} s  x{res['time_vs_sdpa']:.3f}", flush=True)
    row["host_after"] = host_info()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (e.g. $OUT/flow.json)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run on tiny random models")
    ap.add_argument("--cpu", action="store_true", help="CPU, realistic lengths (organism, llava-1.5-mid)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--cold-allocator", action="store_true", help="empty the CUDA cache before every timed call")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(SHAPES)} (or the tiny ones)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (sdpa always runs)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (every method once per round)")
    ap.add_argument("--warmup", type=int, default=2)
    _capture.add_min_seconds(ap)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error(f"--repeats must be >= 1 and --warmup >= 0 (got {args.repeats}, {args.warmup})")
    from vtrlab import testing

    only = args.methods.split(",") if args.methods else None

    _capture.COLD_ALLOCATOR = args.cold_allocator
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_run = args.smoke or args.cpu
    min_seconds = _capture.min_seconds_of(ap, args, cpu_run)
    table = CPU if args.cpu else (TINY if args.smoke else SHAPES)
    names = list(table) if args.shapes is None else args.shapes.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {list(table)}")
    if not cpu_run and not torch.cuda.is_available():
        ap.error("full-size shapes need a CUDA GPU; use --smoke on CPU")
    import transformers

    report = {
        "device": torch.cuda.get_device_name()
        if not cpu_run
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "min_seconds": min_seconds,
        "warmup": args.warmup,
        "allocator": "cold" if args.cold_allocator else "warm",
        "timing": "interleaved",
        "host": host_info(),
        "shapes": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        builder, size = table[name]
        torch.manual_seed(0)
        if args.cpu:
            vlm = _capture.cpu_model(builder)
        elif args.smoke:
            vlm = testing.tiny(builder)
        else:
            vlm = testing.full_size(builder, dtype="bfloat16", device="cuda")
        report["shapes"].append(bench_shape(name, vlm, size, args.warmup, args.repeats, only, min_seconds))
        atomic_write_text(out, json.dumps(report, indent=2))  # partial results survive a time-out
        del vlm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    atomic_write_text(out, json.dumps(report, indent=2))
    print()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
