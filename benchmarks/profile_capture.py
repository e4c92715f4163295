"""cProfile of vtrlab.capture's host side on a tiny model (CPU): where the fixed per-call time goes.

    python benchmarks/profile_capture.py            # batch 8, tiny llava, 20 calls per method
"""
import cProfile, pstats, time, torch, numpy as np
from PIL import Image
import vtrlab.probes as cap
from vtrlab import testing
torch.set_num_threads(1)
vlm = testing.tiny("llava")
img = Image.fromarray(np.random.default_rng(0).integers(0,255,(40,40,3),dtype=np.uint8))
B = 8
batch = vlm.prepare([img]*B, ["What color is the car?"]*B)
inp = dict(batch.inputs)
def fwd():
    with torch.no_grad(): vlm.model(**inp, use_cache=False)
for f in (fwd, lambda: cap.capture(vlm,batch,queries="question",vision=False)): f()
for name, f in [("sdpa", fwd), ("last", lambda: cap.capture(vlm,batch,queries="last",vision=False)),
                ("question", lambda: cap.capture(vlm,batch,queries="question",vision=False)),
                ("last_vision", lambda: cap.capture(vlm,batch,queries="last",vision=True))]:
    ts=[]
    for _ in range(20):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    print(name, "median ms", 1000*np.median(ts), "min", 1000*min(ts))
pr = cProfile.Profile(); pr.enable()
for _ in range(20): cap.capture(vlm,batch,queries="last",vision=True)
pr.disable()
pstats.Stats(pr).sort_stats("cumulative").print_stats(r"vtrlab|xarray/core/dataset|pandas/core/frame", 40)
