"""How fast a host runs the kinds of Python that capture's per-call and per-layer work is made of (no GPU needed).

    python benchmarks/host_python.py --out /tmp/host.json                  # this host, as it is
    python benchmarks/host_python.py --malloc both --out $OUT/host.json    # also under PYTHONMALLOC=malloc

Why: on the H200 host the hold's Python (``LayerGroup.add``) ran ~13 µs a layer against ~1.5 µs on the 2-core
development host (``timeline_capture.py --effects``, session 8), while a CUDA launch cost only ~3x a bare-metal
host's (``cuda_calls.py``). This script times small workloads of one kind each, so that two hosts can be compared
kind by kind: if the slow host is slow at *allocating* Python objects rather than at running bytecode, the cost
is the host's (its allocator's system calls under the sandbox), not the code's. With ``--malloc both`` every
workload is also timed in a child process under ``PYTHONMALLOC=malloc`` (CPython's small-object allocator
replaced by the C library's, which keeps freed memory instead of returning arenas to the system).

Workloads (each: the fastest of ``--repeats`` runs of ``--number`` calls, in µs a call):

  arith         an integer loop of 100 additions (bytecode speed; allocates nothing)
  alloc         100 small tuples made and dropped
  objects       20 slotted dataclass instances made and dropped
  torch_attr    10 reads of a tensor's shape / dtype / device
  torch_op      one tiny CPU torch operator (dispatch)
  hold          one capture hold (``attention._hold`` -> ``LayerGroup.add``) of CPU tensors, as per layer
  switch        entering and leaving the attention switch of a tiny model's 2 LM layers
  knock_setup   entering and leaving ``vtrlab.knocked_out`` on a tiny model (positions, masks, sites, switch)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import timeit
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_capture", _HERE / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)

WORKLOADS = ("arith", "alloc", "objects", "torch_attr", "torch_op", "hold", "switch", "knock_setup")


@dataclass(slots=True)
class _Obj:
    a: object
    b: object
    c: object


def _workloads() -> dict:
    import torch

    from vtrlab.probes.attention import Site, _hold
    from vtrlab.probes.grouped import LayerGroup, SiteLists

    def arith():
        x = 0
        for i in range(100):
            x += i
        return x

    def alloc():
        for i in range(100):
            (i, i, i)  # noqa: B018 - the tuple is the workload

    def objects():
        for i in range(20):
            _Obj(i, i, i)

    t = torch.zeros(1, 16, 8, 4)

    def torch_attr():
        for _ in range(10):
            t.shape, t.dtype, t.device  # noqa: B018

    small = torch.zeros(4)

    def torch_op():
        torch.add(small, small)

    group = LayerGroup(SiteLists(), 0, "cpu", max_bytes=1 << 60, max_out_bytes=1 << 60)
    site = Site("vision", 0, vision_mode="cls", cls_index=0)
    site.group = group
    q, k = torch.zeros(1, 16, 577, 64), torch.zeros(1, 16, 577, 64)
    holds = [0]

    def hold():
        _hold(site, q, k, None, 0.125, False)
        holds[0] += 1
        if holds[0] % 256 == 0:  # what a forward's flush would do: the held list starts again
            group.pending.clear()
            group._held = group._out = 0
            site.segments = ()

    import vtrlab as vl
    from vtrlab import testing
    from vtrlab.probes.engine import attention_modules
    from vtrlab.probes.switch import attention_switched

    vlm = testing.load_tiny("llava", device="cpu")
    from PIL import Image

    batch = vlm.prepare([Image.new("RGB", (40, 40), (120, 30, 200))], ["What color is the car?"])
    attn = attention_modules(vlm, vision=False)

    def switch():
        with attention_switched(vlm.model, attn):
            pass

    def knock_setup():
        with vl.knocked_out(vlm, batch, keys="image", queries="last", layers=[0]):
            pass

    return {name: fn for name, fn in locals().items() if name in WORKLOADS}


def measure(number: int, repeats: int) -> dict:
    fns = _workloads()
    out = {}
    for name in WORKLOADS:
        fn = fns[name]
        for _ in range(min(number, 200)):  # warm
            fn()
        best = min(timeit.repeat(fn, number=number, repeat=repeats)) / number
        out[name] = best * 1e6
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--number", type=int, default=2000, help="calls per timed run")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per workload (the fastest is kept)")
    ap.add_argument("--malloc", choices=["as-is", "both"], default="as-is")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.number < 1 or args.repeats < 1:
        ap.error(f"--number and --repeats must be >= 1 (got {args.number}, {args.repeats})")
    import torch

    torch.set_num_threads(1)
    result = measure(args.number, args.repeats)
    if args.child:
        print(json.dumps(result))
        return 0
    report = {
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "pythonmalloc": os.environ.get("PYTHONMALLOC", "(default)"),
        "us_per_call": result,
    }
    if args.malloc == "both":
        env = {**os.environ, "PYTHONMALLOC": "malloc"}
        cmd = [sys.executable, __file__, "--child", "--number", str(args.number), "--repeats", str(args.repeats)]
        child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        report["us_per_call_pythonmalloc_malloc"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{'workload':12s} {'µs a call':>10s}" + ("   PYTHONMALLOC=malloc" if args.malloc == "both" else ""))
    for name in WORKLOADS:
        line = f"{name:12s} {result[name]:10.2f}"
        if args.malloc == "both":
            line += f"   {report['us_per_call_pythonmalloc_malloc'][name]:10.2f}"
        print(line)
    _capture.write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
