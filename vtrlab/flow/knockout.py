"""Attention knockout: block edges from chosen key positions to chosen query rows, in chosen LM layers.

The edges are removed inside vtrlab's attention function (the mask handed to sdpa), so the model's
own code runs unchanged everywhere else. Typical use: cut image tokens -> last token in layers
K..L and see whether the answer survives (Geva et al.-style information-flow analysis).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from vtrlab.probes.attention import Knockout, Site, session
from vtrlab.probes.spec import layer_indices, rows_per_sample
from vtrlab.probes.switch import attention_switched

KEY_NAMES = ("image", "image_block", "question", "text")


def _positions(layouts, spec, what: str) -> list[np.ndarray]:
    if isinstance(spec, str) and spec in ("image", "image_block"):
        pick = (lambda L: L.image_positions) if spec == "image" else (lambda L: L.positions)
        return [np.asarray(pick(L), dtype=np.int64) for L in layouts]
    try:
        return rows_per_sample(layouts, spec)
    except ValueError as err:
        raise ValueError(f"{what}: {err} (or 'image', 'image_block' for keys)") from None


def _as_mask(per_sample: list[np.ndarray], seq_len: int, device) -> torch.Tensor:
    m = torch.zeros((len(per_sample), seq_len), dtype=torch.bool)
    for b, pos in enumerate(per_sample):
        m[b, torch.as_tensor(pos, dtype=torch.long)] = True
    return m.to(device)


def knockout_sites(vlm, batch, keys="image", queries="last", layers="all") -> dict[int, Site]:
    """Sites that block ``keys`` -> ``queries`` edges at ``layers`` (positions from the layouts)."""
    layouts = list(batch.layouts)
    seq_len = int(dict(batch.inputs)["input_ids"].shape[1])
    ko = Knockout(
        queries=_as_mask(_positions(layouts, queries, "queries"), seq_len, vlm.device),
        keys=_as_mask(_positions(layouts, keys, "keys"), seq_len, vlm.device),
    )
    mods = vlm.lm_layers
    return {
        id(vlm.adapter.lm_attention(mods[i])): Site("lm", i, knockout=ko)
        for i in layer_indices(layers, len(mods))
    }


@contextlib.contextmanager
def knocked_out(vlm, batch, keys="image", queries="last", layers="all") -> Iterator[None]:
    """Within the block, forwards of ``vlm.model`` on ``batch``-shaped inputs run with the edges cut.

    Args:
        keys: ``"image"`` (patch tokens), ``"image_block"`` (with newline/separator tokens),
            ``"question"``, ``"text"``, or explicit positions (one list, or one per sample).
        queries: rows whose attention loses those keys: ``"last"``, ``"question"``, ``"text"``,
            ``"all"`` or explicit positions.
        layers: ``"all"`` or LM layer indices.
    """
    sites = knockout_sites(vlm, batch, keys, queries, layers)
    with attention_switched(vlm.model), session(sites):
        yield


def knockout(vlm, batch, keys="image", queries="last", layers="all") -> torch.Tensor:
    """Logits (B, N, vocab) of one forward with ``keys -> queries`` edges cut at ``layers``."""
    with knocked_out(vlm, batch, keys, queries, layers), torch.no_grad():
        return vlm.model(**dict(batch.inputs), use_cache=False).logits
