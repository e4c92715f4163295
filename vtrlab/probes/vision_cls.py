"""Vision [CLS] attention rows from the vision tower's hidden states: no probe on the tower's layers.

Why: a short forward is host-bound (LLaVA-1.5-7B at batch 1: ~30 ms on an H200 whose GPU is busy ~20), so every
attention call a probe intercepts costs its host time in full, and LLaVA's forward waits for the device between
the tower and the LM (its check that image tokens and features match reads a device value), so device work queued
during the tower is waited for too. Holding the [CLS] rows of CLIP's 24 layers layer by layer added ~1 ms there.

A CLIP encoder layer is pre-LN: layer ``l`` attends with ``q = q_proj(LN1_l(h_l))`` and ``k = k_proj(LN1_l(h_l))``,
where ``h_l``, the layer's input, is the tower's ``hidden_states[l]`` (entry 0: the embeddings after the tower's
pre-LN). LLaVA-1.5 / LLaVA-NeXT ask the tower for hidden states anyway (transformers 5.17 keeps every one, later
versions only the one the projector reads); one pre-hook on the tower asks for all of them, which changes nothing the
model computes. One forward hook keeps them, and :meth:`ClsFromHidden.flush` (at the LM's first recorded layer,
after that wait, so its device work fills the LM's idle gaps) computes every probed layer's [CLS] row from them: the
layers' LN and projections stacked and run as batched operators, the scores in the model's dtype and the softmax
in float32, as :func:`vtrlab.probes.attention.row_probabilities` does. The rows equal those of the attention the
tower ran up to float rounding: the projections are recomputed, and in bfloat16 one may round differently in its
last bit (tests/probes/test_vision_cls.py, against the per-layer path and a float64 eager reference).

Only where it is exact and pays (:func:`plan`): every probed layer a ``CLIPEncoderLayer`` whose ``layer_norm1`` is
an ``nn.LayerNorm`` and whose attention's ``q_proj`` / ``k_proj`` are plain ``nn.Linear`` (quantised or
adapter-wrapped projections are not), no other probe on those attention modules, and at most
:data:`MAX_SEQUENCES` encoder sequences (beyond, the tower's device time hides the per-layer holds' host time, and
the hidden states kept until the flush would grow). Anything else takes the per-layer path. ``FROM_HIDDEN = False``
turns it off.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .attention import current_session

FROM_HIDDEN = True
# Encoder sequences (images x crops in the batch) up to which the rows are read from the hidden states.
MAX_SEQUENCES = 2


class ClsFromHidden:
    """The [CLS] rows of ``layers`` (indices into the tower's ``n_layers`` encoder layers), computed from the tower's
    hidden states at :meth:`flush` and delivered to ``sink`` (a :class:`~vtrlab.probes.grouped.RowSink`) as one
    (L, crops, H, 1, S) float32 block, with ``sites`` (one per layer, in ``layers`` order). ``parts``: each probed
    layer's (layer_norm1, attention module, q_proj, k_proj), as :func:`plan` checked them."""

    def __init__(
        self, tower: nn.Module, n_layers: int, layers: list[int], parts: list[tuple], cls_index: int, sink, sites
    ):
        self.tower, self.n_layers, self.layers, self.parts = tower, n_layers, list(layers), parts
        self.cls_index, self.sink, self.sites = cls_index, sink, sites
        self.pending: list = []  # each tower call's hidden states, until the flush
        self.calls = 0

    @contextlib.contextmanager
    def hooked(self) -> Iterator[ClsFromHidden]:
        """Within the block, forwards of the tower return every hidden state, kept for :meth:`flush`."""
        pre = self.tower.register_forward_pre_hook(_every_hidden_state, with_kwargs=True)
        try:
            post = self.tower.register_forward_hook(self._on_output)
            try:
                yield self
            finally:
                post.remove()
        finally:
            pre.remove()
            self.pending.clear()

    def _on_output(self, _module, _args, output) -> None:
        hidden = getattr(output, "hidden_states", None)
        if hidden is None or len(hidden) != self.n_layers + 1:
            got = "none" if hidden is None else len(hidden)
            raise RuntimeError(
                f"{type(self.tower).__name__} returned {got} hidden states, not its {self.n_layers} layers' inputs "
                "and output, so vision [CLS] rows cannot be read from them; set "
                "vtrlab.probes.vision_cls.FROM_HIDDEN = False to probe the layers one by one"
            )
        self.calls += 1
        self.pending.append(tuple(hidden[i] for i in self.layers))

    def flush(self) -> None:
        """Compute and deliver the rows of every tower call kept so far (nothing if none)."""
        pending, self.pending = self.pending, []
        with torch.no_grad():
            for hidden in pending:
                self.sink.put(self.sites, self.rows(hidden), False)

    def rows(self, hidden) -> torch.Tensor:
        """(L, crops, H, 1, S) float32: the [CLS] rows of the probed layers from their inputs ``hidden``."""
        parts = self.parts
        h = torch.stack(hidden)  # (L, n, S, C), each layer's input
        L, n, S, C = h.shape
        ln0, attn0 = parts[0][0], parts[0][1]

        def stacked(which: int, name: str) -> torch.Tensor:  # (parameters read from the dict: no __getattr__)
            return torch.stack([p[which]._parameters[name] for p in parts])

        # the layer norm as nn.LayerNorm computes it for a bfloat16 input: in float32, affine included, rounded once
        x = torch.nn.functional.layer_norm(h.float(), (C,), eps=ln0.eps)
        gamma, beta = stacked(0, "weight")[:, None, None, :], stacked(0, "bias")[:, None, None, :]
        x = torch.addcmul(beta.float(), x, gamma.float()).to(h.dtype)
        q = torch.baddbmm(stacked(2, "bias")[:, None, :], x[:, :, self.cls_index], stacked(2, "weight").transpose(1, 2))
        k = torch.baddbmm(stacked(3, "bias")[:, None, :], x.reshape(L, n * S, C), stacked(3, "weight").transpose(1, 2))
        heads, d = attn0.num_heads, attn0.head_dim
        q = q.view(L, n, heads, 1, d)  # (L, n, C) -> per head
        k = k.view(L, n, S, heads, d).permute(0, 1, 3, 4, 2)  # (L, n, heads, d, S)
        scores = torch.matmul(q, k)  # (L, n, heads, 1, S), in the model's dtype as the per-layer rows
        scores = scores.float() if scores.dtype != torch.float32 else scores
        return torch.softmax(scores.mul_(float(attn0.scale)), dim=-1)


def _every_hidden_state(_module, args, kwargs):
    kwargs["output_hidden_states"] = True
    return args, kwargs


def _encoder_layers(tower: nn.Module):
    # transformers 5.17 nests the encoder in ``vision_model``; later versions hold it directly
    inner = tower._modules.get("vision_model", tower)
    encoder = inner._modules.get("encoder") if inner is not None else None
    layers = encoder._modules.get("layers") if encoder is not None else None
    return layers if isinstance(layers, nn.ModuleList) else None


def _parts(encoder_layers, v_attn: list, layers: list[int]) -> list[tuple] | None:
    """Each probed layer's (layer_norm1, attention, q_proj, k_proj) when the computation is exact for all of them
    (see the module docstring), else None."""
    parts = []
    for i in layers:
        layer, attn = encoder_layers[i], v_attn[i]
        if type(layer).__name__ != "CLIPEncoderLayer" or layer._modules.get("self_attn") is not attn:
            return None
        ln = layer._modules.get("layer_norm1")
        q, k = attn._modules.get("q_proj"), attn._modules.get("k_proj")
        if type(ln) is not nn.LayerNorm or ln.weight is None or ln.bias is None:
            return None
        if any(type(p) is not nn.Linear or p.bias is None for p in (q, k)):
            return None
        heads, d, scale = (attn.__dict__.get(name) for name in ("num_heads", "head_dim", "scale"))
        if not (
            isinstance(heads, int) and isinstance(d, int) and isinstance(scale, float) and heads * d == q.out_features
        ):
            return None
        parts.append((ln, attn, q, k))
    ln0, attn0 = parts[0][0], parts[0][1]
    one = (ln0.eps, attn0.num_heads, attn0.head_dim, attn0.scale)
    if any((ln.eps, a.num_heads, a.head_dim, a.scale) != one for ln, a, _, _ in parts):
        return None  # one eps, head count, head size and scale for the batched computation
    return parts


def _unchanged(encoder_layers, layers: list[int], parts: list[tuple]) -> bool:
    """Whether every checked module is still where it was."""
    for i, (ln, attn, q, k) in zip(layers, parts):
        children = encoder_layers[i]._modules
        if children.get("self_attn") is not attn or children.get("layer_norm1") is not ln:
            return False
        grand = attn._modules
        if grand.get("q_proj") is not q or grand.get("k_proj") is not k:
            return False
    return True


# (id(encoder layer list), probed layers) -> (weak reference to that list, parts): what _parts found for a tower, so
# that a capture loop checks the modules' identities only, not their classes and attributes
_CHECKED: dict[tuple, tuple] = {}


def plan(vlm, v_attn: list, layers: list[int], n_sequences: int, cls_index: int, sink, sites) -> ClsFromHidden | None:
    """A :class:`ClsFromHidden` for these vision layers when it is exact for the tower and ``n_sequences`` (the
    encoder sequences the batch runs) is at most :data:`MAX_SEQUENCES` (see the module docstring), else None
    (capture then holds each layer's query and key)."""
    if not FROM_HIDDEN or not layers or n_sequences > MAX_SEQUENCES:
        return None
    tower_of = getattr(vlm.adapter, "vision_tower", None)
    if tower_of is None:
        return None
    tower = tower_of(vlm.model)
    encoder_layers = _encoder_layers(tower)
    if encoder_layers is None or len(encoder_layers) != len(v_attn):
        return None
    key = (id(encoder_layers), tuple(layers))
    hit = _CHECKED.get(key)
    if hit is not None and hit[0]() is encoder_layers and _unchanged(encoder_layers, layers, hit[1]):
        parts = hit[1]
    else:
        parts = _parts(encoder_layers, v_attn, layers)
        if parts is not None:  # (a tower it is not exact for is checked again on every call: it may be fixed)
            _CHECKED[key] = (weakref.ref(encoder_layers), parts)
            while len(_CHECKED) > 16:
                _CHECKED.pop(next(iter(_CHECKED)))
    if parts is None or any(p[1] is not v_attn[i] for i, p in zip(layers, parts)):
        return None
    sess = current_session()
    if sess is not None and any(id(v_attn[i]) in sess.sites for i in layers):
        return None  # another probe on those modules: the per-layer path composes with it
    return ClsFromHidden(tower, len(encoder_layers), layers, parts, cls_index, sink, sites)
