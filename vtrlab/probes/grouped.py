"""Attention rows of several layers in one batched computation (capture's fast path).

Why: a short forward is host-bound — LLaVA-1.5-7B at 617 tokens and batch 1 runs ~31 ms on an H200 of
which the GPU is busy ~20 ms — so every operator a probe adds per layer costs its full host dispatch and
launch, however small its kernel. Computing a layer's rows as it runs (:func:`row_probabilities`) adds
~9 operators per recorded layer, ~300 over a 32-layer LM. A :class:`LayerGroup` instead *holds* what
the rows need — the layer's query (whole, when every sample's rows are one contiguous range: its rows are
taken at the flush by one narrow of the stack; else the gathered rows) and its key, no operator at all —
and computes the held layers together: one stack of the queries and one of the keys, one ``bmm``, one
softmax written straight into the caller's buffer. It flushes when the held tensors and
the flush's temporaries would pass ``max_bytes`` (so the extra memory stays bounded: at LLaVA-NeXT-7B
batch 8 every layer flushes alone, which is the per-layer computation), when a call of another
signature comes (shapes, dtypes, device, scale, causality, mask object: the layers of one group share
one bias), and when the caller says so after the forward (:meth:`LayerGroup.flush`).

The arithmetic is that of :func:`vtrlab.probes.attention.row_probabilities` (scores in the model's dtype,
scaled and softmaxed in float32), so a grouped capture equals a per-layer one up to the float rounding
of a batched matmul (tests/probes/test_capture_grouped.py, against float64 references and the per-layer
path). Only for forwards without a KV cache (capture runs ``use_cache=False``): a held key that a cache
updated in place would be read after the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .attention import RowPlan

# Held queries and keys of one group plus the flush's temporaries (their stacked copies, scores), at most: the
# extra device memory a grouped capture may take beyond a per-layer one. 768 MiB holds every layer of
# LLaVA-1.5-7B at 617 tokens and batch 1 (~20 MiB a layer: its query and key and their stacked copies), so that
# capture there flushes once, after the forward: a flush inside the forward cost ~1 ms of wall time on the H200
# (benchmarks/timeline_capture.py --effects: capture_last in two groups against one, session 8), far more than
# its operators' launches.
GROUP_MAX_BYTES = 768 * 2**20
# Probabilities one group delivers, at most. A group's rows leave for the host right after its flush, so smaller
# groups hide more of the copy behind the forward, but every flush costs host work (a dozen operators and the copy's
# stream calls), and on a host-bound forward host work is what the wall time is made of. Measured on the H200 at
# LLaVA-1.5-7B batch 1, question rows (~22 rows, 1.7 MiB a layer, 55 MiB in all; benchmarks/ablate_capture.py
# --group-out-mib): 14 groups of 4 MiB cost 9.5 ms over the plain forward, 4 groups of 16 MiB 5.2 ms, one group
# 4.6 ms (fastest calls; the medians agree in order). So one group while the rows are at most 64 MiB; larger
# captures (batch 8, LLaVA-NeXT) still flush every few layers and overlap their copies.
GROUP_MAX_OUT_BYTES = 64 * 2**20


class RowSink(Protocol):
    """Where a group's probabilities go (capture's buffer, or per-site lists)."""

    def target(self, sites: list) -> torch.Tensor | None:
        """A float32 (G, B, H, R, N) tensor on the device to softmax into, or None (then :meth:`put` copies)."""

    def put(self, sites: list, probs: torch.Tensor, written: bool) -> None:
        """Deliver ``probs`` (G, B, H, R, N) float32, one slice per site in call order (``written``: they
        were softmaxed into :meth:`target`'s tensor already)."""


@dataclass(slots=True)
class _Held:
    site: Any
    q: torch.Tensor  # (B, H, N, D) the layer's query when the rows are one span (taken at the flush), else (B, H, R, D)
    k: torch.Tensor  # (B, Hkv, N, D)
    mask: torch.Tensor | None  # held so that its identity (the group's signature) cannot be reused


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes a held tensor keeps alive (its whole storage: a view holds its base)."""
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return t.numel() * t.element_size()


class LayerGroup:
    """Rows of every layer that calls :meth:`add`, computed in batched flushes (see the module docstring).

    ``rows``: (B, R) int64 query positions with -1 padding, the same for every layer (LM rows), or one
    int (vision [CLS]: that row of every sequence, whatever the number of sequences).
    ``plan``: the :class:`RowPlan` of ``rows`` when the caller has one already (shared masks).
    """

    def __init__(
        self,
        sink: RowSink,
        rows,
        device,
        *,
        plan: RowPlan | None = None,
        max_bytes: int | None = None,
        max_out_bytes: int | None = None,
        last=None,
    ):
        self.sink = sink
        # the site of the last layer the caller expects: its call flushes the group at once (inside the forward,
        # so the rows' computation and their copy to the host overlap the rest of it: final norm, LM head)
        self.last = last
        self.device = torch.device(device)
        self.max_bytes = GROUP_MAX_BYTES if max_bytes is None else int(max_bytes)
        self.max_out_bytes = GROUP_MAX_OUT_BYTES if max_out_bytes is None else int(max_out_bytes)
        self._row = int(rows) if isinstance(rows, (int, np.integer)) else None
        self._rows = None if self._row is not None else np.asarray(rows, dtype=np.int64)
        self._plans: dict[int, RowPlan] = {}
        self._spans: dict[int, tuple[int, int] | None] = {}
        self._how: dict[tuple, tuple] = {}  # signature -> _work_out(...)
        if plan is not None and self._rows is not None:
            self._plans[self._rows.shape[0]] = plan
        self.pending: list[_Held] = []
        self._signature: tuple | None = None
        self._held = 0
        self._out = 0
        self.flushes = 0  # how many batched computations ran (for tests and profiles)

    # ---------------------------------------------------------------------------------------------
    def _rows_host(self, B: int) -> np.ndarray:
        if self._row is not None:
            return np.full((B, 1), self._row, dtype=np.int64)
        if self._rows.shape[0] != B:
            raise ValueError(
                f"rows were given for {self._rows.shape[0]} sample(s), but the attention runs a batch of {B}"
            )
        return self._rows

    def _plan(self, B: int) -> RowPlan:
        plan = self._plans.get(B)
        if plan is None:
            plan = self._plans[B] = RowPlan.build(self._rows_host(B), self.device)
        return plan

    def _span(self, B: int) -> tuple[int, int] | None:
        """(start, R) when every sample's rows are the one contiguous range start..start+R-1 (a view)."""
        if B not in self._spans:
            self._spans[B] = self._find_span(B)
        return self._spans[B]

    def _find_span(self, B: int) -> tuple[int, int] | None:
        rows = self._rows_host(B)
        first = rows[0]
        if (rows < 0).any() or not (rows == first).all():
            return None
        if len(first) > 1 and not (np.diff(first) == 1).all():
            return None
        return int(first[0]), len(first)

    # ---------------------------------------------------------------------------------------------
    def add(self, site, query: torch.Tensor, key: torch.Tensor, mask, scaling, causal: bool) -> None:
        """Hold ``site``'s call (its rows are delivered at a later flush, in call order)."""
        if query.shape[0] != key.shape[0]:  # learned queries broadcast over the batch
            key = key.expand(query.shape[0], *key.shape[1:])
        # per call only what changes between layers is looked at: the rest is worked out once per signature
        signature = (query.shape, key.shape, query.dtype, key.dtype, query.device, scaling, causal, id(mask))
        how = self._how.get(signature)
        if how is None:
            how = self._how[signature] = self._work_out(query, key, scaling)
        span, cost, _, out = how
        if span is None:
            B, H, _, D = query.shape
            query = torch.gather(query, 2, self._plan(B).query_index(B, H, D))  # the rows
        # with a span the whole query is held, and the rows are taken at the flush by one narrow of the stack
        # (a narrow per layer here costs more host time than the stack's extra copy costs the device)
        if self.pending and (
            signature != self._signature or self._held + cost > self.max_bytes or self._out + out > self.max_out_bytes
        ):
            self.flush()
        self.pending.append(_Held(site, query, key, mask))
        self._signature = signature
        self._held += cost
        self._out += out
        if self._held > self.max_bytes or site is self.last:  # alone over the limit (computed now, as a per-layer
            self.flush()  # capture would), or the last expected layer

    def _work_out(self, query, key, scaling) -> tuple[tuple[int, int] | None, int, float, int]:
        """(row span or None, bytes a held call costs, scale, bytes of its probabilities) for calls of this
        signature."""
        B, H, _, D = query.shape
        N = key.shape[2]
        span = self._span(B)
        R = span[1] if span is not None else self._rows_host(B).shape[1]
        rows_bytes = B * H * R * D * query.element_size()
        # with a span the whole query is held (and stacked at the flush), else its gathered rows
        q_cost = _storage_bytes(query) + query.numel() * query.element_size() if span is not None else 2 * rows_bytes
        # held tensors + the flush's stacked copies (keys, queries or rows) + scores in the model's dtype and float32
        cost = q_cost + _storage_bytes(key) + key.numel() * key.element_size()
        cost += B * H * R * N * (query.element_size() + 4)
        return span, cost, float(scaling) if scaling is not None else D**-0.5, B * H * R * N * 4

    def flush(self) -> None:
        """Compute and deliver the held layers' rows (nothing if none are held)."""
        held, self.pending, self._held, self._out = self.pending, [], 0, 0
        if not held:
            return
        self.flushes += 1
        with torch.no_grad():
            e0 = held[0]
            span, _, scale, _ = self._how[self._signature]
            B, H, _, D = e0.q.shape
            Hkv, N = e0.k.shape[1], e0.k.shape[2]
            G, groups = len(held), H // Hkv
            causal = self._signature[6]
            if G == 1:  # the per-layer computation: no stacked copies
                q5, k5 = e0.q, e0.k
            else:
                q5 = torch.stack([e.q for e in held])  # (G, B, H, N | R, D)
                k5 = torch.stack([e.k for e in held])  # (G, B, Hkv, N, D), contiguous
            if span is not None:  # whole queries were held: their rows
                q5 = q5.narrow(-2, span[0], span[1])
            R = q5.shape[-2]
            # (G*B*Hkv, groups*R, D) @ (G*B*Hkv, D, N): head h uses KV head h // groups, as repeat_kv does
            scores = torch.bmm(q5.reshape(G * B * Hkv, groups * R, D), k5.reshape(G * B * Hkv, N, D).transpose(1, 2))
            scores = (scores.float() if scores.dtype != torch.float32 else scores).mul_(scale).view(G, B, H, R, N)
            plan = self._plan(B)
            bias = plan.bias(e0.mask, causal, N)  # (B, 1|H, R, N), broadcast over the group
            if bias is not None:
                scores.add_(bias)
            sites = [e.site for e in held]
            del held, e0, q5, k5
            out = self.sink.target(sites)
            probs = torch.softmax(scores, dim=-1) if out is None else torch.softmax(scores, dim=-1, out=out)
            if plan.invalid is not None:
                probs.masked_fill_(plan.invalid, float("nan"))
            self.sink.put(sites, probs, out is not None)


class SiteLists:
    """A :class:`RowSink` that appends each site's (B, H, N) row ``row`` to ``site.probs`` (vision [CLS]), and
    keeps each flush's (G, B, H, N) block: when one flush delivered every layer, that block *is* the stack of
    the layers' rows (:meth:`stacked`), so the caller need not stack them again."""

    def __init__(self):
        self.blocks: list[tuple[list, torch.Tensor]] = []

    def target(self, sites: list) -> None:
        return None

    def put(self, sites: list, probs: torch.Tensor, written: bool) -> None:
        block = probs[:, :, :, 0]  # (G, B, H, N)
        self.blocks.append((sites, block))
        for site, row in zip(sites, block.unbind(0)):  # one operator for every site's view
            site.probs.append(row)

    def stacked(self, layers: list[int]) -> torch.Tensor | None:
        """The (L, B, H, N) rows of ``layers`` in that order when one flush delivered exactly them, each once."""
        if len(self.blocks) != 1:
            return None
        sites, block = self.blocks[0]
        if [s.layer for s in sites] != list(layers) or any(len(s.probs) != 1 for s in sites):
            return None
        return block
