"""`ReductionContext`: the signals a pre-LM method scores with, computed once per batch and cached.

A method asks for what it needs; nothing is computed twice for one batch, and nothing is computed
that no method asked for. Signals:

* :meth:`decoder_inputs` — the LM decoder's inputs as the model builds them (image features merged).
  A method's own vision forward (:func:`vtrlab.reduce.methods._vision.vision_forward`) runs through
  the same function and stores its result here, so the tower runs **once** per batch: the inputs the
  LM then receives (:func:`vtrlab.reduce.answer.generate_ids`) are those of the scoring forward.
* :meth:`image_embeds` — per sample, the projector outputs at the image tokens (layout order).
* :meth:`vision_hidden` — per vision layer, the tower's hidden states after that layer (forward hook),
  as the tower produced them (one tensor per tower call: crops / images in processor order).
* :meth:`vision_attention` — [CLS]→patch attention (or the mean attention each patch receives where
  the tower has no [CLS]) at chosen vision layers, through ``vl.capture`` (no eager attention).
* :meth:`question_embeds` — per sample, the LM input embeddings of the question tokens.

``vision_layer`` arguments follow LLaVA's ``hidden_states`` convention when negative: ``-1`` is the
last vision layer's output, ``-2`` the one before (LLaVA-1.5's layer 22 of 24) — so a method's
default works on towers of any depth; non-negative values are 0-indexed layer numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..models.base import Batch


def vision_layer_index(vlm: Any, layer: int) -> int:
    """0-indexed vision layer for ``layer`` (negative: counted from the end, ``-1`` = last layer)."""
    n = len(vlm.vision_layers)
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise ValueError(f"vision_layer={layer}: the tower has {n} layers; accepted: {-n}..{n - 1}")
    return idx


def lm_layer_index(vlm: Any, layer: int, what: str = "layer") -> int:
    """0-indexed LM decoder layer for ``layer`` (negative counts from the end)."""
    n = len(vlm.lm_layers)
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise ValueError(f"{what}={layer}: the LM has {n} decoder layers; accepted: {-n}..{n - 1}")
    return idx


# cache keys holding raw outputs of the vision forward (the rest of the cache is derived from them)
TOWER_SIGNALS = ("decoder_inputs", "vision_probs_by_layer", "tower_tensors", "vision_requests")


class ReductionContext:
    """Lazily computed, cached signals of one batch for reduction methods."""

    def __init__(self, vlm: Any, batch: Batch, decoder_inputs: dict | None = None, signals: dict | None = None):
        self.vlm = vlm
        self.batch = batch
        self._cache: dict[Any, Any] = {}
        if signals is not None:
            unknown = sorted(str(k) for k in signals if k not in TOWER_SIGNALS)
            if unknown:
                raise ValueError(f"signals= holds {unknown}; accepted keys: {', '.join(TOWER_SIGNALS)}")
            self._cache.update(
                {k: dict(v) if isinstance(v, dict) and k != "decoder_inputs" else v for k, v in signals.items()}
            )
        if decoder_inputs is not None:
            self._cache["decoder_inputs"] = decoder_inputs

    def tower_signals(self) -> dict:
        """The raw outputs of this batch's vision forward cached so far (decoder inputs, recorded vision
        attention, hooked tower tensors; see :data:`TOWER_SIGNALS`) — nothing a method derived from them.
        ``ReductionContext(vlm, batch, signals=ctx.tower_signals())`` starts a context that has the tower's
        outputs but must redo every method-side step: how benchmarks time a method's scoring alone."""
        return {
            k: dict(v) if isinstance(v, dict) and k != "decoder_inputs" else v
            for k, v in self._cache.items()
            if k in TOWER_SIGNALS
        }

    @property
    def layouts(self):
        return self.batch.layouts

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key for this batch (methods may cache their own signals here)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def decoder_inputs(self) -> dict:
        """The adapter's decoder inputs of this batch (computed once; given ones are used as they are)."""
        return self.cached("decoder_inputs", lambda: self.vlm.adapter.decoder_inputs(self.vlm.model, self.batch.inputs))

    def has_decoder_inputs(self) -> bool:
        return "decoder_inputs" in self._cache

    def offer_decoder_inputs(self, dec: dict) -> None:
        """Keep ``dec`` (the adapter's ``decoder_inputs`` of this batch, computed by a method's own vision
        forward) unless decoder inputs are already cached: later signals and the LM reuse them."""
        self._cache.setdefault("decoder_inputs", dec)

    def image_embeds(self, i: int) -> torch.Tensor:
        """(n_image_tokens, D) projector outputs of sample ``i`` at its image tokens (layout order)."""
        emb = self.decoder_inputs()["inputs_embeds"]
        pos = torch.as_tensor(self.layouts[i].image_positions, dtype=torch.long, device=emb.device)
        return emb[i, pos]

    def question_embeds(self, i: int) -> torch.Tensor:
        emb = self.decoder_inputs()["inputs_embeds"]
        pos = torch.as_tensor(self.layouts[i].question_positions, dtype=torch.long, device=emb.device)
        return emb[i, pos]

    def vision_hidden(self, layer: int) -> list[torch.Tensor]:
        """Outputs of vision layer ``layer`` (see module doc for negative values), one per tower call."""
        idx = vision_layer_index(self.vlm, layer)

        def compute():
            out: list[torch.Tensor] = []

            def hook(_m, _a, output):
                h = output[0] if isinstance(output, (tuple, list)) else output
                out.append(h.detach())

            handle = self.vlm.vision_layers[idx].register_forward_hook(hook)
            try:
                with torch.no_grad():
                    self.vlm.model(**dict(self.batch.inputs), use_cache=False)
            finally:
                handle.remove()
            return out

        return self.cached(("vision_hidden", idx), compute)

    def vision_attention(self, layer: int):
        """``vl.capture``'s ``vision_attn`` at vision layer ``layer`` (an xarray.Dataset; labels per
        vision key), [CLS] rows where the tower has one, else the mean attention each key receives."""
        idx = vision_layer_index(self.vlm, layer)

        def compute():
            from ..probes import capture

            return capture(self.vlm, self.batch, layers=[0], vision=True, vision_layers=[idx])

        return self.cached(("vision_attention", idx), compute)


def budgets(batch: Batch, keep: float | int | Any) -> list[int]:
    """Exact number of image tokens each sample keeps: ``round(keep * n)`` for a ratio in (0, 1],
    ``keep`` itself for an int (at most each sample's count)."""
    n_tokens = [lay.n_image_tokens for lay in batch.layouts]
    if isinstance(keep, (bool, np.bool_)):
        raise TypeError(f"keep={keep!r}; accepted: a ratio in (0, 1] or a number of image tokens (int >= 0)")
    if isinstance(keep, (int, np.integer)):
        if keep < 0 or keep > min(n_tokens):
            raise ValueError(f"keep={keep} image tokens; accepted: 0..{min(n_tokens)} (the fewest any sample has)")
        return [int(keep)] * len(n_tokens)
    if isinstance(keep, (float, np.floating)):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep} as a ratio; accepted: a float in (0, 1] or an int number of tokens")
        return [int(round(float(keep) * n)) for n in n_tokens]
    raise TypeError(f"keep={keep!r}; accepted: a ratio in (0, 1] or a number of image tokens (int >= 0)")


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the k highest scores; ties broken by the lower index (stable, deterministic)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    mask = np.zeros(scores.shape[0], dtype=bool)
    mask[order[:k]] = True
    return mask
