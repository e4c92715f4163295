"""vtrlab.organism: the embedded model organism (tiny LLaVA trained on vtrlab.data.synthetic).

Build/save: ``build_random``, ``save_organism``, ``save_random`` (vtrlab.organism.build);
training (LLaVA's recipe in miniature, resumable): ``train_organism`` (vtrlab.organism.train);
evaluation: vtrlab.organism.evaluate; realism table: vtrlab.organism.realism; model card:
vtrlab.organism.card (from card_template.md + records). CLI: ``vtrlab organism
train|eval|card|random`` (vtrlab.organism.cli). Imported lazily: the CLI imports this package and
should stay cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "build_random": "vtrlab.organism.build",
    "save_organism": "vtrlab.organism.build",
    "save_random": "vtrlab.organism.build",
    "train_organism": "vtrlab.organism.train",
    "evaluate_bundle": "vtrlab.organism.evaluate",
}
__all__ = ["build_random", "evaluate_bundle", "save_organism", "save_random", "train_organism"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vtrlab.organism' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
