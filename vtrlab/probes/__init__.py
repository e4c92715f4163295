"""Probes: one attention function (stock sdpa + probe sites) and the session every probe joins.

The public verb is :func:`vtrlab.capture` (defined in :mod:`vtrlab.probes.engine`); this package
holds the machinery it and the other probes (knockout, saliency, ...) share.
"""

from __future__ import annotations

from .attention import ATTN_NAME, register
from .engine import capture, capture_batches, key_coordinates
from .store import load, save
from .switch import attention_switched

__all__ = ["ATTN_NAME", "attention_switched", "capture", "capture_batches", "key_coordinates", "load", "register", "save"]
