"""Where a reduction method's scoring spends its time, on the CPU, at the 7B models' vision widths.

    python benchmarks/reduce_profile.py --shape llava-1.5 --methods visionzip,fastervlm --threads 1

Builds a LLaVA-1.5 / LLaVA-NeXT model whose vision tower has CLIP-L's width (1024, 16 heads) and LLaVA's
crop layout (336 px, 576 patches a crop; NeXT at 672x672: 5 crops) but few layers and a small LM, so a
CPU run takes seconds. Per pre-LM method it runs the selection once (the tower's signals recorded), then
times **the scoring alone**: ``method.select`` on a context pre-loaded with the tower's raw outputs
(:meth:`vtrlab.reduce.context.ReductionContext.tower_signals`: decoder inputs, recorded attention, hooked
tensors), as benchmarks/reduce.py does on the GPU, and counts per call:

* ``torch ops`` (a ``TorchDispatchMode``: independent of the host's load),
* ``host syncs`` — calls that on a GPU wait for the device: ``.item()``, ``.tolist()``, ``.cpu()``,
  ``bool()/int()/float()`` of a tensor, and data-dependent shapes (``nonzero``, ``unique``,
  ``masked_select``) — counted on the CPU as they would run (an upper bound: a ``.cpu()`` of a tensor
  that already lives on the host costs nothing),
* the top functions of a cProfile of one call.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
SYNC_OPS = ("nonzero", "unique", "masked_select", "_local_scalar_dense")


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_calls():
    """Count calls of Tensor methods that move data to the host (see module doc)."""
    counts = collections.Counter()
    names = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(n, fn):
        def call(self, *a, **k):
            counts[n] += 1
            return fn(self, *a, **k)

        return call

    for n, fn in saved.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def wide_model(shape: str, vision_layers: int = 4):
    """LLaVA-1.5 (``llava-1.5``) or LLaVA-NeXT (``llava-next``) layout with CLIP-L's width (see module doc)."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    from vtrlab.models.registry import adapter_for
    from vtrlab.models.vlm import VLM
    from vtrlab.testing.families.llava import clip_llama_config, llava_processor
    from vtrlab.testing.families.llava_next import next_processor

    vision = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=vision_layers,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=256)  # fmt: skip
    text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4)  # fmt: skip
    if shape == "llava-1.5":
        processor = llava_processor(336, 14)
        config = clip_llama_config(LlavaConfig, processor.tokenizer, vision=vision, text=text)
        cls, fam = LlavaForConditionalGeneration, "llava"
    else:
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        processor = next_processor(336, 14, pinpoints)
        config = clip_llama_config(
            LlavaNextConfig, processor.tokenizer, vision=vision, text=text, image_grid_pinpoints=pinpoints
        )
        cls, fam = LlavaNextForConditionalGeneration, "llava_next"
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(config).eval()
    return VLM(model=model, processor=processor, adapter=adapter_for(fam), name=f"{shape}-wide")


def profile_method(vlm, batch, name: str, keep: float, repeats: int, top: int) -> dict:
    from vtrlab import reduce as R
    from vtrlab.analysis.reduction_sweep import depth_scaled_params
    from vtrlab.reduce.apply import select_in_context
    from vtrlab.reduce.context import ReductionContext, budgets

    method = R.get(name, **depth_scaled_params(vlm, name, collapse=False))
    if method.stage == "lm":
        return {"method": name, "skipped": "in-LM method (its scoring runs inside the prefill)"}
    _, ctx = select_in_context(vlm, batch, method, keep)
    signals = ctx.tower_signals()
    n_keep = budgets(batch, keep)

    def call():
        return method.select(ReductionContext(vlm, batch, signals=signals), n_keep)

    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    with count_host_calls() as host, _Count() as ops:
        call()
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    return {
        "method": name,
        "scoring_s": statistics.median(times),
        "torch_ops": sum(ops.ops.values()),
        "host_syncs": sum(host.values()) + sum(ops.ops[o] for o in SYNC_OPS if o != "_local_scalar_dense"),
        "host_calls": dict(host),
        "data_dependent_ops": {o: ops.ops[o] for o in SYNC_OPS if ops.ops[o]},
        "top_own_time": [f"{fn[2]} ({Path(fn[0]).name}:{fn[1]}) {v[2] * 1000:.1f} ms x{v[1]}" for fn, v in rows],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llava-1.5", choices=("llava-1.5", "llava-next"))
    ap.add_argument("--methods", default=None, help="comma-separated (default: every pre-LM method)")
    ap.add_argument("--keep", type=float, default=128 / 576)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from reduce import PROMPT, _image, method_order

    from vtrlab import reduce as R

    vlm = wide_model(args.shape)
    batch = vlm.prepare([_image((336, 336) if args.shape == "llava-1.5" else (672, 672))], [PROMPT])
    names = args.methods.split(",") if args.methods else [n for n in method_order(R.names()) if n != "keep_all"]
    print(f"{args.shape}: {batch.layouts[0].n_image_tokens} image tokens, {args.threads} thread(s)")
    for name in names:
        try:
            r = profile_method(vlm, batch, name, args.keep, args.repeats, args.top)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"{name:14s} {type(err).__name__}: {str(err)[:150]}")
            continue
        if "skipped" in r:
            print(f"{name:14s} {r['skipped']}")
            continue
        print(
            f"{name:14s} scoring {1000 * r['scoring_s']:7.1f} ms  ops {r['torch_ops']:5d}  host syncs "
            f"{r['host_syncs']:4d} {r['host_calls']} {r['data_dependent_ops']}"
        )
        for line in r["top_own_time"]:
            print(f"{'':16s}{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
