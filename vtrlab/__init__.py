"""vtrlab: which image tokens matter, at which layer, and why — before you prune, merge or compress them.

Public surface (kept small and stable)::

    import vtrlab as vl
    vlm   = vl.load("organism")                    # or a local path / hub id
    batch = vlm.prepare(images=[img], prompts=["What color is the circle?"])
    # one family of verbs: verb(vlm, batch, *, queries=, keys=, layers=, ...) -> xarray.Dataset
    cap   = vl.capture(vlm, batch, queries="last", layers="all", vision=True)  # attention rows
    sal   = vl.saliency(vlm, batch, queries="last")                           # A * dL/dA per layer
    ko    = vl.knockout(vlm, batch, keys="image", queries="last", layers=range(0, 4))  # log-probs, cut vs not
    with vl.knocked_out(vlm, batch, keys="image", queries="last", layers=[2]):
        cap2 = vl.capture(vlm, batch)              # probes compose: capture sees the knockout
    answers = vl.answer(vlm, batch, keep=None)     # greedy answers, optional keep masks
    answers = vl.answer(vlm, batch, method="fastv", keep=0.25)   # with a reduction method
    record  = vl.reduce.apply(vlm, batch, "random", keep=0.25)   # which tokens survive where

Attributes are imported lazily so that ``import vtrlab`` stays cheap (the CLI, the runner and
notebook kernels import it often).
"""

from __future__ import annotations

import importlib

from vtrlab._version import __version__ as __version__

_LAZY = {
    "load": ("vtrlab.models", "load"),
    "VLM": ("vtrlab.models", "VLM"),
    "Batch": ("vtrlab.models", "Batch"),
    "ImageLayout": ("vtrlab.models", "ImageLayout"),
    "capture": ("vtrlab.probes", "capture"),
    "capture_dataset": ("vtrlab.probes", "capture_dataset"),
    "answer": ("vtrlab.reduce", "answer"),
    "knockout": ("vtrlab.flow", "knockout"),
    "knocked_out": ("vtrlab.flow", "knocked_out"),
    "saliency": ("vtrlab.flow", "saliency"),
    "logit_lens": ("vtrlab.flow", "logit_lens"),
    "rollout": ("vtrlab.flow", "rollout"),
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
