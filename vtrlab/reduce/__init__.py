"""Visual token reduction: decide which image tokens the LM sees, then answer.

Layout of this package (one module per concern):

* :mod:`vtrlab.reduce.registry` — the method registry (``get``, ``names``, ``register``), the
  :class:`Method` base and the :class:`Selection` a pre-LM method returns.
* :mod:`vtrlab.reduce.methods` — one file per method (its source and defaults in its docstring).
* :mod:`vtrlab.reduce.context` — :class:`ReductionContext`, the per-batch cached signals methods score with.
* :mod:`vtrlab.reduce.apply` — ``apply(vlm, batch, method, keep=)``: what survives where (xarray.Dataset).
* :mod:`vtrlab.reduce.stages.lm` — tokens really removed from the sequence inside the LM from layer K on.
* :mod:`vtrlab.reduce.keep` — keep masks and the decoder inputs with dropped tokens removed (merged
  embeddings substituted): the single exit point for tokens dropped before the LM.
* :mod:`vtrlab.reduce.answer` — greedy answers and logits over the reduced inputs, with or without a method.
"""

from .answer import ReducedLogits, answer, generate_ids, logits
from .apply import apply
from .context import ReductionContext
from .keep import ReducedInputs, batch_fingerprint, decoder_inputs, reduced_decoder_inputs, validate_keep
from .registry import Method, NotApplicable, Selection, get, names, register

__all__ = [
    "Method",
    "NotApplicable",
    "ReducedInputs",
    "ReducedLogits",
    "ReductionContext",
    "Selection",
    "answer",
    "apply",
    "batch_fingerprint",
    "decoder_inputs",
    "generate_ids",
    "get",
    "logits",
    "names",
    "reduced_decoder_inputs",
    "register",
    "validate_keep",
]
