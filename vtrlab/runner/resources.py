"""Peak memory of a notebook's kernel, recorded in its run's ``run.json`` under ``resources``.

The runner starts every kernel with :func:`track` (an IPython ``exec_lines`` entry, before any cell): at the
kernel's exit — also after a failing cell, since papermill shuts the kernel down gracefully — it writes
``resources.json`` into the run directory: the process's peak resident memory and, when the notebook used
CUDA, the peak GPU memory torch allocated (``max_memory_allocated``: tensors, not the allocator's cache)
and reserved per device. CUDA is never initialised here. ``run_job`` moves the file into ``run.json``.
A kernel that is killed (SIGKILL, out of host memory) writes nothing and the record says ``null``.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

FILE = "resources.json"
_GIB = float(1 << 30)
_RUN_DIR = "VTRLAB_RUN_DIR"  # = vtrlab.runner.paths.ENV_RUN_DIR (not imported: this module stays stdlib-only)


def peak() -> dict:
    """``{"cpu_peak_rss_gib", "gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "gpu": {device: {...}}}``
    of this process so far (GPU entries None when CUDA was not used)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out: dict = {
        "cpu_peak_rss_gib": round(rss / (_GIB if sys.platform == "darwin" else _GIB / 1024), 3),
        "gpu_peak_allocated_gib": None,
        "gpu_peak_reserved_gib": None,
        "gpu": {},
    }
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return out
        for i in range(torch.cuda.device_count()):
            out["gpu"][str(i)] = {
                "allocated_gib": round(torch.cuda.max_memory_allocated(i) / _GIB, 3),
                "reserved_gib": round(torch.cuda.max_memory_reserved(i) / _GIB, 3),
            }
    except Exception:  # a broken CUDA state at exit: record what there is
        return out
    if out["gpu"]:
        out["gpu_peak_allocated_gib"] = max(d["allocated_gib"] for d in out["gpu"].values())
        out["gpu_peak_reserved_gib"] = max(d["reserved_gib"] for d in out["gpu"].values())
    return out


def write(run_dir: str | None = None) -> None:
    """Write :func:`peak` into ``run_dir`` (default: the running notebook's run directory), atomically."""
    run_dir = run_dir or os.environ.get(_RUN_DIR)
    if not run_dir or not os.path.isdir(run_dir):
        return
    path = os.path.join(run_dir, FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(peak(), fh)
    os.replace(tmp, path)


def track() -> None:
    """Write the peaks when this process exits (the runner calls this at kernel start)."""
    atexit.register(write)


# what the runner's kernel runs before the first cell (leaves no name in the notebook's namespace)
EXEC_LINE = "__import__('vtrlab.runner.resources').runner.resources.track()"
