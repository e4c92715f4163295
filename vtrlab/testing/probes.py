"""Small recording probes the adapter tests share."""

from __future__ import annotations

import torch

from vtrlab.models.hooks import record, require_seen


def projector_io(vlm, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of ``vision_layers[vision_feature_layer]``, input of the projector) for one forward.

    The adapter tests' oracle for ``vision_feature_layer``: the projector must be fed that layer's
    output (after whatever the family applies in between). Hooks are removed also on errors.
    """
    m, a = vlm.model, vlm.adapter
    layer = vlm.vision_layers[a.vision_feature_layer(m)]
    with record(outputs={"layer": layer}, inputs={"proj": a.projector(m)}, stop=True) as seen, torch.no_grad():
        m(**batch.inputs)
    require_seen(seen, ["layer", "proj"], m)
    return seen["layer"], seen["proj"].args[0]
