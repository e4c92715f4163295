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

Methods, each timed in the same process on the same inputs, in ``--repeats`` interleaved rounds after
``--warmup`` calls of each (:func:`measure_interleaved`: every case once per round, in a shuffled order;
the ratio to sdpa is the median of the per-round ratios, reported with its IQR and a bootstrap 95%
interval, so drift of the host's load cancels; the host's load average and CPU count are in the JSON).
TransformerLens runs last, on its own (its ratio is one of medians):

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
import importlib.util
import json
import math
import os
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


def random_llava(vision: dict, text: dict, name: str, seed: int = 0):
    """A random-weight LLaVA-1.5 (CLIP + Llama, 336 px / 14 px patches: 576 image tokens) of the given tower
    shapes (``vision`` / ``text``: config fields over ``clip_llama_config``'s defaults), on sdpa."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vtrlab.models.registry import adapter_for
    from vtrlab.models.vlm import VLM
    from vtrlab.testing.families.llava import clip_llama_config, llava_processor

    processor = llava_processor(336, 14)
    vision = dict(image_size=336, patch_size=14, **vision)
    config = clip_llama_config(LlavaConfig, processor.tokenizer, vision=vision, text=text)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return VLM(model=model, processor=processor, adapter=adapter_for("llava"), name=name)


def mid_llava(seed: int = 0):
    """LLaVA-1.5 layout at 576 image tokens with a small LM (hidden 1024, 8 layers): a CPU-sized model whose
    forward is long enough that capture's host-side cost shows as it does at full size on a GPU."""
    return random_llava(
        vision=dict(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, projection_dim=256
        ),
        text=dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
        ),
        name="llava-1.5-mid",
        seed=seed,
    )


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


def host_info() -> dict:
    """The host's load when a benchmark ran: load average (1, 5, 15 min) and CPU counts."""
    info = {"cpu_count": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    return info


def measure(fn, device, warmup: int, repeats: int, cold: bool | None = None) -> dict:
    """Time ``fn`` alone: median of ``repeats`` calls after ``warmup`` (see :func:`measure_interleaved`
    for ratios to a baseline, which should be used wherever there is one)."""
    cold = COLD_ALLOCATOR if cold is None else cold
    for _ in range(warmup):
        fn()
    _sync(device)
    times, peaks, inner = [], [], []
    for _ in range(repeats):
        t, peak, out, _ = _timed_call(fn, device, cold)
        times.append(t)
        if peak is not None:
            peaks.append(peak)
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


def _timed_call(fn, device, cold: bool = False, collect: bool = True, issued: list | None = None):
    """(seconds, peak extra bytes or None, fn's return value, start stamp) of one synchronised call — the one
    timed-call primitive of the benchmarks (capture, flow, reduce). ``collect``: a ``gc.collect()`` first (reduce
    collects once per cell instead, with the collector off in its loop); ``cold``: empty the CUDA cache first;
    ``issued``: append the host's time until ``fn`` returned, before the device is synchronised (on a host-bound
    forward nearly the whole call; the rest is the GPU's tail)."""
    if collect:
        gc.collect()
    base = None
    if device.type == "cuda":
        if cold:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    if issued is not None:
        issued.append(time.perf_counter() - t0)
    _sync(device)
    t = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) - base if base is not None else None
    return t, peak, out, t0


def ratio_stats(ratios, seed: int = 0, n_boot: int = 2000) -> dict:
    """Median of per-round ratios, its interquartile range and a bootstrap 95% interval of the median."""
    r = np.asarray(ratios, dtype=float)
    q25, med, q75 = np.percentile(r, [25, 50, 75])
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, len(r), size=(n_boot, len(r)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"ratio_median": float(med), "ratio_iqr": [float(q25), float(q75)], "ratio_ci95": [float(lo), float(hi)]}


# Interleaved rounds go on until at least this many seconds of rounds (estimated from the warm-up), up to
# MAX_ROUNDS: a short forward (LLaVA-1.5-7B at batch 1, ~30 ms, host-bound) swings by 30-100 % from call to call
# on a shared host (session 7: the same plain forward took 31 to 65 ms within one run), so 15 rounds leave its
# per-round ratios' median uncertain by several percent; ~100 rounds of it cost ~20 s.
MIN_ROUND_SECONDS = 20.0
MAX_ROUNDS = 200


def add_one_shape_args(ap) -> None:
    """Options of the one-shape scripts: ``--out``, ``--shape``, ``--tiny``, ``--batch`` (:func:`one_shape`)."""
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--shape", default=None, help=f"one of {list(SHAPES)} (default llava-1.5-7b)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random LLaVA")
    ap.add_argument("--batch", type=int, default=1)


def one_shape(ap, args):
    """``(name, vlm, batch)`` for the one-shape scripts' ``--shape`` / ``--tiny`` / ``--batch`` (``ablate_capture.py``,
    ``timeline_capture.py``): a full-size random model in bf16 on the GPU, or a tiny one on CPU."""
    from vtrlab import testing

    table = TINY if args.tiny else SHAPES
    name = args.shape or next(iter(table))
    if name not in table:
        ap.error(f"--shape {name!r}: choose from {list(table)}")
    if not args.tiny and not torch.cuda.is_available():
        ap.error("full-size shapes need a CUDA GPU; use --tiny on CPU")
    builder, size = table[name]
    torch.manual_seed(0)
    vlm = testing.tiny(builder) if args.tiny else testing.full_size(builder, dtype="bfloat16", device="cuda")
    batch = vlm.prepare([_image(size, seed=i) for i in range(args.batch)], [PROMPT] * args.batch)
    return name, vlm, batch


def write_report(path, report: dict) -> None:
    """``report`` as JSON at ``path`` (atomically; nothing without a path)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), json.dumps(report, indent=2))


def rounds_for(
    round_s: float, rounds: int, min_seconds: float = MIN_ROUND_SECONDS, max_rounds: int = MAX_ROUNDS
) -> int:
    """At least ``rounds``; more while ``rounds * round_s`` is under ``min_seconds``, at most ``max_rounds``."""
    if round_s <= 0 or min_seconds <= 0:
        return rounds
    return max(rounds, min(max_rounds, math.ceil(min_seconds / round_s)))


def add_min_seconds(ap) -> None:
    """The ``--min-seconds`` option of the scripts that time interleaved rounds (capture.py, flow.py)."""
    ap.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help=f"more rounds than --repeats until this many seconds of rounds (default {MIN_ROUND_SECONDS:g} on the "
        "GPU, 0 on CPU)",
    )


def min_seconds_of(ap, args, cpu_run: bool) -> float:
    """``--min-seconds``, or its default (:data:`MIN_ROUND_SECONDS` on the GPU, 0 on CPU); a negative one is refused."""
    value = args.min_seconds if args.min_seconds is not None else (0.0 if cpu_run else MIN_ROUND_SECONDS)
    if value < 0:
        ap.error(f"--min-seconds must be >= 0 (got {args.min_seconds})")
    return value


def measure_interleaved(
    cases: dict,
    device,
    warmup: int,
    rounds: int,
    baseline: str = "sdpa",
    cold: bool | None = None,
    seed: int = 0,
    min_seconds: float = 0.0,
) -> dict[str, dict]:
    """Time every case of ``cases`` (name -> fn) in interleaved rounds; ratios to ``baseline`` per round.

    Each round calls every case once, in an order shuffled per round (seeded), so that drift of the
    host's load (other processes, clocks) hits the baseline and the probes alike; each case's ratio in a
    round is its time over the baseline's time in the same round, and the reported ratio is the median
    of those per-round ratios (with its IQR and a bootstrap 95% interval), beside the plain medians.
    ``warmup`` calls of each case come first; then ``rounds`` rounds, or more (:func:`rounds_for`) until
    ``min_seconds`` of rounds (the GPU scripts pass :data:`MIN_ROUND_SECONDS`), as estimated from each case's last
    warm-up call (each case is then warmed up at least once). A case that raises ``torch.OutOfMemoryError`` (in
    warm-up or a round) gets ``{"error": ...}`` and leaves the rounds; the baseline must not fail.
    Per case: ``median_s``, ``times_s``, ``issue_s`` / ``issue_median_s`` (the host's part: see :func:`_timed_call`),
    ``peak_extra_bytes`` (as :func:`measure`), and for every case
    but the baseline ``ratios``, ``ratio_median``, ``ratio_iqr``, ``ratio_ci95`` and ``time_vs_sdpa``
    (= ``ratio_median``).
    """
    if baseline not in cases:
        raise ValueError(f"baseline {baseline!r} is not among the cases {list(cases)}")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0 (got {rounds}, {warmup})")
    cold = COLD_ALLOCATOR if cold is None else cold
    errors: dict[str, str] = {}

    def oom(name, err):
        if name == baseline:
            raise err
        errors[name] = f"out of memory: {str(err).splitlines()[0]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()

    n_warm = max(warmup, 1) if min_seconds > 0 else warmup  # one call at least, to estimate a round
    calls_s = 0.0  # each case's last warm-up call, summed
    for name, fn in cases.items():
        try:
            for _ in range(n_warm):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
            calls_s += time.perf_counter() - t0 if n_warm else 0.0
        except torch.OutOfMemoryError as err:
            oom(name, err)
    _sync(device)
    # Every timed call has a gc.collect() before it (a collection inside a timed call would charge it to that
    # case). What exists now (the model, its inputs) is frozen out of those collections: with a 7B model loaded a
    # full collection takes ~0.1 s, which made session 7's rounds overrun their time-boxes.
    gc.collect()
    gc.freeze()
    try:
        t0 = time.perf_counter()
        gc.collect()
        round_s = calls_s + (len(cases) - len(errors)) * (time.perf_counter() - t0)
        rounds = rounds_for(round_s, rounds, min_seconds)
        times = {k: [] for k in cases}
        issued = {k: [] for k in cases}
        peaks = {k: [] for k in cases}
        rng = np.random.default_rng(seed)
        names = list(cases)
        for _ in range(rounds):
            for i in rng.permutation(len(names)):
                name = names[i]
                if name in errors:
                    continue
                try:
                    t, peak, out, _ = _timed_call(cases[name], device, cold, issued=issued[name])
                except torch.OutOfMemoryError as err:
                    oom(name, err)
                    continue
                del out
                times[name].append(t)
                if peak is not None:
                    peaks[name].append(peak)
    finally:
        gc.unfreeze()
    results = {}
    base = times[baseline]
    for name in names:
        if name in errors:
            results[name] = {"error": errors[name]}
            continue
        res = {
            "median_s": statistics.median(times[name]),
            "times_s": times[name],
            "issue_median_s": statistics.median(issued[name]),
            "issue_s": issued[name],
            "peak_extra_bytes": int(statistics.median(peaks[name])) if peaks[name] else None,
        }
        if name != baseline:
            ratios = [t / b for t, b in zip(times[name], base)]
            res["ratios"] = ratios
            res.update(ratio_stats(ratios, seed=seed))
            res["time_vs_sdpa"] = res["ratio_median"]
        results[name] = res
    results[baseline]["time_vs_sdpa"] = 1.0
    return results


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
    name: str,
    vlm,
    image_size,
    warmup: int,
    repeats: int,
    with_tl: bool,
    batch_size: int = 1,
    tl_error: str = "",
    min_seconds: float = 0.0,
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
        "host": host_info(),
        "results": {},
    }
    print(
        f"[{name} x{batch_size}] {row['n_tokens']} tokens ({row['n_image_tokens']} image), {row['n_layers']} layers",
        flush=True,
    )

    def sdpa():
        with torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    def eager():
        vlm.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = vlm.model(**inputs, use_cache=False, output_attentions=True)
            return out.logits, out.attentions
        finally:
            vlm.model.set_attn_implementation("sdpa")

    methods = {
        "sdpa": sdpa,
        "capture_last": lambda: cap.capture(vlm, batch, queries="last", vision=False),
        "capture_question": lambda: cap.capture(vlm, batch, queries="question", vision=False),
        "capture_last_vision": lambda: cap.capture(vlm, batch, queries="last", vision=True),
        "eager": eager,
    }
    skip = _eager_skip(vlm, row)
    if skip:
        del methods["eager"]
    # interleaved rounds: every ratio is a median of per-round ratios (host-load drift cancels)
    row["results"] = measure_interleaved(methods, device, warmup, repeats, min_seconds=min_seconds)
    row["rounds"] = len(row["results"]["sdpa"]["times_s"])
    if skip:
        row["results"]["eager"] = {"error": skip}
    for method, res in row["results"].items():
        if "median_s" in res:
            spread = (
                f"  x{res['ratio_median']:.3f} IQR {res['ratio_iqr'][0]:.3f}-{res['ratio_iqr'][1]:.3f}"
                if ("ratio_median" in res)
                else ""
            )
            print(f"  {method:22s} {res['median_s']:.4f} s{spread}", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    row["host_after"] = host_info()
    if not with_tl:
        row["results"]["transformer_lens"] = {"error": tl_error or "transformer_lens not installed"}
    _ratios(row)
    return row


def _eager_skip(vlm, row: dict) -> str:
    """Why eager ``output_attentions`` is not attempted (its N x N maps cannot fit), or ''."""
    if vlm.device.type != "cuda":
        return ""
    n, b = row["n_tokens"], row["batch"]
    heads = _num_heads_lm(vlm)
    need = b * row["n_layers"] * heads * n * n * torch.finfo(vlm.dtype).bits // 8
    free = torch.cuda.mem_get_info(vlm.device)[0]
    if need > 0.9 * free:
        return f"skipped: its attention maps alone need {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return ""


def _num_heads_lm(vlm) -> int:
    from vtrlab.probes.engine import _num_heads

    return _num_heads(vlm.adapter.lm_attention(vlm.lm_layers[0]))


def _ratios(row: dict) -> None:
    """``time_vs_sdpa`` of cases measured on their own (TransformerLens): a ratio of medians."""
    base = row["results"]["sdpa"]["median_s"]
    for res in row["results"].values():
        if "median_s" in res and "time_vs_sdpa" not in res:
            res["time_vs_sdpa"] = res["median_s"] / base
            res["ratio_of_medians"] = True


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


def _load_text(host) -> str:
    if not host:
        return ""
    load = host.get("load_average")
    cpus = host.get("cpus_usable", host.get("cpu_count"))
    return f" Host: {cpus} CPUs, load average {', '.join(f'{x:.1f}' for x in load) if load else 'n/a'}."


def markdown(report: dict) -> str:
    if report.get("timing") == "interleaved":
        rounds = sorted({r["rounds"] for r in report["shapes"] if "rounds" in r})
        counts = (
            f"{rounds[0]}–{rounds[-1]}" if len(rounds) > 1 else (str(rounds[0]) if rounds else str(report["repeats"]))
        )
        more = (
            f" (at least {report['repeats']}, more until {report['min_seconds']:g} s of rounds)"
            if report.get("min_seconds")
            else ""
        )
        how = (
            f"{counts} interleaved rounds{more} after {report['warmup']} warm-up (every case once per round, "
            "order shuffled); × sdpa = median of the per-round ratios, with their interquartile range; "
            "† = ratio of medians (measured after the others, not interleaved)"
        )
        hosts = [r.get("host") for r in report["shapes"] if r.get("host")]
        host = _load_text(hosts[0] if hosts else report.get("host"))
    else:
        how, host = f"median of {report['repeats']} after {report['warmup']} warm-up", ""
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}; "
        f"{how}; CUDA allocator {report.get('allocator', 'cold')} between calls.{host}",
        "",
        "| shape | batch | tokens | method | median time (s) | × sdpa | ratio IQR | peak extra memory (GiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in report["shapes"]:
        for method, res in row["results"].items():
            if "error" in res:
                lines.append(
                    f"| {row['shape']} | {row.get('batch', 1)} | {row['n_tokens']} | {method} | — | — | — | "
                    f"{res['error'].split('. ')[0][:90]} |"
                )
                continue
            mem = "n/a (CPU)" if res["peak_extra_bytes"] is None else f"{res['peak_extra_bytes'] / 2**30:.3f}"
            iqr = f"{res['ratio_iqr'][0]:.2f}–{res['ratio_iqr'][1]:.2f}" if "ratio_iqr" in res else "—"
            mark = "†" if res.get("ratio_of_medians") and report.get("timing") == "interleaved" else ""
            lines.append(
                f"| {row['shape']} | {row.get('batch', 1)} | {row['n_tokens']} | {method} | {res['median_s']:.4f} | "
                f"{res['time_vs_sdpa']:.2f}{mark} | {iqr} | {mem} |"
            )
    return "\n".join(lines)


def _profile(vlm, name: str, size, path: Path) -> None:
    """profile_gpu.py's summary for this shape, on the model already built (errors are written, not raised)."""
    spec = importlib.util.spec_from_file_location(
        "_bench_profile_gpu", Path(__file__).resolve().parent / "profile_gpu.py"
    )
    pg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pg)
    batch_size, which, calls, warmup = pg.PLAN.get(name, (1, ("capture_last", "capture_question"), 3, 2))
    print(f"[{name} x{batch_size}] profile: {', '.join(which)}", flush=True)
    try:
        entry = pg.profile_shape(vlm, name, size, batch_size, which, calls=calls, warmup=warmup)
    except Exception as err:  # noqa: BLE001 - the timings above are kept
        entry = {"shape": name, "batch": batch_size, "error": f"{type(err).__name__}: {str(err)[:300]}", "cases": {}}
    pg.append(path, entry, pg.meta(vlm.device))
    print(f"  profile written to {path} ({entry.get('seconds', '?')} s)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (e.g. $OUT/capture.json)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny random models")
    ap.add_argument("--cpu", action="store_true", help="CPU, realistic lengths (organism, llava-1.5-mid)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--cold-allocator", action="store_true", help="empty the CUDA cache before every timed call")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(SHAPES)} (or the tiny ones)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (every case once per round)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens even if installed")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    add_min_seconds(ap)
    ap.add_argument(
        "--profile",
        default=None,
        metavar="JSON",
        help="also profile the shape with torch.profiler (profile_gpu.py's plan) and add its summary to JSON",
    )
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
    min_seconds = min_seconds_of(ap, args, cpu_run)
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
            vlm = cpu_model(builder)
        elif args.tiny:
            vlm = testing.tiny(builder)
        else:
            vlm = testing.full_size(builder, dtype="bfloat16", device="cuda")
        rows = []
        for bs in batch_sizes:
            rows.append(
                bench_shape(name, vlm, size, args.warmup, args.repeats, with_tl, bs, tl_error, min_seconds=min_seconds)
            )
            report["shapes"].append(rows[-1])
            atomic_write_text(out, json.dumps(report, indent=2))  # partial results survive a time-out
        if args.profile:  # before TransformerLens, which takes over the model's attention modules
            _profile(vlm, name, size, Path(args.profile))
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
