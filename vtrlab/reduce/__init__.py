"""Visual token reduction: decide which image tokens the LM sees, then answer.

Layout of this package (one module per concern):

* :mod:`vtrlab.reduce.keep` — keep masks (per sample, bool over the sample's image tokens in
  layout order) and the decoder inputs with dropped tokens removed, positions kept right for
  every family. The single exit point for tokens dropped before the LM.
* :mod:`vtrlab.reduce.answer` — greedy answers and logits over the reduced inputs.

Reduction methods (scoring, then pruning/merging at a stage) plug in beside these modules: a
method's job is to produce keep masks (or, for later stages, its own reduced inputs), never a
second decode loop. ``vtrlab.recon.Selector.select`` is the first such producer.
"""

from .answer import ReducedLogits, answer, generate_ids, logits
from .keep import ReducedInputs, batch_fingerprint, decoder_inputs, reduced_decoder_inputs, validate_keep

__all__ = [
    "ReducedInputs",
    "ReducedLogits",
    "answer",
    "batch_fingerprint",
    "decoder_inputs",
    "generate_ids",
    "logits",
    "reduced_decoder_inputs",
    "validate_keep",
]
