"""Probes: one attention function (stock sdpa + probe sites) and the session every probe joins.

The public verb is :func:`vtrlab.capture` (defined in :mod:`vtrlab.probes.engine`); this package
holds the machinery it and the other probes (knockout, saliency, ...) share: sites on attention
modules join one session (:class:`~vtrlab.probes.attention.session`), so probes nest and compose,
and a site bound to a batch maps or refuses any other sequence.
"""

from __future__ import annotations

from .attention import ATTN_NAME, Binding, Knockout, Site, register, sequence_map, session
from .engine import capture
from .store import load, save
from .stream import capture_batches, capture_dataset
from .switch import attention_switched

__all__ = [
    "ATTN_NAME",
    "Binding",
    "Knockout",
    "Site",
    "attention_switched",
    "capture",
    "capture_batches",
    "capture_dataset",
    "load",
    "register",
    "save",
    "sequence_map",
    "session",
]
