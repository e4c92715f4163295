"""The one attention function vtrlab runs models under: stock sdpa for the output, plus probes.

Registered in transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``, so masks are
built exactly as for ``"sdpa"``) under :data:`ATTN_NAME`. Outside a probe session it *is* sdpa.
Inside one, each attention module that the session names (a :class:`Site`) may:

* record probabilities for chosen query rows only: ``softmax(q_rows · Kᵀ · scale + mask_rows)`` —
  never the N×N matrix (vision ``"mean"`` mode reduces query chunks as it goes);
* apply a knockout: block edges from chosen key positions to chosen query rows (changes the output,
  on purpose, for the layers asked);
* keep what gradient saliency needs for chosen rows: the rows' probabilities, V, and the attention
  output tensor, so that ``A ⊙ (dO · Vᵀ)`` is formed after ``autograd.grad`` (no N×N).

Probes compose through one session: entering a probe (:class:`session`) *adds* its sites to those
already active (a ContextVar, so threads never share one); several sites may sit on one module.
Per call, the attention function (1) unites the edges every site's mask edit blocks
(``Site.knockout``: any object with ``blocked(query, key) -> (B, Q, N) bool``, which maps its
positions to the running sequence or raises), (2) runs stock sdpa under that mask — as the plain call
(flash path kept) with only the cut query rows recomputed under their mask and spliced in
(:class:`RowSplice`), or, for many cut rows, one call under the full mask —, (3) lets every recording
site keep what it asks for, computed under the same final mask. New site kinds plug in
there: a mask edit (e.g. an in-LM reduction that hides tokens) implements ``blocked``; a recorder
(e.g. rollout) sets ``Site.on_call``, called with ``(site, module, query, key, value, mask, scaling,
causal, out)``. Probes that act on layer outputs rather than attention (logit lens) use a forward
hook and compose automatically, since the forward they observe already runs under the session.
Sequences other than the batch a site was built for are declared with :class:`sequence_map`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

ATTN_NAME = "vtrlab_sdpa"

# The session active in this context (None: plain sdpa). A ContextVar, so threads never share one.
_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("vtrlab_session", default=None)

# Vision "mean" mode reduces the full query range in chunks of this many rows (bounded memory).
_MEAN_CHUNK = 256


@dataclass
class Binding:
    """The batch and sequence a site was built for: ``batch_size`` samples of ``seq_len`` positions,
    and (when known) the batch's ``input_ids``, so that a forward of another batch is refused."""

    batch_size: int
    seq_len: int
    input_ids: torch.Tensor | None = None
    # ``input_ids._version`` when bound by reference (see :meth:`of`); None: ``input_ids`` is a private copy
    ids_version: int | None = None

    @classmethod
    def of(cls, batch_size: int, seq_len: int, input_ids: torch.Tensor | None) -> Binding:
        """Bound to the batch's ``input_ids`` tensor itself, with its in-place version counter: a forward of that
        very tensor, unmodified, is then accepted without comparing tokens (``torch.equal`` is a device sync on
        CUDA). A tensor without a version counter (made under ``inference_mode``) is copied instead."""
        if input_ids is None:
            return cls(batch_size, seq_len)
        try:
            return cls(batch_size, seq_len, input_ids, input_ids._version)
        except RuntimeError:  # inference tensors track no version
            return cls(batch_size, seq_len, input_ids.detach().clone())

    def describe(self) -> str:
        return f"a batch of {self.batch_size} sample(s) x {self.seq_len} positions"

    def check_ids(self, input_ids: torch.Tensor | None, what: str) -> None:
        """Raise unless ``input_ids`` are this binding's (same shape and tokens)."""
        if input_ids is None or self.input_ids is None:
            return
        if tuple(input_ids.shape) != (self.batch_size, self.seq_len):
            raise ValueError(
                f"{what} was built for {self.describe()}, but the model now runs input_ids of shape "
                f"{tuple(input_ids.shape)}; build it for the batch you run (positions are the batch's)"
            )
        if self.ids_version is not None:
            if self.input_ids._version != self.ids_version:
                raise ValueError(
                    f"{what} was built for a batch whose input_ids were modified in place since; build it for "
                    "the batch you run (positions are the batch's)"
                )
            if input_ids is self.input_ids:
                return  # the bound tensor itself, unmodified: the same tokens, no device compare
        if not torch.equal(input_ids.to(self.input_ids.device), self.input_ids):
            raise ValueError(
                f"{what} was built for another batch (same shape {self.batch_size}x{self.seq_len}, other tokens); "
                "build it for the batch you run (positions are the batch's)"
            )


@dataclass
class Knockout:
    """Edges to block at one site: ``queries[b, i] & keys[b, j]`` means query i may not see key j.

    Positions are those of the batch in ``binding``. Run on another sequence, the edges are mapped
    (a reduced sequence: through its ``source_positions``, see :func:`sequence_map`) or refused.
    """

    queries: torch.Tensor  # (B, N) bool
    keys: torch.Tensor  # (B, N) bool
    binding: Binding | None = None

    # (B, N) bool on the host, when the caller knows them (knockout_sites does): the rows the fast path
    # recomputes and, without a model mask, their cut mask and the emptied-row check, with no device sync;
    # filled from ``queries`` / ``keys`` on first use otherwise
    queries_host: Any = None
    keys_host: Any = None

    def host_queries(self):
        """``queries`` as a (B, N) bool numpy array (read once from the device when not given)."""
        if self.queries_host is None:
            self.queries_host = self.queries.detach().cpu().numpy().astype(bool)
        return self.queries_host

    def host_keys(self):
        """``keys`` as a (B, N) bool numpy array (read once from the device when not given)."""
        if self.keys_host is None:
            self.keys_host = self.keys.detach().cpu().numpy().astype(bool)
        return self.keys_host

    def edges(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, Q) bool, (B, N) bool): the query rows and keys of the edges to cut in the sequence now
        running (mapped through a :class:`sequence_map`, or refused); the cut edges are their outer product."""
        B, Q, N = query.shape[0], query.shape[2], key.shape[2]
        bind = self.binding or Binding(self.queries.shape[0], self.queries.shape[1])
        seq = _SEQUENCE.get()
        if seq is not None:
            bind.check_ids(seq.input_ids, "a knockout")
            src = seq.source_positions.to(self.queries.device)
            L = src.shape[1]
            if src.shape[0] != B or src.shape[0] != bind.batch_size:
                raise ValueError(
                    f"a knockout built for {bind.describe()} runs on a reduced batch of {src.shape[0]} sample(s)"
                )
            if Q != L or N != L:
                raise ValueError(
                    _decode_message(bind, Q, N)
                    if N > L
                    else (
                        f"a knockout built for {bind.describe()} runs on a sequence of {Q} queries x {N} keys, "
                        f"but the reduced sequence has {L} columns"
                    )
                )
            if bool((src == APPENDED).any()):
                raise ValueError(
                    f"a knockout built for {bind.describe()} cannot apply to tokens appended after the prompt "
                    "(teacher forcing): they are no position of that batch. Score the prompt's last position "
                    "instead (append=None)"
                )
            valid = src >= 0
            idx = src.clamp(min=0)
            return self.queries.gather(1, idx) & valid, self.keys.gather(1, idx) & valid
        if B != bind.batch_size or Q != bind.seq_len or N != bind.seq_len:
            if Q == 1 and N != 1:
                raise ValueError(_decode_message(bind, Q, N))
            raise ValueError(
                f"a knockout built for {bind.describe()} runs on {B} sample(s) x {Q} queries x {N} keys; "
                "build it for the batch you run (positions are the batch's), or reduce tokens with "
                "vtrlab.reduce (keep masks), which maps the positions"
            )
        return self.queries, self.keys

    def blocked(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(B, Q, N) bool: the edges to cut in the sequence now running (mapped or refused)."""
        q, k = self.edges(query, key)
        return q[:, :, None] & k[:, None, :]


def _decode_message(bind: Binding, Q: int, N: int) -> str:
    return (
        f"a knockout built for {bind.describe()} cannot apply to a cached decode step ({Q} new query over "
        f"{N} cached keys): the generated token is no position of that batch. Measure the cut on the "
        "prompt with vtrlab.knockout (log-probs), or generate outside the knocked_out block"
    )


@dataclass
class Site:
    """What one probe asks of one attention module in the current session.

    Several sites may sit on one module (probes nest): their knockouts are united, and every
    recording site (rows, vision, saliency) sees the attention under the united mask.
    """

    stream: str  # "lm" or "vision"
    layer: int
    rows: torch.Tensor | None = None  # (B, R) long query positions, -1 = padding (lm)
    vision_mode: str | None = None  # "cls" | "mean" (vision); None: record nothing
    cls_index: int = 0
    knockout: Knockout | None = None
    saliency_rows: torch.Tensor | None = None  # (B, R) long, -1 = padding
    store_dtype: torch.dtype = torch.float32
    store_device: torch.device | str = "cpu"
    # lm: where this layer's rows go, a slice of one preallocated CPU buffer (pinned on CUDA, so
    # the copy is asynchronous and overlaps the next layers); head_sel / head_mean applied first.
    out: torch.Tensor | None = None
    head_sel: torch.Tensor | None = None
    head_mean: bool = False
    probe: str = "probe"  # the verb that made the site (for error messages)
    on_call: Callable[..., None] | None = None  # a recorder kind of its own (see the module docstring)
    # a vtrlab.probes.grouped.LayerGroup that computes this site's rows (lm), [CLS] row (vision) or saliency
    # rows together with other layers' (capture, saliency); None: computed as each layer runs
    group: Any = None
    # per-forward constants of ``rows`` / ``saliency_rows`` (one RowPlan shared by the sites of one probe);
    # None: built on first use
    plan: RowPlan | None = None
    # filled during the forward
    probs: list[torch.Tensor] = field(default_factory=list)  # lm: (B, H, R, N); vision: (B, H, N) per call
    # vision, mean over queries: (offset, length) per call. The two below are made when first filled: capture makes
    # a site per probed layer per call, and each container more is an allocation the garbage collector counts (one
    # gen-0 collection cost ~0.12 ms inside capture's call on the H200's host; benchmarks/README.md, session 10)
    segments: list[tuple[int, int]] | tuple = ()
    saliency: dict[str, Any] | None = None

    @property
    def records(self) -> bool:
        """Whether the site keeps something from the forward (as opposed to only changing it)."""
        return (
            self.rows is not None
            or self.vision_mode is not None
            or self.saliency_rows is not None
            or self.on_call is not None
        )


@dataclass
class Session:
    sites: dict[int, list[Site]]  # id(attention module) -> the sites on it, outermost first
    # per-forward constants shared by the layers of a forward (knockout row splices), a few entries at most
    cache: dict = field(default_factory=dict)
    # id(attention module) -> its one site when that site only holds rows for a group (capture's layers): the
    # attention function's short path (no knockout, saliency or callback to look for, per layer and call)
    holds: dict[int, Site] = field(default_factory=dict)


def _only_holds(sites: list[Site]) -> Site | None:
    """The site of ``sites`` when it is the only one and all it does is hold its rows for its group."""
    if len(sites) != 1:
        return None
    s = sites[0]
    plain = s.knockout is None and s.saliency_rows is None and s.on_call is None and s.group is not None
    return s if plain and (s.stream == "lm" and s.rows is not None or s.vision_mode == "cls") else None


def current_session() -> Session | None:
    return _SESSION.get()


class session:
    """Join ``sites`` (id(attention module) -> Site) to the active session for the ``with`` block.

    Probes compose: a site joins those already on its module (knockouts unite; recorders see the
    attention under every knockout). Two recording sites on one module are refused (the outer one
    would also record the inner forward). On exit the previous session is restored exactly, also
    when the body raises.
    """

    def __init__(self, sites: dict[int, Site]):
        self._sites = sites
        self._token = None

    def __enter__(self) -> Session:
        outer = _SESSION.get()
        if outer is None:  # no probe around this one (capture's case): nothing to merge with
            merged = {key: [site] for key, site in self._sites.items()}
        else:
            merged = {k: list(v) for k, v in outer.sites.items()}
            for key, site in self._sites.items():
                here = merged.setdefault(key, [])
                if site.records:
                    clash = next((s for s in here if s.records), None)
                    if clash is not None:
                        raise ValueError(
                            f"{site.probe} inside {clash.probe} on the same attention module ({site.stream} layer "
                            f"{site.layer}) cannot work: the outer probe would record the inner forward too. "
                            "Run them one after the other"
                        )
                here.append(site)
        holds = {key: site for key, site in ((k, _only_holds(v)) for k, v in merged.items()) if site is not None}
        session = Session(merged, holds=holds)
        self._token = _SESSION.set(session)
        return session

    def __exit__(self, *exc) -> None:
        _SESSION.reset(self._token)


APPENDED = -2  # a column of a reduced sequence that holds a token appended after the prompt


@dataclass
class SequenceMap:
    """The sequence the model runs is a reduced one: column j holds position ``source_positions[b, j]``
    of the batch whose ids are ``input_ids`` (-1: padding; :data:`APPENDED`: a token appended after
    the prompt, no position of the batch)."""

    source_positions: torch.Tensor  # (B, L) long
    input_ids: torch.Tensor | None = None


_SEQUENCE: contextvars.ContextVar[SequenceMap | None] = contextvars.ContextVar("vtrlab_sequence", default=None)


class sequence_map:
    """Declare, for the forwards in the block, that the LM runs a reduced sequence (keep masks):
    probes bound to the full batch map their positions through ``source_positions``."""

    def __init__(self, source_positions: torch.Tensor, input_ids: torch.Tensor | None = None):
        self._map = SequenceMap(source_positions, input_ids)
        self._token = None

    def __enter__(self) -> SequenceMap:
        self._token = _SEQUENCE.set(self._map)
        return self._map

    def __exit__(self, *exc) -> None:
        _SEQUENCE.reset(self._token)


# --------------------------------------------------------------------------------------------
# masks


def _is_causal(module, query, attention_mask, is_causal) -> bool:
    """Mirror transformers' sdpa decision: causal only when no mask was built and q_len > 1."""
    flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(query.shape[2] > 1 and attention_mask is None and flag)


def _gather_mask_rows(attention_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B|1, H|1, Q, N) mask -> (B, H|1, R, N) rows (rows: (B, R) non-negative)."""
    B, R = rows.shape
    m = attention_mask
    if m.shape[0] == 1 and B > 1:
        m = m.expand(B, *m.shape[1:])
    idx = rows[:, None, :, None].expand(B, m.shape[1], R, m.shape[3])
    return torch.gather(m, 2, idx)


def to_device(array, device) -> torch.Tensor:
    """A host numpy array as a tensor on ``device``. On CUDA through pinned memory with a non-blocking copy:
    ``torch.as_tensor(array, device="cuda")`` copies from pageable memory and then synchronises the stream,
    i.e. waits for every kernel queued before it (e.g. the previous batch's forward when streaming)."""
    import numpy as np

    t = torch.from_numpy(np.ascontiguousarray(array))
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class RowPlan:
    """Per-forward constants of the row computation for one ``rows`` tensor, built once and shared by
    every layer that records those rows (capture: every LM layer).

    Host-side cost is what makes capture slower than a plain forward when the forward is short (every
    torch call is a kernel launch on a GPU), so per layer only the work that depends on the layer is
    done: the gather of the query rows, one matmul, one in-place scale, one in-place add of the mask
    rows as an additive bias (gathered once per mask, not per layer) and the softmax. ``padded`` is
    known on the host (no device sync to find out)."""

    def __init__(self, rows: torch.Tensor, padded: bool, rows_host=None):
        self.rows = rows
        self.idx = rows.clamp(min=0)
        self.padded = padded
        self.invalid = (rows < 0)[:, None, :, None] if padded else None
        # (B, R) int64 numpy copy of ``rows`` when known on the host (build): lets bias() see, without a
        # device sync, that a causal row sees every key (the last row of unpadded samples: no bias to add)
        self.rows_host = rows_host
        self._qidx: dict[tuple, torch.Tensor] = {}
        # id(mask) -> (mask, bias): the mask is held so that its id cannot be reused within the forward
        self._bias: dict[Any, tuple[Any, torch.Tensor | None]] = {}

    @classmethod
    def build(cls, rows_np, device) -> RowPlan:
        """From host rows (B, R) int64 with -1 padding."""
        import numpy as np

        rows_np = np.asarray(rows_np, dtype=np.int64)
        return cls(to_device(rows_np, device), bool((rows_np < 0).any()), rows_host=rows_np)

    def query_index(self, B: int, H: int, D: int) -> torch.Tensor:
        key = (B, H, D)
        if key not in self._qidx:
            self._qidx[key] = self.idx[:, None, :, None].expand(B, H, self.idx.shape[1], D)
        return self._qidx[key]

    def bias(self, attention_mask: torch.Tensor | None, causal: bool, N: int) -> torch.Tensor | None:
        """(B, 1|H, R, N) float32 additive bias of the rows (0 allowed, -inf blocked), or None."""
        if attention_mask is None:
            if not causal:
                return None
            if self.rows_host is not None and bool((self.rows_host >= N - 1).all()):
                return None  # every row is the last position: the causal mask hides nothing from it
            key: Any = ("causal", N)
        else:
            key = id(attention_mask)
        hit = self._bias.get(key)
        if hit is not None and (attention_mask is None or hit[0] is attention_mask):
            return hit[1]
        if attention_mask is None:
            keep = torch.arange(N, device=self.idx.device)[None, None, :] <= self.idx[:, :, None]
            bias = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))
            bias = bias[:, None]
        else:
            m = _gather_mask_rows(attention_mask, self.idx)
            if m.dtype == torch.bool:
                bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
            else:
                bias = m.to(torch.float32)
        self._bias[key] = (attention_mask, bias)
        return bias


def row_probabilities(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    causal: bool,
    rows: torch.Tensor,
    softcap: float | None = None,
    plan: RowPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of query ``rows`` to every key: (B, H, R, N), float32.

    ``rows`` (B, R) holds sequence positions (index into the query axis); -1 marks padding and
    yields NaN. Handles GQA without repeating K (queries are grouped per KV head instead).
    ``plan``: a :class:`RowPlan` of these rows, shared by the layers of one forward (fewer ops).
    ``out``: a float32 (B, H, R, N) tensor on the same device to write the probabilities into (returned).
    """
    B, H, Q, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    groups = H // Hkv
    R = rows.shape[1]
    if plan is None:
        plan = RowPlan(rows, padded=True)  # unknown on the host: mask padded rows (no sync to find out)
    q_rows = torch.gather(query, 2, plan.query_index(B, H, D))
    if query.shape[0] != key.shape[0]:  # learned queries broadcast over the batch
        key = key.expand(B, *key.shape[1:])
    scale = scaling if scaling is not None else D**-0.5
    # (B*Hkv, groups*R, D) @ (B*Hkv, D, N): head h uses KV head h // groups, as repeat_kv does. One bmm on
    # 3-D views (torch.matmul on 4-D tensors dispatches ~6 more view/expand ops per call to get there)
    k3 = key.reshape(B * Hkv, N, D).transpose(1, 2)  # a view unless K's (B, Hkv) strides cannot merge
    scores = torch.bmm(q_rows.reshape(B * Hkv, groups * R, D), k3)
    scores = (scores.float() if scores.dtype != torch.float32 else scores).mul_(scale).view(B, H, R, N)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    bias = plan.bias(attention_mask, causal, N)
    if bias is not None:
        scores.add_(bias)
    probs = torch.softmax(scores, dim=-1) if out is None else torch.softmax(scores, dim=-1, out=out)
    if plan.invalid is not None:
        probs.masked_fill_(plan.invalid, float("nan"))
    return probs


def _mean_over_queries(module, query, key, attention_mask, scaling, causal, softcap) -> torch.Tensor:
    """Mean over all query rows of the attention probabilities, (B, H, N), computed in chunks."""
    B, _, Q, _ = query.shape
    total = None
    for start in range(0, Q, _MEAN_CHUNK):
        rows = torch.arange(start, min(Q, start + _MEAN_CHUNK), device=query.device)[None].expand(B, -1)
        plan = RowPlan(rows, padded=False)
        p = row_probabilities(module, query, key, attention_mask, scaling, causal, rows, softcap, plan=plan).sum(2)
        total = p if total is None else total + p
    return total / Q


# --------------------------------------------------------------------------------------------
# knockout


def knockout_mask(blocked: torch.Tensor, attention_mask, query, key, causal: bool) -> torch.Tensor:
    """The mask sdpa should use with the ``blocked`` (B, Q, N) edges removed (bool, or additive in
    the mask's dtype)."""
    Q, N = query.shape[2], key.shape[2]
    blocked = blocked.to(query.device)[:, None]
    if attention_mask is None:
        if causal:
            base = torch.ones(Q, N, dtype=torch.bool, device=query.device).tril()[None, None]
        else:
            base = torch.ones(1, 1, Q, N, dtype=torch.bool, device=query.device)
        before, new = base, base & ~blocked
    elif attention_mask.dtype == torch.bool:
        before, new = attention_mask, attention_mask & ~blocked
    else:
        floor = torch.finfo(attention_mask.dtype).min
        new = attention_mask.masked_fill(blocked, floor)
        before, new_allowed = attention_mask > floor / 2, new > floor / 2
    allowed = new if new.dtype == torch.bool else new_allowed
    # rows that had keys before the cut must keep one (pad rows may have none to begin with)
    emptied = before.any(-1) & ~allowed.any(-1)  # (B|1, H|1, Q)
    if bool(emptied.any()):
        bad = torch.nonzero(emptied)[0].tolist()
        raise ValueError(
            f"knockout leaves query row {bad[-1]} (sample {bad[0]}) with no key to attend to; "
            "keep at least one key visible to every blocked query row"
        )
    return new


# Knocked-out rows are recomputed (and spliced into the plain output) only while they are at most this
# share of the query rows; beyond it one masked sdpa over every row is cheaper.
_SPLICE_MAX_SHARE = 0.5
_SPLICE_CACHE_SIZE = 8
# A cut layer of a forward without a model mask whose full cut mask has at most this many entries (B x Q x N)
# runs as one sdpa under that mask (:class:`CutMask`, built once per forward) instead of a splice. Such a forward
# is short and host-bound (LLaVA-1.5-7B at 617 tokens, batch 1: ~30 ms of which the H200 is busy ~20), so the
# splice's extra operators a layer (gather, a second sdpa, its transpose, scatter) cost their full host dispatch,
# while the masked kernel's extra device time hides in the GPU's idle gaps. Longer or larger batches keep the
# splice: there the device is the bottleneck and the flash path over every other row pays (benchmarks/flow.py).
_FULL_MASK_MAX_ELEMENTS = 2**21
_STRICT_UPPER: dict[tuple, torch.Tensor] = {}  # (N, device) -> (N, N) bool, key j > query i (a few entries)


class CutMask:
    """Knockout as one sdpa under the full cut mask, for every row of a cut layer.

    The mask is additive in the query's dtype (``0`` / ``-inf``, what sdpa converts a bool one to), built on
    the device once per forward and mask shape, with rows aligned to 8 elements (the memory-efficient CUDA
    kernel pads an unaligned mask on every call); only for forwards without a model mask (causal or full
    attention: an unpadded batch). Whether a cut leaves a row without a key is decided on the host from the
    knockouts' host copies, so building it needs no device sync.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask  # (B, 1, N, N) additive, the query's dtype

    @staticmethod
    def check_rows_keep_a_key(knockouts, causal: bool) -> None:
        """Raise if the cut leaves a query row with no key (as :func:`knockout_mask` does), from the host copies.

        A row's blocked keys are the union of the keys of the knockouts that cut it; rows are grouped by which
        knockouts cut them, so the check is O(knockouts x N) per sample, not O(N^2)."""
        import numpy as np

        if len(knockouts) == 1:  # the common case, vectorised over the samples
            q, k = (
                np.asarray(knockouts[0].host_queries(), dtype=bool),
                ~np.asarray(knockouts[0].host_keys(), dtype=bool),
            )
            first_row, first_free = q.argmax(1), k.argmax(1)
            bad = q.any(1) & (~k.any(1) | (causal & (first_free > first_row)))
            if bad.any():
                b = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"knockout leaves query row {int(first_row[b])} (sample {b}) with no key to attend to; "
                    "keep at least one key visible to every blocked query row"
                )
            return
        qs = np.stack([np.asarray(ko.host_queries(), dtype=bool) for ko in knockouts])  # (K, B, N)
        ks = np.stack([np.asarray(ko.host_keys(), dtype=bool) for ko in knockouts])
        weights = (np.int64(1) << np.arange(len(knockouts), dtype=np.int64))[:, None]
        for b in range(qs.shape[1]):
            codes = (qs[:, b] * weights).sum(0)  # (N,) which knockouts cut each row
            emptied = []
            for code in np.unique(codes[codes > 0]):
                which = (int(code) >> np.arange(len(knockouts))) & 1 == 1
                free = np.flatnonzero(~ks[which, b].any(0))  # keys no cut of these rows blocks
                first_row = int(np.flatnonzero(codes == code)[0])
                # causal: row r keeps a key iff a free key j <= r; the code's first row is the one to fail first
                if free.size == 0 or (causal and free[0] > first_row):
                    emptied.append(first_row)
            if emptied:
                raise ValueError(
                    f"knockout leaves query row {min(emptied)} (sample {b}) with no key to attend to; "
                    "keep at least one key visible to every blocked query row"
                )

    @classmethod
    def build(cls, knockouts, causal: bool, B: int, N: int, device, dtype) -> CutMask:
        cls.check_rows_keep_a_key(knockouts, causal)
        blocked = None
        for ko in knockouts:
            b_ = ko.queries[:, :, None] & ko.keys[:, None, :]  # (B, N, N)
            blocked = b_ if blocked is None else blocked | b_
        if causal:
            blocked = blocked | _strict_upper(N, torch.device(device))
        aligned = -(-N // 8) * 8
        mask = torch.zeros(B, 1, N, aligned, dtype=dtype, device=device)[..., :N]
        return cls(mask.masked_fill_(blocked[:, None], float("-inf")))


def _strict_upper(N: int, device: torch.device) -> torch.Tensor:
    key = (N, device)
    hit = _STRICT_UPPER.get(key)
    if hit is None:
        hit = torch.ones(N, N, dtype=torch.bool, device=device).triu_(1)
        if len(_STRICT_UPPER) >= 4:
            _STRICT_UPPER.pop(next(iter(_STRICT_UPPER)))
        _STRICT_UPPER[key] = hit
    return hit


class RowSplice:
    """Knockout as plain sdpa + the knocked rows recomputed under an explicit mask.

    Cutting edges into query rows ``Q`` changes, at the cut layer, only rows ``Q`` of the attention output.
    So the output is the stock sdpa output of the unchanged call (causal flash path kept) with rows ``Q``
    replaced by sdpa of those rows alone under their cut mask: the same values as one sdpa under the full
    cut mask, up to float rounding (tests/flow: equal to a float64 eager reference). Built once per
    forward and mask (shared by every cut layer): the rows (known on the host, so no device sync), the
    rows' cut mask, and the check that no row is left without a key. Without a model mask (causal or full
    attention: an unpadded batch) the cut mask and the check are computed on the host from the knockouts'
    host copies and copied once (pinned, no sync), as the additive mask sdpa would convert a bool one to
    (``0`` / ``-inf`` in the query's dtype, so the same values), stored with rows aligned to 8 elements
    (the memory-efficient CUDA kernel pads an unaligned mask on every call); with a model mask they are
    device ops and the check is one sync per forward, not per layer. Per cut layer: the gather of the query
    rows, one sdpa of those rows, one scatter into the output (their index tensors built once).
    """

    def __init__(self, rows: torch.Tensor, mask: torch.Tensor):
        self.rows = rows  # (B, R) long, sequence positions (a sample with fewer rows repeats one of its own)
        self.mask = mask  # (B, 1|H, R, N): the rows' cut mask, bool or additive like the model's mask
        self._index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (B, H, D, Hout, Dv) -> gather, scatter

    @staticmethod
    def _host_mask(knockouts, rows_np, causal: bool, N: int):
        """(B, 1, R, N) bool: the rows' allowed keys without a model mask (causal or full), the cut edges
        removed; raises if a row is left without a key (as the device check does)."""
        import numpy as np

        B, R = rows_np.shape
        sample = np.arange(B)[:, None]
        blocked = np.zeros((B, R, N), dtype=bool)
        for ko in knockouts:
            q = np.asarray(ko.host_queries(), dtype=bool)[sample, rows_np]  # (B, R)
            blocked |= q[:, :, None] & np.asarray(ko.host_keys(), dtype=bool)[:, None, :]
        if causal:
            allowed = np.arange(N)[None, None, :] <= rows_np[:, :, None]
            allowed &= ~blocked
        else:
            allowed = ~blocked
        emptied = ~allowed.any(-1)  # every row sees at least key 0 before the cut
        if emptied.any():
            b, r = (int(i[0]) for i in np.nonzero(emptied))
            raise ValueError(
                f"knockout leaves query row {int(rows_np[b, r])} (sample {b}) with no key to attend to; "
                "keep at least one key visible to every blocked query row"
            )
        return allowed[:, None]

    @classmethod
    def build(
        cls, knockouts, attention_mask, causal: bool, B: int, Q: int, N: int, device, dtype=torch.float32
    ) -> RowSplice | None:
        """None when the rows are too many for a splice to pay off (the caller masks every row instead).
        ``dtype``: the query's (an additive mask must match it)."""
        import numpy as np

        host = None
        for ko in knockouts:
            h = np.asarray(ko.host_queries(), dtype=bool)
            host = h if host is None else host | h
        if host.shape != (B, Q):
            return None
        counts = host.sum(1)
        R = int(counts.max())
        if R == 0 or R > _SPLICE_MAX_SHARE * Q:
            return None
        rows_np = np.zeros((B, R), dtype=np.int64)
        for b in range(B):
            r = np.flatnonzero(host[b])
            rows_np[b, : len(r)] = r
            rows_np[b, len(r) :] = r[0] if len(r) else 0  # a duplicate writes the same values twice
        rows = to_device(rows_np, device)  # pinned, no sync
        if attention_mask is None:  # (the caller passes plain Knockouts only)
            allowed = cls._host_mask(knockouts, rows_np, causal, N)
            aligned = -(-N // 8) * 8
            additive = np.zeros((B, 1, R, aligned), dtype=np.float32)
            additive[..., :N][~allowed] = -np.inf
            return cls(rows, to_device(additive, device).to(dtype)[..., :N])
        blocked = None
        for ko in knockouts:
            b_ = ko.queries.gather(1, rows)[:, :, None] & ko.keys[:, None, :]  # (B, R, N)
            blocked = b_ if blocked is None else blocked | b_
        blocked = blocked[:, None]  # (B, 1, R, N)
        if attention_mask is None:
            if causal:
                before = (torch.arange(N, device=device)[None, None, :] <= rows[:, :, None])[:, None]
            else:
                before = torch.ones(B, 1, R, N, dtype=torch.bool, device=device)
            mask = after = before & ~blocked
        else:
            m = _gather_mask_rows(attention_mask, rows)
            if m.dtype == torch.bool:
                before, mask = m, m & ~blocked
                after = mask
            else:
                floor = torch.finfo(m.dtype).min
                mask = m.masked_fill(blocked, floor)
                before, after = m > floor / 2, mask > floor / 2
        emptied = before.any(-1) & ~after.any(-1)  # (B, 1|H, R)
        if bool(emptied.any()):
            b, _, r = torch.nonzero(emptied)[0].tolist()
            raise ValueError(
                f"knockout leaves query row {int(rows_np[b, r])} (sample {b}) with no key to attend to; "
                "keep at least one key visible to every blocked query row"
            )
        return cls(rows, mask)

    def apply(self, sdpa, module, query, key, value, out, dropout, scaling, kwargs) -> torch.Tensor:
        """``out`` (B, Q, H, D), the plain output, with the rows replaced by their cut attention."""
        B, H, _, D = query.shape
        shape = (B, H, D, out.shape[2], out.shape[3])
        hit = self._index.get(shape)
        if hit is None:
            R = self.rows.shape[1]
            hit = self._index[shape] = (
                self.rows[:, None, :, None].expand(B, H, R, D),
                self.rows[:, :, None, None].expand(B, R, out.shape[2], out.shape[3]),
            )
        gather_index, index = hit
        q_rows = torch.gather(query, 2, gather_index)
        rows_out, _ = sdpa(
            module, q_rows, key, value, self.mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )  # (B, R, H, Dv)
        if torch.is_grad_enabled() and (out.requires_grad or rows_out.requires_grad):
            return out.scatter(1, index, rows_out)  # autograd: out may be saved by sdpa's backward
        return out.scatter_(1, index, rows_out)


def _cut_plan(sess: Session, knockouts, attention_mask, causal: bool, query, key) -> RowSplice | CutMask | None:
    """How the session's cut layers run these knockouts under this mask (worked out on the first cut layer of
    a forward and shared by the others): a :class:`CutMask` for a small forward without a model mask, else a
    :class:`RowSplice`; None where neither applies (reduced sequences, mask shapes of another kind, too many
    rows for a splice): then the caller builds the full cut mask layer by layer."""
    if not all(type(ko) is Knockout for ko in knockouts) or _SEQUENCE.get() is not None:
        return None
    B, Q, N = query.shape[0], query.shape[2], key.shape[2]
    if Q != N or (attention_mask is not None and tuple(attention_mask.shape[-2:]) != (Q, N)):
        return None
    mask_key = ("causal" if causal else "full", N) if attention_mask is None else id(attention_mask)
    cache_key = (tuple(id(ko) for ko in knockouts), mask_key, B, Q, N, query.device, query.dtype)
    hit = sess.cache.get(cache_key)
    # the entry holds the mask and the knockouts, so their ids cannot be reused while it lives
    if hit is not None and hit[0] is attention_mask:
        return hit[2]
    if attention_mask is None and B * Q * N <= _FULL_MASK_MAX_ELEMENTS:
        plan = CutMask.build(knockouts, causal, B, N, query.device, query.dtype)
    else:
        plan = RowSplice.build(knockouts, attention_mask, causal, B, Q, N, query.device, query.dtype)
    if len(sess.cache) >= _SPLICE_CACHE_SIZE:
        sess.cache.pop(next(iter(sess.cache)))
    sess.cache[cache_key] = (attention_mask, tuple(knockouts), plan)
    return plan


# --------------------------------------------------------------------------------------------
# the registered function


_STOCK_SDPA = None


def _stock_sdpa():
    """transformers' sdpa attention function (imported once, not on every attention call)."""
    global _STOCK_SDPA
    if _STOCK_SDPA is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _STOCK_SDPA = sdpa_attention_forward
    return _STOCK_SDPA


def vtrlab_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    sess = _SESSION.get()
    sdpa_attention_forward = _STOCK_SDPA or _stock_sdpa()
    if sess is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    module_id = id(module)
    held = sess.holds.get(module_id)
    if held is not None:  # the common case of capture, kept short (it runs for every layer of every call)
        if kwargs:
            _refuse_unsupported(module, kwargs)
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
        # as _is_causal, inline; the group compares everything but the shapes at its flush
        flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        held.group.add(
            held, query, key, attention_mask, scaling, bool(query.shape[2] > 1 and attention_mask is None and flag)
        )
        return out, None
    here = sess.sites.get(module_id)
    if not here:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    _refuse_unsupported(module, kwargs)
    causal = _is_causal(module, query, attention_mask, is_causal)
    mask = attention_mask
    knockouts = [s.knockout for s in here if s.knockout is not None]
    out = None
    if knockouts:
        for ko in knockouts:
            ko.edges(query, key)  # refuses another batch, sequence or a decode step, with its message
        plan = _cut_plan(sess, knockouts, attention_mask, causal, query, key)
        if type(plan) is CutMask:  # one sdpa under the full cut mask, built once per forward (below)
            mask = plan.mask
        else:
            if plan is not None:  # a RowSplice
                # the output: plain sdpa (flash path kept), the cut rows recomputed and spliced in
                out, _ = sdpa_attention_forward(
                    module,
                    query,
                    key,
                    value,
                    attention_mask,
                    dropout=dropout,
                    scaling=scaling,
                    is_causal=is_causal,
                    **kwargs,
                )
                out = plan.apply(sdpa_attention_forward, module, query, key, value, out, dropout, scaling, kwargs)
                if not any(s.records for s in here):
                    return out, None
            blocked = knockouts[0].blocked(query, key)
            for ko in knockouts[1:]:
                blocked = blocked | ko.blocked(query, key)  # nested knockouts: the union of their edges
            # the full cut mask: what sdpa runs under without a splice, and what recorders see with one
            mask = knockout_mask(blocked, attention_mask, query, key, causal)
        causal = False  # the causal pattern is now inside the mask
    if out is None:
        out, _ = sdpa_attention_forward(
            module,
            query,
            key,
            value,
            mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=(False if knockouts else is_causal),
            **kwargs,
        )
    for site in here:
        if site.records:
            _record(site, module, query, key, value, mask, scaling, causal, out)
    return out, None


_COPY_STREAMS: dict[int, Any] = {}


def copy_stream(device) -> Any:
    """The side CUDA stream that capture's device-to-host row copies run on (one per device)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _COPY_STREAMS.get(index)
    if stream is None:
        stream = _COPY_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def copy_to_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; from CUDA into pinned ``dst``, asynchronously on :func:`copy_stream`.

    On the compute stream, each layer's copy (at LLaVA-NeXT's 2,969 keys, 22 question rows x 32 heads:
    8 MiB a layer, 0.27 GiB a forward) ran between that layer's kernels and the next layer's, so the
    forward waited for every copy; on a side stream the copy engine works while the next layers run.
    ``src`` is kept from reuse until its copy has run (``record_stream``); the caller waits for the
    stream (an event recorded on it) before reading ``dst``.
    """
    if src.device.type != "cuda" or dst.device == src.device:
        dst.copy_(src)
        return
    stream = copy_stream(src.device)
    stream.wait_stream(torch.cuda.current_stream(src.device))  # src is complete before it is copied
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
    src.record_stream(stream)


def _plan_for(site: Site, rows: torch.Tensor) -> RowPlan:
    """The site's plan for ``rows`` (the probe's shared one, or one built here on first use)."""
    if site.plan is None or site.plan.rows is not rows:
        site.plan = RowPlan(rows, padded=True)  # padding unknown on the host: masked (no sync to find out)
    return site.plan


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.requires_grad else t  # (a detach is one more dispatched op per call)


def _hold(site: Site, query, key, mask, scaling, causal) -> None:
    """Hold this call's rows for ``site``'s group (vtrlab.probes.grouped): no operator now."""
    site.group.add(site, _detached(query), _detached(key), mask, scaling, causal)


def _refuse_unsupported(module, kwargs: dict) -> None:
    """Raise for what a probed module passes that sdpa-based probes cannot honour."""
    softcap = kwargs.get("softcap")
    if softcap is not None:
        raise ValueError(
            f"{type(module).__name__} uses attention logit softcapping ({softcap}); sdpa (and so vtrlab "
            "capture) does not support it — run this model with attn_implementation='eager'"
        )
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"{type(module).__name__} passes a position_bias; vtrlab capture does not support it yet")


def _record(site: Site, module, query, key, value, mask, scaling, causal, out) -> None:
    """Keep what ``site`` asks for from this call (probabilities under ``mask``, the final one)."""
    if site.group is not None and (site.stream == "lm" and site.rows is not None or site.vision_mode == "cls"):
        _hold(site, query, key, mask, scaling, causal)
    elif site.rows is not None or site.vision_mode is not None:
        _record_rows(site, module, query, key, mask, scaling, causal)
    if site.saliency_rows is not None:
        # A for the rows, V and the output tensor: dL/dA[r, k] = dO[r] · V[k] is formed after the
        # backward pass (vtrlab.flow.saliency, under no_grad), so only (B, H, R, N) is ever materialised.
        # No detach: under no_grad nothing is recorded (each detach is one more dispatched op per layer).
        site.saliency = {"value": value, "output": out, "rows": site.saliency_rows}
        if site.group is not None:  # "probs" filled in by the group's flush (vtrlab.probes.grouped)
            site.group.add(site, query, key, mask, scaling, causal)
        else:
            plan = _plan_for(site, site.saliency_rows)
            with torch.no_grad():
                site.saliency["probs"] = row_probabilities(
                    module, query, key, mask, scaling, causal, site.saliency_rows, plan=plan
                )
    if site.on_call is not None:
        site.on_call(site, module, query, key, value, mask, scaling, causal, out)


def _record_rows(site: Site, module, query, key, mask, scaling, causal) -> None:
    """The rows (lm) or vision [CLS] / mean row ``site`` asks for, computed for this call alone."""
    with torch.no_grad():
        if site.stream == "lm" and site.rows is not None:
            plan = _plan_for(site, site.rows)
            q, k = _detached(query), _detached(key)
            # the rows go straight into the site's buffer slice when it is a float32 one on the same device
            # (capture's CPU buffer, or its device staging buffer on CUDA): no temporary, no copy
            direct = (
                site.out is not None
                and site.head_sel is None
                and not site.head_mean
                and site.out.dtype == torch.float32
                and site.out.device == query.device
            )
            p = row_probabilities(
                module, q, k, mask, scaling, causal, site.rows, plan=plan, out=site.out if direct else None
            )
            if site.head_sel is not None:
                p = p.index_select(1, site.head_sel.to(p.device))
            if site.head_mean:
                p = p.mean(1)
            if site.out is not None:
                if not direct:
                    copy_to_host(site.out, p)  # converts to the buffer's dtype
                site.probs.append(site.out)
            else:
                site.probs.append(p.to(site.store_device, site.store_dtype))
        elif site.stream == "vision" and site.vision_mode is not None:
            q, k = _detached(query), _detached(key)
            if site.vision_mode == "cls":
                B = q.shape[0]
                if site.plan is None or site.plan.rows.shape[0] != B:
                    rows = torch.full((B, 1), site.cls_index, device=q.device, dtype=torch.long)
                    site.plan = RowPlan(rows, padded=False)
                p = row_probabilities(module, q, k, mask, scaling, causal, site.plan.rows, plan=site.plan)[:, :, 0]
            else:
                p = _mean_over_queries(module, q, k, mask, scaling, causal, None)
            offset = sum(n for _, n in site.segments)
            site.segments = [*site.segments, (offset, k.shape[2])]
            site.probs.append(p.to(site.store_device, site.store_dtype))


def register() -> str:
    """Register :data:`ATTN_NAME` (idempotent); masks are built as for sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, vtrlab_sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
