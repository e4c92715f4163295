"""vtrlab.organism: the embedded model organism (tiny LLaVA trained on vtrlab.data.synthetic).

Build/save: ``build_random``, ``save_organism``, ``save_random``; training in
``vtrlab.organism.train`` (``train_organism``); evaluation in ``vtrlab.organism.evaluate``.
"""

from vtrlab.organism.build import build_random, save_organism, save_random

__all__ = ["build_random", "save_organism", "save_random"]
