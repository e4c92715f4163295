"""Tokens merged or dropped *inside* the vision tower, between its blocks (ToMe, FlowCut, ...).

The tower is run block by block from its own modules (embeddings, pre-norm, each encoder layer's
``layer_norm1`` / ``self_attn`` projections / ``layer_norm2`` / ``mlp``) — the same arithmetic as
the HF forward (checked against ``output_hidden_states`` in the tests) — so that the sequence can
shrink between blocks; the model's own modules are never patched. Each token carries its
``size`` (how many original tokens it stands for) and ``source`` (B, T, N0) membership of the
original tokens, so every merged token can be traced to the patches it covers.

``between(layer, state)`` is called after each block's attention (ToMe merges there, before the
MLP) or after the whole block (FlowCut prunes there), with a :class:`TowerState` it may replace;
``proportional`` adds log(size) to the attention logits of every key (ToMe's proportional
attention). The output is the hidden state after the
feature layer (LLaVA's ``vision_feature_layer``), as the projector would receive it.

Supported towers: CLIP / SigLIP encoders of the LLaVA families (``encoder.layers`` of
pre-norm blocks, one sequence per crop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TowerState:
    x: torch.Tensor  # (B, T, D) hidden states
    size: torch.Tensor  # (B, T, 1) original tokens per token
    source: torch.Tensor  # (B, T, N0) membership of the original tokens (0/1)
    metric: torch.Tensor | None = None  # (B, T, d) this block's keys, mean over heads (after attention)
    extra: dict | None = None  # a method's own per-token state (e.g. FlowCut's cumulative scores)
    attn_cls: torch.Tensor | None = None  # (B, H, T) this block's attention from token 0 (if asked)
    values: torch.Tensor | None = None  # (B, H, T, d) this block's values (if asked)


def _vision_model(vlm: Any):
    tower = vlm.adapter.vision_tower(vlm.model)
    return getattr(tower, "vision_model", tower)


def _attention(attn, h: torch.Tensor, size: torch.Tensor | None, want_cls: bool):
    B, T, _ = h.shape
    H = int(getattr(attn, "num_heads", None) or attn.config.num_attention_heads)
    q = attn.q_proj(h).view(B, T, H, -1).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, H, -1).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, H, -1).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0].to(logits.dtype)
    p = logits.softmax(-1)
    out = (p @ v).transpose(1, 2).reshape(B, T, -1)
    return attn.out_proj(out), k.mean(1), (p[:, :, 0] if want_cls else None), v


@torch.no_grad()
def run_tower(
    vlm: Any,
    pixel_values: torch.Tensor,
    feature_layer: int,
    between: Callable[[int, TowerState], TowerState] | None = None,
    proportional: bool = False,
    want_cls: bool = False,
    where: str = "attention",
) -> TowerState:
    """Run the tower up to and including layer ``feature_layer`` (0-indexed), calling ``between``
    after each block's attention (``where="attention"``, ToMe) or after the whole block
    (``where="block"``, FlowCut). Returns the final state (``x`` = that layer's output)."""
    if where not in ("attention", "block"):
        raise ValueError(f"where={where!r}; accepted: 'attention', 'block'")
    vm = _vision_model(vlm)
    layers = vm.encoder.layers
    if not 0 <= feature_layer < len(layers):
        raise ValueError(f"feature_layer={feature_layer}; the tower has {len(layers)} layers")
    p = next(vm.parameters())
    x = vm.embeddings(pixel_values.to(p.device, p.dtype))
    pre = getattr(vm, "pre_layrnorm", None)
    if pre is not None:
        x = pre(x)
    B, N0, _ = x.shape
    state = TowerState(
        x=x,
        size=torch.ones(B, N0, 1, dtype=x.dtype, device=x.device),
        source=torch.eye(N0, dtype=x.dtype, device=x.device).expand(B, N0, N0).clone(),
    )
    for li in range(feature_layer + 1):
        layer = layers[li]
        res = state.x
        size = state.size if proportional else None
        out, metric, cls, v = _attention(layer.self_attn, layer.layer_norm1(state.x), size, want_cls)
        state.x = res + out
        state.metric, state.attn_cls, state.values = metric, cls, v
        if between is not None and where == "attention":
            state = between(li, state)
        state.x = state.x + layer.mlp(layer.layer_norm2(state.x))
        if between is not None and where == "block":
            state = between(li, state)
    return state
