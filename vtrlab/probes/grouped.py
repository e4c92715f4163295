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
batch 8 every layer flushes alone, which is the per-layer computation), when its probabilities would pass
``max_out_bytes``, at the caller's ``last`` layer, and when the caller says so after the forward
(:meth:`LayerGroup.flush`). A flush computes the held calls of each signature (shapes, dtypes, device,
scale, causality, mask object: Gemma-3's sliding and global layers are two) together. Per call, inside the
forward, only the shapes are compared; the rest of the signature is compared at the flush, where the host's
caches are warm (on the H200 host the per-layer hold cost ~13 µs of Python that a tight loop runs in ~2.6).

The arithmetic is that of :func:`vtrlab.probes.attention.row_probabilities` (scores in the model's dtype,
scaled and softmaxed in float32), so a grouped capture equals a per-layer one up to the float rounding
of a batched matmul (tests/probes/test_capture_grouped.py, against float64 references and the per-layer
path). Only for forwards without a KV cache (capture runs ``use_cache=False``): a held key that a cache
updated in place would be read after the update.
"""

from __future__ import annotations

from typing import Protocol

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
        if plan is not None and self._rows is not None:
            self._plans[self._rows.shape[0]] = plan
        # held calls: (site, query or its rows, key, mask, scaling, causal, row span or None), in call order
        self.pending: list[tuple] = []
        self._held = 0
        self._out = 0
        # what :meth:`add` worked out for calls of the last call's query and key shapes (see _learn)
        self._qshape = self._kshape = None
        self._index: torch.Tensor | None = None  # the rows' gather index (None: the whole query is held)
        self._span: tuple[int, int] | None = None
        self._cost = self._out_cost = 0
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

    def _span_of(self, B: int) -> tuple[int, int] | None:
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
        """Hold ``site``'s call (its rows are delivered at a later flush).

        This runs for every layer inside the forward, where the host's caches are cold, so per call only the
        query and key shapes are compared with the last call's; what follows from the shapes (the rows' span
        or gather index, the bytes a held call costs) is worked out once per shape, and the rest of a call's
        signature (dtypes, device, scale, causality, mask) is compared at the flush, which computes the calls
        of each signature together."""
        if query.shape != self._qshape or key.shape != self._kshape:
            key = self._learn(query, key)
        if self._index is not None:
            query = torch.gather(query, 2, self._index)  # the rows; with a span the whole query is held and
            # its rows taken at the flush by one narrow of the stack (a narrow per layer here costs more host
            # time than the stack's extra copy costs the device)
        cost, out = self._cost, self._out_cost
        if self.pending and (self._held + cost > self.max_bytes or self._out + out > self.max_out_bytes):
            self.flush()
        self.pending.append((site, query, key, mask, scaling, causal, self._span))
        self._held += cost
        self._out += out
        if self._held > self.max_bytes or site is self.last:  # alone over the limit (computed now, as a per-layer
            self.flush()  # capture would), or the last expected layer

    def _learn(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Work out what calls of ``query``'s and ``key``'s shapes need (:meth:`add`'s per-shape state); returns
        the key to hold (broadcast over the batch for learned queries, whose calls then always come here)."""
        qshape, kshape = query.shape, key.shape
        if query.shape[0] != key.shape[0]:  # learned queries broadcast over the batch
            key = key.expand(query.shape[0], *key.shape[1:])
            qshape = None  # never the per-shape state: every call expands its key
        B, H, _, D = query.shape
        span, cost, out = self._work_out(query, key)
        self._qshape, self._kshape, self._span, self._cost, self._out_cost = qshape, kshape, span, cost, out
        self._index = None if span is not None else self._plan(B).query_index(B, H, D)
        return key

    def _work_out(self, query, key) -> tuple[tuple[int, int] | None, int, int]:
        """(row span or None, bytes a held call costs, bytes of its probabilities) for calls of these shapes."""
        B, H, _, D = query.shape
        N = key.shape[2]
        span = self._span_of(B)
        R = span[1] if span is not None else self._rows_host(B).shape[1]
        rows_bytes = B * H * R * D * query.element_size()
        # with a span the whole query is held (and stacked at the flush), else its gathered rows
        q_cost = _storage_bytes(query) + query.numel() * query.element_size() if span is not None else 2 * rows_bytes
        # held tensors + the flush's stacked copies (keys, queries or rows) + scores in the model's dtype and float32
        cost = q_cost + _storage_bytes(key) + key.numel() * key.element_size()
        cost += B * H * R * N * (query.element_size() + 4)
        return span, cost, B * H * R * N * 4

    def flush(self) -> None:
        """Compute and deliver the held layers' rows (nothing if none are held): one batched computation per
        signature among them (shapes, dtypes, device, scale, causality, mask object: the layers of one
        computation share one bias), each in call order."""
        held, self.pending, self._held, self._out = self.pending, [], 0, 0
        if not held:
            return
        runs: dict[tuple, list[tuple]] = {}
        for call in held:
            q, k = call[1], call[2]
            signature = (q.shape, k.shape, q.dtype, k.dtype, q.device, call[4], call[5], id(call[3]), call[6])
            run = runs.get(signature)
            if run is None:
                runs[signature] = [call]
            else:
                run.append(call)
        del held
        for run in runs.values():
            self._compute(run)

    def _compute(self, held: list[tuple]) -> None:
        """The rows of ``held`` calls of one signature, in one batched computation, delivered to the sink."""
        self.flushes += 1
        with torch.no_grad():
            _, q0, k0, mask, scaling, causal, span = held[0]
            B, H, _, D = q0.shape
            Hkv, N = k0.shape[1], k0.shape[2]
            G, groups = len(held), H // Hkv
            scale = float(scaling) if scaling is not None else D**-0.5
            if G == 1:  # the per-layer computation: no stacked copies
                q5, k5 = q0, k0
            else:
                q5 = torch.stack([c[1] for c in held])  # (G, B, H, N | R, D)
                k5 = torch.stack([c[2] for c in held])  # (G, B, Hkv, N, D), contiguous
            if span is not None:  # whole queries were held: their rows
                q5 = q5.narrow(-2, span[0], span[1])
            R = q5.shape[-2]
            # (G*B*Hkv, groups*R, D) @ (G*B*Hkv, D, N): head h uses KV head h // groups, as repeat_kv does
            scores = torch.bmm(q5.reshape(G * B * Hkv, groups * R, D), k5.reshape(G * B * Hkv, N, D).transpose(1, 2))
            scores = (scores.float() if scores.dtype != torch.float32 else scores).mul_(scale).view(G, B, H, R, N)
            if self._row is not None and self._row >= 0 and mask is None and not causal:
                # one row of every sequence, every key allowed (CLIP's [CLS]): no bias and no padding, so no
                # plan (building one copies the rows to the device: a pinned copy inside the forward)
                bias = invalid = None
            else:
                plan = self._plan(B)
                bias, invalid = plan.bias(mask, causal, N), plan.invalid  # (B, 1|H, R, N), broadcast over the group
            if bias is not None:
                scores.add_(bias)
            sites = [c[0] for c in held]
            del held, q0, k0, q5, k5
            out = self.sink.target(sites)
            probs = torch.softmax(scores, dim=-1) if out is None else torch.softmax(scores, dim=-1, out=out)
            if invalid is not None:
                probs.masked_fill_(invalid, float("nan"))
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
