"""Information flow through attention: knockout of edges and attention saliency for chosen queries.

Both run inside vtrlab's attention function (see ``vtrlab.probes.attention``): no N×N matrix,
no patched model code, everything restored after the call; they compose with the other probes.
"""

from .knockout import knocked_out, knockout, knockout_sites
from .logit_lens import logit_lens
from .rollout import rollout
from .saliency import attention_times_grad, saliency

__all__ = ["attention_times_grad", "knocked_out", "knockout", "knockout_sites", "logit_lens", "rollout", "saliency"]
