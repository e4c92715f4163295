"""Session-4 CPU profiles behind the capture / knockout changes (numbers in benchmarks/README.md).

    python benchmarks/profile_s4.py vision     # host time of the vision [CLS] table at LLaVA-NeXT's layout
    python benchmarks/profile_s4.py knockout   # torch ops, host syncs and sdpa calls of a knocked-out forward

``vision``: ``_vision_table`` on the layouts of ``llava-next-mid`` (672x672: 5 crops x 577 vision tokens per
sample, 24 layers x 16 heads of random probabilities), batch 1 and 8; wall time, the time inside torch
operators (torch.profiler; on a GPU these are device kernels) and the host time outside them.
``knockout``: ``llava-1.5-mid`` (617 tokens), image -> last / question cut in the first quarter of the LM
layers, with the row splice and with the full mask (the code before session 4); operator counts from a
``TorchDispatchMode`` (exact, independent of the host's load), and the largest logit difference.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_capture", _HERE / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)


def vision() -> None:
    from torch.profiler import ProfilerActivity, profile

    from vtrlab.probes import engine

    vlm = _capture.mid_next()
    for B in (1, 8):
        batch = vlm.prepare([_capture._image((672, 672), seed=i) for i in range(B)], [_capture.PROMPT] * B)
        layouts = list(batch.layouts)
        crops = sum(len(np.unique(L.vision["crop"].to_numpy())) for L in layouts)
        probs = {i: torch.rand(crops, 16, 577) for i in range(24)}
        best = None
        for _ in range(5):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                engine._vision_table(layouts, probs, list(range(24)))
                wall = time.perf_counter() - t
            ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
            inside = sum(e.self_cpu_time_total for e in ops) / 1e6
            if best is None or wall < best[0]:
                best = (wall, inside, sum(e.count for e in ops))
        wall, inside, n = best
        print(
            f"batch {B} ({crops} crops): wall {1000 * wall:.1f} ms, inside torch operators {1000 * inside:.1f} ms "
            f"({n} calls), host outside them {1000 * (wall - inside):.1f} ms (min of 5)"
        )


def knockout() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    import vtrlab as vl
    from vtrlab.probes import attention as att

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.c = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.c[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    vlm = _capture.mid_llava()
    batch = vlm.prepare([_capture._image((336, 336))], [_capture.PROMPT])
    inputs = dict(batch.inputs)
    window = list(range(max(1, len(vlm.lm_layers) // 4)))

    def run(queries=None, share=None):
        old = att._SPLICE_MAX_SHARE
        if share is not None:
            att._SPLICE_MAX_SHARE = share
        try:
            with Count() as m, torch.no_grad():
                if queries is None:
                    return vlm.model(**inputs, use_cache=False).logits, m.c
                with vl.knocked_out(vlm, batch, keys="image", queries=queries, layers=window):
                    return vlm.model(**inputs, use_cache=False).logits, m.c
        finally:
            att._SPLICE_MAX_SHARE = old

    print(f"{inputs['input_ids'].shape[1]} tokens, cut layers {window}")
    base, c0 = run()
    n0 = sum(c0.values())
    for q in ("last", "question"):
        got = {}
        for label, share in (("splice", None), ("full mask", 0.0)):
            got[label], c = run(q, share)
            syncs = c.get("aten._local_scalar_dense", 0) + c.get("aten.is_nonzero", 0)
            print(f"  {q:8s} {label:9s}: +{sum(c.values()) - n0} ops over a plain forward ({n0}), {syncs} host syncs")
        print(f"  {q:8s} max |splice - full mask| of the logits: {(got['splice'] - got['full mask']).abs().max():.2e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    what = sys.argv[1] if len(sys.argv) > 1 else "vision"
    if what not in ("vision", "knockout"):
        sys.exit(f"unknown profile {what!r}; choose vision or knockout")
    vision() if what == "vision" else knockout()
