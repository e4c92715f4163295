"""Cost of capturing attention rows: vtrlab capture vs a plain sdpa forward, eager
``output_attentions`` and TransformerLens ``run_with_cache``.

GPU (bf16, random weights, full-size shapes, batch 1 and 8; run through the device tool)::

    python benchmarks/capture.py --out $OUT/capture.json
    python benchmarks/capture.py --out $OUT/capture.json --batch 1,8 --shapes llava-1.5-7b

CPU smoke run (tiny models, seconds)::

    python benchmarks/capture.py --tiny --out /tmp/capture-tiny.json

CPU at realistic sequence lengths (the organism, and a random LLaVA-1.5 with 576 image tokens and an
8-layer LM of width 1024; minutes)::

    python benchmarks/capture.py --cpu --threads 1 --batch 1 --no-tl --out /tmp/capture-cpu.json

Methods, each timed in the same process on the same inputs, median of ``--repeats`` runs after
``--warmup`` runs:

  sdpa            plain forward (use_cache=False), the reference cost
  capture_last    vtrlab.capture(queries="last", layers="all", vision=False)
  capture_question  vtrlab.capture(queries="question", layers="all", vision=False)
  capture_last_vision  vtrlab.capture(queries="last", layers="all", vision=True)
  eager           attn_implementation="eager", output_attentions=True (all N×N maps)
  transformer_lens  TransformerBridge.run_with_cache(names_filter=hook_pattern) (if installed)

"Peak extra memory" is ``max_memory_allocated`` during the call minus the memory allocated
before it (model weights and inputs excluded); CPU runs report no memory.
Writes JSON to ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vtrlab.io import atomic_write_text

SHAPES = {
    # name -> (full-size builder name, image size (w, h)) ; LLaVA-NeXT at 672x672: 576 + 2304 + 48 tokens
    "llava-1.5-7b": ("llava-1.5-7b", (336, 336)),
    "llava-next-7b": ("llava-next-7b", (672, 672)),
}
TINY = {"llava-1.5-tiny": ("llava", (40, 40)), "llava-next-tiny": ("llava_next", (64, 48))}
# CPU shapes of realistic sequence length (host-side cost vs a forward that is not negligible):
# "organism" is the embedded model; "llava-1.5-mid" a random LLaVA-1.5 with 576 image tokens (336 px,
# 14 px patches, 6-layer CLIP of width 256) and an 8-layer Llama of width 1024 (float32).
# "llava-next-mid": LLaVA-NeXT's anyres layout at 672x672 (5 crops of 577 vision tokens, 2,880 image tokens,
# 24 CLIP layers of 16 heads as at 7B, width 256) with a 4-layer Llama of width 512 (float32).
CPU = {
    "organism": ("organism", (128, 128)),
    "llava-1.5-mid": ("llava-1.5-mid", (336, 336)),
    "llava-next-mid": ("llava-next-mid", (672, 672)),
}
# The test tokenizers are byte-level (one token per byte): a short prompt gives a question of
# about the length a real tokenizer makes of a typical VQA question (~15-20 tokens).
PROMPT = "What color is the car?"


def mid_llava(seed: int = 0):
    """LLaVA-1.5 layout at 576 image tokens with a small LM (hidden 1024, 8 layers): a CPU-sized model whose
    forward is long enough that capture's host-side cost shows as it does at full size on a GPU."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vtrlab.models.registry import adapter_for
    from vtrlab.models.vlm import VLM
    from vtrlab.testing.families.llava import clip_llama_config, llava_processor

    processor = llava_processor(336, 14)
    config = clip_llama_config(
        LlavaConfig,
        processor.tokenizer,
        vision=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
            projection_dim=256,
        ),
        text=dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
        ),
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return VLM(model=model, processor=processor, adapter=adapter_for("llava"), name="llava-1.5-mid")


def mid_next(seed: int = 0):
    """LLaVA-NeXT's anyres layout at full token counts (5 crops x 577 vision tokens at 672x672, 24 vision
    layers of 16 heads) with narrow widths and a 4-layer LM: vision-side capture cost at NeXT's shape on CPU."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from vtrlab.models.registry import adapter_for
    from vtrlab.models.vlm import VLM
    from vtrlab.testing.families.llava import clip_llama_config
    from vtrlab.testing.families.llava_next import next_processor

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    processor = next_processor(336, 14, pinpoints)
    config = clip_llama_config(
        LlavaNextConfig,
        processor.tokenizer,
        vision=dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=256,
        ),
        text=dict(
            hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8
        ),
        image_grid_pinpoints=pinpoints,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return VLM(model=model, processor=processor, adapter=adapter_for("llava_next"), name="llava-next-mid")


def cpu_model(name: str):
    """A CPU benchmark model by its name in :data:`CPU`."""
    if name == "organism":
        import vtrlab as vl

        return vl.load("organism")
    return mid_next() if name == "llava-next-mid" else mid_llava()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The CUDA caching allocator stays warm between repeats, as in a loop over a data set. With a cold one
# (empty_cache before every call, what this script did up to session 3) every timed call also paid
# cudaMalloc for each of its buffers, which charges most to what allocates most (saliency's backward).
# Peak memory needs no emptying: max_memory_allocated counts allocated bytes, not reserved ones.
COLD_ALLOCATOR = False


def measure(fn, device, warmup: int, repeats: int, cold: bool | None = None) -> dict:
    cold = COLD_ALLOCATOR if cold is None else cold
    for _ in range(warmup):
        fn()
    _sync(device)
    times, peaks, inner = [], [], []
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            if cold:
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        if isinstance(out, dict):  # timings measured inside fn (e.g. a reduction method's scoring)
            inner.append(out)
        del out
    res = {
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_extra_bytes": int(statistics.median(peaks)) if peaks else None,
    }
    if inner:
        res["inner"] = {k: statistics.median(e[k] for e in inner) for k in inner[0]}
    return res


def _image(size, seed=0):
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _bridge(vlm):
    """TransformerLens bridge over the same HF model (booted last: it switches the model to eager)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers import helpers

    # Without a full processor in the directory, the boot would try to pip-install torchvision
    # into this interpreter (replacing torch); the bridge needs no processor here.
    helpers._ensure_torchvision = lambda: False
    tmp = Path(tempfile.mkdtemp(prefix="vtrlab-tl-"))
    # the bridge picks its adapter from config.architectures, which save_pretrained would set
    vlm.model.config.architectures = [type(vlm.model).__name__]
    vlm.model.config.save_pretrained(tmp)
    vlm.processor.tokenizer.save_pretrained(tmp)
    from transformers import AutoTokenizer

    return TransformerBridge.boot_transformers(
        str(tmp), hf_model=vlm.model, tokenizer=AutoTokenizer.from_pretrained(tmp), device=str(vlm.device)
    )


def bench_shape(
    name: str, vlm, image_size, warmup: int, repeats: int, with_tl: bool, batch_size: int = 1, tl_error: str = ""
) -> dict:
    import vtrlab.probes as cap

    device = vlm.device
    batch = vlm.prepare([_image(image_size, seed=i) for i in range(batch_size)], [PROMPT] * batch_size)
    inputs = dict(batch.inputs)
    L = batch.layouts[0]
    row = {
        "shape": name,
        "batch": batch_size,
        "n_tokens": int(inputs["input_ids"].shape[1]),
        "n_image_tokens": int(L.n_image_tokens),
        "n_question_rows": int(len(L.question_positions)),
        "n_layers": len(vlm.lm_layers),
        "dtype": str(vlm.dtype).removeprefix("torch."),
        "results": {},
    }
    print(
        f"[{name} x{batch_size}] {row['n_tokens']} tokens ({row['n_image_tokens']} image), {row['n_layers']} layers",
        flush=True,
    )

    def sdpa():
        with torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    methods = {
        "sdpa": sdpa,
        "capture_last": lambda: cap.capture(vlm, batch, queries="last", vision=False),
        "capture_question": lambda: cap.capture(vlm, batch, queries="question", vision=False),
        "capture_last_vision": lambda: cap.capture(vlm, batch, queries="last", vision=True),
    }
    for method, fn in methods.items():
        row["results"][method] = measure(fn, device, warmup, repeats)
        print(f"  {method:22s} {row['results'][method]['median_s']:.4f} s", flush=True)

    def eager():
        vlm.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = vlm.model(**inputs, use_cache=False, output_attentions=True)
            return out.logits, out.attentions
        finally:
            vlm.model.set_attn_implementation("sdpa")

    try:
        row["results"]["eager"] = measure(eager, device, warmup, repeats)
        print(f"  {'eager':22s} {row['results']['eager']['median_s']:.4f} s", flush=True)
    except torch.OutOfMemoryError as err:  # the point of the comparison on long inputs
        row["results"]["eager"] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        torch.cuda.empty_cache()

    if not with_tl:
        row["results"]["transformer_lens"] = {"error": tl_error or "transformer_lens not installed"}
    _ratios(row)
    return row


def _ratios(row: dict) -> None:
    base = row["results"]["sdpa"]["median_s"]
    for res in row["results"].values():
        if "median_s" in res:
            res["time_vs_sdpa"] = res["median_s"] / base


def bench_tl(row: dict, vlm, image_size, warmup: int, repeats: int) -> None:
    """Add TransformerLens to a measured ``row``; run after every other case of this model (the
    bridge replaces the model's attention modules, so nothing else can run on it afterwards)."""
    device = vlm.device
    bs = row["batch"]
    inputs = dict(vlm.prepare([_image(image_size, seed=i) for i in range(bs)], [PROMPT] * bs).inputs)
    prev = vlm.model.config._attn_implementation
    try:
        if not hasattr(vlm, "_bench_bridge"):
            vlm._bench_bridge = _bridge(vlm)  # booted once per model, reused at every batch size
        bridge = vlm._bench_bridge
        vlm.model.set_attn_implementation("eager")  # what the bridge runs (its hooks need eager)
        tl_kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}

        def tl():
            with torch.no_grad():
                return bridge.run_with_cache(
                    inputs["input_ids"],
                    names_filter=lambda n: n.endswith("hook_pattern") and n.startswith("blocks."),
                    **tl_kwargs,
                )

        row["results"]["transformer_lens"] = measure(tl, device, warmup, repeats)
        print(f"  {'transformer_lens':22s} {row['results']['transformer_lens']['median_s']:.4f} s", flush=True)
    except Exception as err:  # noqa: BLE001 - report why TL could not run, keep the other numbers
        msg = str(err).splitlines()[0][:200] if str(err) else ""
        row["results"]["transformer_lens"] = {"error": f"{type(err).__name__}: {msg}"}
        print(f"  transformer_lens failed: {row['results']['transformer_lens']['error']}", flush=True)
    finally:
        vlm.model.set_attn_implementation(prev if prev != "eager" else "sdpa")  # the next case runs sdpa

    _ratios(row)


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}; "
        f"median of {report['repeats']} after {report['warmup']} warm-up; "
        f"CUDA allocator {report.get('allocator', 'cold')} between calls.",
        "",
        "| shape | batch | tokens | method | median time (s) | × sdpa | peak extra memory (GiB) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in report["shapes"]:
        for method, res in row["results"].items():
            if "error" in res:
                lines.append(
                    f"| {row['shape']} | {row.get('batch', 1)} | {row['n_tokens']} | {method} | — | — | "
                    f"{res['error'].split('. ')[0][:90]} |"
                )
                continue
            mem = "n/a (CPU)" if res["peak_extra_bytes"] is None else f"{res['peak_extra_bytes'] / 2**30:.3f}"
            lines.append(
                f"| {row['shape']} | {row.get('batch', 1)} | {row['n_tokens']} | {method} | {res['median_s']:.4f} | "
                f"{res['time_vs_sdpa']:.2f} | {mem} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (e.g. $OUT/capture.json)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny random models")
    ap.add_argument("--cpu", action="store_true", help="CPU, realistic lengths (organism, llava-1.5-mid)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--cold-allocator", action="store_true", help="empty the CUDA cache before every timed call")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(SHAPES)} (or the tiny ones)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens even if installed")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error(f"--repeats must be >= 1 and --warmup >= 0 (got {args.repeats}, {args.warmup})")
    try:
        batch_sizes = [int(b) for b in args.batch.split(",")]
    except ValueError:
        ap.error(f"--batch={args.batch!r}: need comma-separated positive integers, e.g. 1,8")
    if not batch_sizes or min(batch_sizes) < 1:
        ap.error(f"--batch={args.batch!r}: need comma-separated positive integers, e.g. 1,8")

    from vtrlab import testing

    global COLD_ALLOCATOR
    COLD_ALLOCATOR = args.cold_allocator
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_run = args.tiny or args.cpu
    table = CPU if args.cpu else (TINY if args.tiny else SHAPES)
    names = list(table) if args.shapes is None else args.shapes.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; choose from {list(table)}")
    if not cpu_run and not torch.cuda.is_available():
        ap.error("full-size shapes need a CUDA GPU; use --tiny on CPU")
    tl_error = "transformer_lens skipped (--no-tl)"
    try:
        import transformer_lens.model_bridge  # noqa: F401

        with_tl = not args.no_tl
    except ImportError as err:  # say what is missing (a dependency of the carried wheel, or the wheel itself)
        with_tl = False
        tl_error = f"transformer_lens not importable: {type(err).__name__}: {err}"[:200]
        print(tl_error, flush=True)

    import transformers

    report = {
        "device": torch.cuda.get_device_name()
        if not cpu_run
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "allocator": "cold" if args.cold_allocator else "warm",
        "shapes": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        builder, size = table[name]
        torch.manual_seed(0)
        if args.cpu:
            vlm = cpu_model(builder)
        elif args.tiny:
            vlm = testing.tiny(builder)
        else:
            vlm = testing.full_size(builder, dtype="bfloat16", device="cuda")
        rows = []
        for bs in batch_sizes:
            rows.append(bench_shape(name, vlm, size, args.warmup, args.repeats, with_tl, bs, tl_error))
            report["shapes"].append(rows[-1])
            atomic_write_text(out, json.dumps(report, indent=2))  # partial results survive a time-out
        for row in rows if with_tl else []:  # last: the bridge takes over the model's modules
            bench_tl(row, vlm, size, args.warmup, args.repeats)
            atomic_write_text(out, json.dumps(report, indent=2))
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
