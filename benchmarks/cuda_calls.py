"""Host cost of the CUDA calls a capture makes around its forward, one by one (GPU).

    python benchmarks/cuda_calls.py --out $OUT/cuda_calls.json

On a host-bound forward every microsecond of host work is wall time, and on a sandboxed host (gVisor, as the
H200 lent here) calls that enter the driver can cost far more than a kernel launch. This script times each
kind of call capture makes (median of ``--calls`` calls, after warm-up, each block of calls synchronised
before and after and divided by the number of calls), beside a small kernel launch for scale:

  launch         ``x.add_(1)`` on a small CUDA tensor (one kernel launch)
  event          ``torch.cuda.Event()`` + ``record()`` (the event is created at its first record) + its release
  event_reused   ``record()`` of one event made once
  wait_stream    ``side.wait_stream(current)`` (records a new event on ``current``, the side stream waits on it)
  wait_event     ``side.wait_event(e)`` with one event made once, recorded on ``current`` first
  stream_ctx     ``with torch.cuda.stream(side): pass``
  copy_d2h       a 4 KiB device-to-pinned-host copy, non-blocking, on the side stream (+ ``record_stream``)
  pinned_empty   ``torch.empty(4 KiB, pin_memory=True)`` (PyTorch's host caching allocator) and its release
  pin_memory     ``tensor.pin_memory()`` of 8 bytes (capture's row indices)
  h2d            a non-blocking 8-byte host-to-device copy from pinned memory
  stack32        ``torch.stack`` of 32 small CUDA tensors
  event_sync     ``Event.synchronize()`` on an event already complete
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("_bench_capture", Path(__file__).resolve().parent / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)


def cases(device) -> dict:
    x = torch.zeros(1024, device=device)
    side = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    reused = torch.cuda.Event()
    host = torch.empty(1024, pin_memory=True)
    idx = torch.zeros(1, dtype=torch.int64)
    idx_pinned = idx.pin_memory()
    parts = [torch.zeros(4, 32, device=device) for _ in range(32)]
    done = torch.cuda.Event()
    done.record(current)

    def event():
        e = torch.cuda.Event()
        e.record(current)
        del e

    def wait_event():
        reused.record(current)
        side.wait_event(reused)

    def stream_ctx():
        with torch.cuda.stream(side):
            pass

    def copy_d2h():
        side.wait_event(reused)
        with torch.cuda.stream(side):
            host.copy_(x, non_blocking=True)
        x.record_stream(side)

    return {
        "launch": lambda: x.add_(1),
        "event": event,
        "event_reused": lambda: reused.record(current),
        "wait_stream": lambda: side.wait_stream(current),
        "wait_event": wait_event,
        "stream_ctx": stream_ctx,
        "copy_d2h": copy_d2h,
        "pinned_empty": lambda: torch.empty(1024, pin_memory=True),
        "pin_memory": lambda: idx.pin_memory(),
        "h2d": lambda: idx_pinned.to(device, non_blocking=True),
        "stack32": lambda: torch.stack(parts),
        "event_sync": lambda: done.synchronize(),
    }


def measure(fns: dict, calls: int, blocks: int, device) -> dict:
    out = {}
    for name, fn in fns.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize(device)
        per_call = []
        for _ in range(blocks):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - t0) / calls)
        torch.cuda.synchronize(device)
        out[name] = {"median_us": 1e6 * statistics.median(per_call), "min_us": 1e6 * min(per_call)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed block")
    ap.add_argument("--blocks", type=int, default=15, help="timed blocks per kind of call")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    results = measure(cases(device), args.calls, args.blocks, device)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    print(f"Device: {report['device']}; torch {report['torch']}; host µs per call (median / min of {args.blocks})")
    print("\n| call | µs (median) | µs (min) |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['median_us']:.1f} | {r['min_us']:.1f} |")
    _capture.write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
