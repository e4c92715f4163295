"""vtrlab: which image tokens matter, at which layer, and why — before you prune, merge or compress them.

Public surface (kept small and stable)::

    import vtrlab as vl
    vlm   = vl.load("organism")                    # or a local path / hub id
    batch = vlm.prepare(images=[img], prompts=["What color is the circle?"])
    cap   = vl.capture(vlm, batch, rows="last", layers="all", vision=True)   # xarray.Dataset
    answers = vl.answer(vlm, batch, keep=None)     # greedy answers, optional keep masks
    answers = vl.answer(vlm, batch, method="fastv", keep=0.25)   # with a reduction method
    record  = vl.reduce.apply(vlm, batch, "random", keep=0.25)   # which tokens survive where

Attributes are imported lazily so that ``import vtrlab`` stays cheap (the CLI, the runner and
notebook kernels import it often).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": ("vtrlab.models", "load"),
    "VLM": ("vtrlab.models", "VLM"),
    "Batch": ("vtrlab.models", "Batch"),
    "ImageLayout": ("vtrlab.models", "ImageLayout"),
    "capture": ("vtrlab.probes", "capture"),
    "answer": ("vtrlab.reduce", "answer"),
    "knockout": ("vtrlab.flow", "knockout"),
    "saliency": ("vtrlab.flow", "saliency"),
    "recon": ("vtrlab.recon", None),
    "reduce": ("vtrlab.reduce", None),
    "plots": ("vtrlab.plots", None),
    "metrics": ("vtrlab.metrics", None),
    "data": ("vtrlab.data", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vtrlab' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
