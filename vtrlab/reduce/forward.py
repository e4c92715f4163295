"""One call of the model on decoder-input embeddings (the reduced sequence), as ``generate`` makes it.

Shared by the answer loop (:mod:`vtrlab.reduce.answer`) and the records of in-LM methods
(:mod:`vtrlab.reduce.apply`), so both run the model exactly the same way.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..probes.attention import sequence_map


def forward_embeds(
    vlm: Any,
    embeds,
    attention_mask,
    position_ids,
    cache=None,
    use_cache=True,
    extras=None,
    last_only=False,
    source=None,
):
    """One call of the model on embeddings; returns (float32 logits, cache). A mask of all ones is
    passed as None, as ``generate`` does, so the attention path (and its numerics) is the same.
    ``last_only`` computes the head for the last column only (``logits_to_keep=1``), as
    ``generate`` does: a full (B, L, vocab) tensor is large for real models."""
    if last_only:
        extras = {**(extras or {}), "logits_to_keep": 1}
    mask = None if bool((attention_mask == 1).all()) else attention_mask
    with sequence_map(*source) if source is not None else contextlib.nullcontext():
        out = vlm.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache,
            return_dict=True,
            **(extras or {}),
        )
    return out.logits.float(), out.past_key_values
