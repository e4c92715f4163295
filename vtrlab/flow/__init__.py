"""Information flow through attention: knockout of edges and attention saliency for chosen queries.

Both run inside vtrlab's attention function (see ``vtrlab.probes.attention``): no N×N matrix,
no patched model code, everything restored after the call; they compose with the other probes.
"""

from .knockout import knocked_out, knockout, knockout_sites
from .logit_lens import logit_lens
from .rollout import rollout
from .saliency import attention_times_grad, saliency
from .sweeps import EDGES, knockout_sweep, windows

__all__ = [
    "EDGES",
    "attention_times_grad",
    "knocked_out",
    "knockout",
    "knockout_sites",
    "knockout_sweep",
    "logit_lens",
    "rollout",
    "saliency",
    "windows",
]
