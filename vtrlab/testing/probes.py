"""Small recording probes the adapter tests share."""

from __future__ import annotations

import torch


def projector_io(vlm, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of ``vision_layers[vision_feature_layer]``, input of the projector) for one forward.

    The adapter tests' oracle for ``vision_feature_layer``: the projector must be fed that layer's
    output (after whatever the family applies in between). Hooks are removed also on errors.
    """
    m, a = vlm.model, vlm.adapter
    seen = {}
    h1 = vlm.vision_layers[a.vision_feature_layer(m)].register_forward_hook(
        lambda mod, args, out: seen.__setitem__("layer", out)
    )
    h2 = a.projector(m).register_forward_pre_hook(lambda mod, args: seen.__setitem__("proj", args[0]))
    try:
        with torch.no_grad():
            m(**batch.inputs)
    finally:
        h1.remove()
        h2.remove()
    out = seen["layer"][0] if isinstance(seen["layer"], tuple) else seen["layer"]
    return out, seen["proj"]
