"""Attention saliency for selected queries: ``A ⊙ ∂L/∂A`` without any N×N matrix.

An attention output row is ``O_r = Σ_k A_rk V_k``, and A feeds nothing else, so
``∂L/∂A_rk = dO_r · V_k``. The attention function keeps, for the chosen rows only, the
probabilities ``A[rows]`` (B, H, R, N), V (already held by autograd) and the output tensor; one
``autograd.grad`` call gives dO for every chosen layer, and ``A ⊙ (dO·Vᵀ)`` is formed per layer.
Parameters' ``.grad`` are never touched. Inside :func:`vtrlab.knocked_out` the saliency is that of
the knocked-out model (probes compose).

Cost: the graph is recorded only from the first chosen LM layer on. Everything before it (the vision
tower, the projector, the embeddings, earlier LM layers) runs without autograd, and the hidden state
entering that layer becomes the graph's leaf. The parameters the graph meets (those of the LM layers from
the first chosen one on, and the output head) are taken as constants for the call (their ``requires_grad``
is switched off and restored in ``finally``; only those that require grad are touched). So autograd keeps
only what input gradients need, never the activations a weight gradient would, and the backward pass
computes no weight gradient. The result does not depend on which parameters are frozen: ∂L/∂A is a
gradient with respect to activations.

Host cost (what bounds it on a GPU at LLaVA-1.5's 617 tokens): besides the backward pass, ``A ⊙ (dO·Vᵀ)`` is
formed for many layers at once (their dO, V and A stacked, in chunks of a bounded size), not per layer, and
the attention function keeps references only (no copies, no detach) during the forward.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import xarray as xr

from vtrlab.models.labels import key_coordinates
from vtrlab.probes.attention import RowPlan, Site, session
from vtrlab.probes.grouped import LayerGroup
from vtrlab.probes.spec import layer_indices, padded_rows, queries_per_sample
from vtrlab.probes.switch import attention_switched

from .target import log_probs_at_last, validate_target


def attention_times_grad(
    probs: torch.Tensor, d_out: torch.Tensor, value: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``A ⊙ (dO·Vᵀ)`` for ``rows``: probs (B, H, R, N), d_out (B, Q, H, D) (the attention output's
    gradient, HF layout), value (B, Hkv, N, D), rows (B, R) with -1 padding -> (B, H, R, N)."""
    B, H, R, N = probs.shape
    Hkv, D = value.shape[1], value.shape[3]
    idx = rows.clamp(min=0)
    d_rows = torch.gather(d_out.transpose(1, 2), 2, idx[:, None, :, None].expand(B, H, R, D))  # (B, H, R, D)
    g = torch.matmul(d_rows.reshape(B, Hkv, (H // Hkv) * R, D).to(value.dtype), value.transpose(-1, -2))
    return probs * g.view(B, H, R, N).float()


# Layers whose dO and V are stacked for one batched A ⊙ (dO·Vᵀ): at most this many bytes of stacked dO + V
# (LLaVA-1.5-7B, 617 tokens, bf16: 10 MB a layer, all 32 layers at once; NeXT's 2,969 tokens: 8 layers at once)
_STACK_BYTES = 512 * 2**20


def _attention_times_grad_layers(
    probs: list[torch.Tensor], d_outs: list[torch.Tensor], values: list[torch.Tensor], rows: torch.Tensor
) -> torch.Tensor:
    """:func:`attention_times_grad` of many layers (lists of per-layer tensors of one shape) -> (L, B, H, R, N):
    the layers are stacked into the batch axis, in chunks of at most :data:`_STACK_BYTES` of dO + V, so a chunk
    costs the launches of one layer. Per (layer, sample, head) the same products as layer by layer."""
    L = len(probs)
    if L == 1 or any(t.shape != ts[0].shape for ts in (probs, d_outs, values) for t in ts):
        return torch.stack([attention_times_grad(p, d, v, rows) for p, d, v in zip(probs, d_outs, values)])
    per_layer = d_outs[0].numel() * d_outs[0].element_size() + values[0].numel() * values[0].element_size()
    step = max(1, min(L, _STACK_BYTES // max(1, per_layer)))
    B = rows.shape[0]
    chunks, rows_rep = [], {}
    for start in range(0, L, step):
        n = min(step, L - start)
        if n not in rows_rep:
            rows_rep[n] = rows.repeat(n, 1)  # (n * B, R): layer-major, as the stacks below
        sl = slice(start, start + n)
        chunks.append(
            attention_times_grad(
                torch.stack(probs[sl]).flatten(0, 1),
                torch.stack(d_outs[sl]).flatten(0, 1),
                torch.stack(values[sl]).flatten(0, 1),
                rows_rep[n],
            )
        )
    ag = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return ag.view(L, B, *ag.shape[1:])


class _SaliencyProbs:
    """The :class:`~vtrlab.probes.grouped.RowSink` of saliency: each layer's rows' probabilities go to its site."""

    def target(self, sites):
        return None

    def put(self, sites, probs, written) -> None:
        for g, site in enumerate(sites):
            site.saliency["probs"] = probs[g]


def _check_gradient_path(vlm) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "saliency needs gradients, but torch.inference_mode() is active; call vtrlab.saliency outside "
            "the inference_mode block (torch.no_grad is fine: saliency enables grad itself)"
        )
    first = next(vlm.model.parameters(), None)
    if first is not None and first.is_inference():
        raise RuntimeError(
            "the model's parameters were created under torch.inference_mode(); reload the model "
            "outside inference_mode to take gradients"
        )


def _trainable(modules) -> dict[int, torch.nn.Parameter]:
    """The parameters of ``modules`` (and their submodules) that require grad, by id. A plain walk over the
    modules' own dicts: ``Module.parameters()`` builds a name string per parameter (~300 of them from LLaVA-7B's
    first LM layer on; the walk runs on every call)."""
    out: dict[int, torch.nn.Parameter] = {}
    stack = [m for m in modules if m is not None]
    while stack:  # (a module shared by two parents is visited twice: its parameters are keyed by id)
        d = stack.pop().__dict__
        for p in d["_parameters"].values():
            if p is not None and p.requires_grad:
                out[id(p)] = p
        stack.extend(c for c in d["_modules"].values() if c is not None)
    return out


@contextlib.contextmanager
def _graph_from(layer_module, constants):
    """Record autograd only from ``layer_module`` on: the forward runs under no_grad until that layer's
    input, which becomes a leaf that requires grad; the parameters of the ``constants`` modules are constants
    (those that require grad are switched off, and on again in ``finally``). Yields a dict that holds the leaf
    once the layer ran."""
    seen: dict = {}

    def pre_hook(_module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        if not torch.is_tensor(h) or not h.is_floating_point():
            raise RuntimeError(
                f"{type(_module).__name__} was called without a floating hidden_states tensor; saliency cannot "
                "start its gradient path there"
            )
        leaf = h.detach().requires_grad_(True)
        torch.set_grad_enabled(True)  # from here to the end of the forward (the outer block restores it)
        seen["leaf"] = leaf
        if args:
            return (leaf, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": leaf}

    trainable = _trainable(constants)
    handle = layer_module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for p in trainable.values():
            p.requires_grad_(False)
        with torch.no_grad():
            yield seen
    finally:
        handle.remove()
        for p in trainable.values():
            p.requires_grad_(True)


def saliency(vlm, batch, *, queries="last", layers="all", target=None) -> xr.Dataset:
    """Per-layer attention saliency of the chosen queries for the answer token.

    L = Σ_samples log p(target | sample) at each sample's last real position; ``target`` is one
    token id per sample (default: the model's own greedy prediction there).

    Returns an ``xarray.Dataset``: ``attn_grad`` (sample, layer, head, query, key) = A ⊙ ∂L/∂A,
    ``saliency`` (sample, layer, query, key) = |Σ_heads A ⊙ ∂L/∂A|, ``target`` (sample),
    ``query_position`` and the key labels of :func:`vtrlab.capture`.
    """
    layouts = list(batch.layouts)
    lm_layers = layer_indices(layers, len(vlm.lm_layers))
    rows_np = padded_rows(queries_per_sample(layouts, queries))
    vocab = vlm.model.get_output_embeddings().weight.shape[0] if vlm.model.get_output_embeddings() is not None else None
    if target is not None and vocab is not None:
        validate_target(target, len(layouts), vocab, "cpu")  # before any forward
    _check_gradient_path(vlm)
    plan = RowPlan.build(rows_np, vlm.device)  # shared by every layer (masks gathered once)
    rows_t = plan.rows
    mods = vlm.lm_layers
    # the rows' probabilities of every layer computed in batched groups after the forward, not layer by layer
    group = LayerGroup(_SaliencyProbs(), rows_np, vlm.device, plan=plan)
    sites = {
        id(vlm.adapter.lm_attention(mods[i])): Site(
            "lm", i, saliency_rows=rows_t, plan=plan, probe="saliency", group=group
        )
        for i in lm_layers
    }
    inputs = dict(batch.inputs)
    first = mods[lm_layers[0]]
    attn = [vlm.adapter.lm_attention(mods[i]) for i in lm_layers]
    constants = [*mods[lm_layers[0] :], vlm.model.get_output_embeddings()]  # what the graph meets
    with attention_switched(vlm.model, attn), session(sites), _graph_from(first, constants) as seen:
        logits = vlm.model(**inputs, use_cache=False).logits
        group.flush()  # the layers still held
        if "leaf" not in seen:
            raise RuntimeError(
                f"LM layer {lm_layers[0]} never ran during {type(vlm.model).__name__}'s forward, so saliency has "
                "no gradient path"
            )
        logp = log_probs_at_last(vlm, layouts, logits)
        if target is None:
            tgt = logp.argmax(-1).detach()
        else:
            tgt = validate_target(target, len(layouts), logp.shape[-1], logp.device)
        loss = logp.gather(1, tgt[:, None]).sum()
        by_layer = {s.layer: s for s in sites.values()}
        missing = [i for i in lm_layers if not by_layer[i].saliency]
        if missing:
            raise RuntimeError(f"LM layer(s) {missing}' attention never ran through vtrlab's attention function")
        outs = [by_layer[i].saliency["output"] for i in lm_layers]
        no_path = [i for i, o in zip(lm_layers, outs) if not o.requires_grad]
        if not loss.requires_grad or no_path:
            raise RuntimeError(
                f"no gradient path from the answer to the attention of LM layer(s) {no_path or lm_layers}: the "
                "model's forward detached the hidden state between the layers"
            )
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
        del outs, logits, logp, loss
        with torch.no_grad():
            sal = [by_layer[i].saliency for i in lm_layers]
            d_outs = [torch.zeros_like(s["output"]) if g is None else g for s, g in zip(sal, grads)]
            del grads
            ag = _attention_times_grad_layers(
                [s["probs"] for s in sal], d_outs, [s["value"] for s in sal], rows_t
            )  # (L, B, H, R, N)
            del sal, d_outs
    for s in sites.values():
        s.saliency = None  # the layers' V and outputs (the graph) are freed with the sites
    ag = ag.transpose(0, 1).cpu().contiguous()  # one copy to the host for every layer
    ag = ag.masked_fill(torch.as_tensor(rows_np < 0)[:, None, None, :, None], float("nan"))
    seq_len = ag.shape[-1]
    same = bool((rows_np == rows_np[:1]).all()) and not (rows_np < 0).any()
    ds = xr.Dataset(
        {
            "attn_grad": (("sample", "layer", "head", "query", "key"), ag.numpy()),
            "saliency": (("sample", "layer", "query", "key"), ag.sum(2).abs().numpy()),
            "target": (("sample",), tgt.cpu().numpy()),
            "query_position": (("sample", "query"), np.where(rows_np >= 0, rows_np, np.nan)),
            **key_coordinates(layouts, seq_len),
        },
        coords={
            "sample": np.arange(len(layouts)),
            "layer": np.asarray(lm_layers),
            "head": np.arange(ag.shape[2]),
            "query": rows_np[0] if same else np.arange(rows_np.shape[1]),
            "key": np.arange(seq_len),
        },
    )
    ds.attrs.update(
        {
            "model": str(vlm.name),
            "family": str(vlm.family),
            "objective": "sum log p(target) at last position",
            "queries": queries if isinstance(queries, str) else "explicit",
        }
    )
    return ds
