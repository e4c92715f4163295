"""Builders of test models, one module per family under ``vtrlab/testing/families/``, registered in
``vtrlab.models.registry.Registry`` tables (the one registry mechanism of the house).

``register_tiny(family)``: ``fn(seed) -> (model, processor)``, tiny random weights, offline.
``register_full_size(name)``: ``fn(dtype, device) -> (model, processor)``, real shapes, random weights.
``register_proof(family)``: ``fn(vlm, batch) -> (module, expected)`` for the layout proof
(``vtrlab.testing.prove_layout``): ``module``'s output holds the per-image features before the
model packs them; ``expected[i]`` is, for each of ``batch.layouts[i].image_positions``, the row of
that output (flattened to ``(-1, hidden)``) that the layout claims lands there.
"""

from __future__ import annotations

from vtrlab.models.registry import Registry

FAMILIES_PACKAGE = "vtrlab.testing.families"
TINY = Registry("tiny builder", FAMILIES_PACKAGE)
FULL_SIZE = Registry("full-size builder", FAMILIES_PACKAGE)
PROOF = Registry("layout-proof spec", FAMILIES_PACKAGE)

register_tiny = TINY.register
register_full_size = FULL_SIZE.register
register_proof = PROOF.register
