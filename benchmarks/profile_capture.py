"""cProfile of vtrlab.capture's host side on a tiny model (CPU): where the fixed per-call time goes.

    python benchmarks/profile_capture.py                 # batch 8, tiny llava, 20 calls per method
    python benchmarks/profile_capture.py --batch 1 --calls 50

Prints the median time of a plain forward and of each capture variant, then the cumulative
profile of ``capture(queries="last", vision=True)`` restricted to vtrlab, xarray and pandas frames.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np
import torch
from PIL import Image


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llava")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import vtrlab.probes as cap
    from vtrlab import testing

    torch.set_num_threads(a.threads)
    vlm = testing.tiny(a.family)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    batch = vlm.prepare([img] * a.batch, ["What color is the car?"] * a.batch)
    inputs = dict(batch.inputs)

    def forward():
        with torch.no_grad():
            vlm.model(**inputs, use_cache=False)

    cases = {
        "sdpa": forward,
        "capture_last": lambda: cap.capture(vlm, batch, queries="last", vision=False),
        "capture_question": lambda: cap.capture(vlm, batch, queries="question", vision=False),
        "capture_last_vision": lambda: cap.capture(vlm, batch, queries="last", vision=True),
    }
    for fn in cases.values():
        fn()  # warm-up
    for name, fn in cases.items():
        times = []
        for _ in range(a.calls):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        print(f"{name:22s} median {1000 * np.median(times):7.1f} ms   min {1000 * min(times):7.1f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        cap.capture(vlm, batch, queries="last", vision=True)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(r"vtrlab|xarray/core/dataset|pandas/core/frame", 40)


if __name__ == "__main__":
    main()
