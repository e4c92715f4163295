"""Attention probabilities from selected query rows under sdpa, as labelled arrays.

``vtrlab.capture(vlm, batch, rows="last", layers="all", vision=True)`` -> ``xarray.Dataset``.
The module itself is callable (``vtrlab.capture(...)``), so the public name works whether or not
``vtrlab.capture`` was imported as a package first.
"""

from __future__ import annotations

import sys
import types

from .attention import ATTN_NAME, register
from .engine import capture, capture_batches, key_coordinates
from .store import load, save
from .switch import attention_switched

__all__ = ["ATTN_NAME", "attention_switched", "capture", "capture_batches", "key_coordinates", "load", "register", "save"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
