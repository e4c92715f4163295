"""Builders of test models, one module per family under ``vtrlab/models/testing/``.

``register_tiny(family)``: ``fn(seed) -> (model, processor)``, tiny random weights, offline.
``register_full_size(name)``: ``fn(dtype, device) -> (model, processor)``, real shapes, random weights.
``register_proof(family)``: ``fn(vlm, batch) -> (module, expected)`` for the layout proof
(see tests/test_layout_proof.py): ``module``'s output holds the per-image features before the
model packs them; ``expected[i]`` is, for each of ``batch.layouts[i].image_positions``, the row of
that output (flattened to ``(-1, hidden)``) that the layout claims lands there.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

TINY: dict[str, Callable] = {}
FULL_SIZE: dict[str, Callable] = {}
PROOF: dict[str, Callable] = {}
_discovered = False


def _registrar(table: dict[str, Callable], key: str):
    def deco(fn: Callable) -> Callable:
        table[key] = fn
        return fn

    return deco


def register_tiny(family: str):
    return _registrar(TINY, family)


def register_full_size(name: str):
    return _registrar(FULL_SIZE, name)


def register_proof(family: str):
    return _registrar(PROOF, family)


def discover() -> None:
    global _discovered
    if _discovered:
        return
    from .. import testing

    for info in pkgutil.iter_modules(testing.__path__):
        if not info.name.startswith("_") and info.name not in ("registry", "tokenizer", "pixels", "proof"):
            importlib.import_module(f"{testing.__name__}.{info.name}")
    _discovered = True
