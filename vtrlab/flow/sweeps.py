"""Knockout sweeps: cut one kind of edge in a window of k consecutive LM layers, slide the window.

Zhang et al. 2024 ("Cross-modal Information Flow in Multimodal LLMs"): block the attention edges of
an edge type (e.g. image -> last) in layers ``[s, s + k)`` for every start ``s`` and read the change
of the answer's probability, ``(p_cut - p_clean) / p_clean``. Each cut runs through
:func:`vtrlab.knocked_out` (the same mechanism as :func:`vtrlab.knockout`), so sweeps compose with
the other probes and never touch the model's code.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from .knockout import knocked_out
from .target import log_probs_at_last, validate_target

#: Zhang et al.'s edge types: name -> (keys, queries) as accepted by :func:`vtrlab.knocked_out`.
EDGES = {
    "image→last": ("image", "last"),
    "image→question": ("image", "question"),
    "question→last": ("question", "last"),
}


def windows(n_layers: int, window: int, stride: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` layer windows of ``window`` consecutive layers (the whole LM if it has fewer)."""
    for name, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r}: need a positive integer")
    k = min(int(window), n_layers)
    return [(s, s + k) for s in range(0, n_layers - k + 1, int(stride))]


def knockout_sweep(vlm, batch, *, edges=None, window: int = 9, stride: int = 1, target=None) -> xr.Dataset:
    """The answer's probability with each edge type cut in each window of ``window`` consecutive LM layers.

    Args:
        edges: ``{name: (keys, queries)}`` (keys/queries as for :func:`vtrlab.knocked_out`: names or
            explicit positions per sample); default :data:`EDGES`.
        window: layers per window (Zhang et al.: 9 of 32); the whole LM when it has fewer layers.
        stride: step between window starts.
        target: one token id per sample (default: the plain model's greedy answer).

    Returns an ``xarray.Dataset`` over (edge, window, sample): ``prob`` (p(target) with the cut),
    ``relative_change`` = (prob - prob_clean) / prob_clean, ``correct`` (the cut model's greedy token is
    the target), and over ``sample``: ``target``, ``prob_clean``, ``correct_clean`` (the target is the
    plain model's greedy token, always true for the default target); coordinates ``window_start``,
    ``window_stop`` (layers ``[start, stop)``).
    """
    edges = dict(EDGES if edges is None else edges)
    if not edges:
        raise ValueError("edges={} names no edge; pass {name: (keys, queries)} or None for the default edges")
    for name, spec in edges.items():
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise ValueError(f"edges[{name!r}]={spec!r}: need a (keys, queries) pair")
    wins = windows(len(vlm.lm_layers), window, stride)
    layouts = list(batch.layouts)
    inputs = dict(batch.inputs)
    B = len(layouts)
    with torch.no_grad():
        clean = log_probs_at_last(vlm, layouts, vlm.model(**inputs, use_cache=False).logits)
    tgt = clean.argmax(-1) if target is None else validate_target(target, B, clean.shape[-1], clean.device)
    rows = torch.arange(B, device=clean.device)
    p_clean = clean[rows, tgt].exp().double().cpu().numpy()
    prob = np.full((len(edges), len(wins), B), np.nan)
    correct = np.zeros((len(edges), len(wins), B), dtype=bool)
    for e, (keys, queries) in enumerate(edges.values()):
        for w, (start, stop) in enumerate(wins):
            cut_layers = list(range(start, stop))
            with knocked_out(vlm, batch, keys=keys, queries=queries, layers=cut_layers), torch.no_grad():
                cut = log_probs_at_last(vlm, layouts, vlm.model(**inputs, use_cache=False).logits)
            prob[e, w] = cut[rows, tgt].exp().double().cpu().numpy()
            correct[e, w] = (cut.argmax(-1) == tgt).cpu().numpy()
    ds = xr.Dataset(
        {
            "prob": (("edge", "window", "sample"), prob),
            "relative_change": (("edge", "window", "sample"), (prob - p_clean) / p_clean),
            "correct": (("edge", "window", "sample"), correct),
            "prob_clean": (("sample",), p_clean),
            "correct_clean": (("sample",), (clean.argmax(-1) == tgt).cpu().numpy()),
            "target": (("sample",), tgt.cpu().numpy()),
        },
        coords={
            "edge": list(edges),
            "window": np.arange(len(wins)),
            "sample": np.arange(B),
            "window_start": ("window", np.asarray([s for s, _ in wins])),
            "window_stop": ("window", np.asarray([s for _, s in wins])),
        },
    )
    ds.attrs.update(
        {
            "model": str(vlm.name),
            "family": str(vlm.family),
            "window": int(wins[0][1] - wins[0][0]),
            "measure": "relative change of p(target) at the last position (Zhang et al. 2024)",
        }
    )
    return ds
