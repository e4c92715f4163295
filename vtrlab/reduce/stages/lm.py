"""Image tokens really removed from the LM sequence from layer K on (FastV, PyramidDrop, ... ).

Mechanism: forward pre-hooks on the decoder layers (installed for the duration of a ``with``
block, removed in ``finally``). At a stage layer K the method scores the image tokens still in
the sequence, and the hook slices **everything the layers from K on see**, consistently:

* the hidden states (the columns of removed tokens are gone; later layers run on fewer columns,
  so prefill really gets cheaper, and the KV cache of layers >= K holds only the survivors);
* the rotary position embeddings and ``position_ids`` (kept tokens keep their ids — method policy
  ``"kept"`` — or are recounted over the survivors — ``"renumbered"``, 1-D positions only);
* the attention mask, gathered from the mask the model built (so Gemma3's bidirectional image
  blocks, sliding windows and padding stay exactly the model's own) and, during cached decoding,
  the key columns of each layer's shortened cache.

Samples of a batch may drop different numbers of tokens (different image token counts); the
shortened sequence then keeps, for the samples that dropped more, a few removed columns as
*dummies*: present but hidden from every query as keys (so they change nothing; they cost compute).

Scores come from one forward, never eager attention: ``probe.prev_rows()`` is layer K-1's
attention of chosen query rows recorded by a probe site during the real forward (as capture does);
``probe.rows()`` recomputes layer K's attention rows on its input (one extra attention call at
that layer, output discarded). Methods see only the image tokens still present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...models.base import Batch
from ..context import budgets, lm_layer_index
from ..registry import MROPE_FAMILIES, Method, uses_mrope  # noqa: F401  (re-exported)


class LMMethod(Method):
    """Base of methods that prune inside the LM. Subclasses implement :meth:`lm_layers`,
    :meth:`lm_score` and optionally :meth:`lm_schedule` / :meth:`lm_keep`."""

    stage = "lm"
    exact_budget = True  # False: lm_keep decides how many survive (adaptive methods; schedule unused)
    needs_prev_rows = False  # score from layer K-1's attention rows recorded in the forward
    needs_prev_input = False  # score from layer K-1's input (e.g. its keys, recomputed)
    has_pre_lm = False  # True: the method also acts before the LM (``pre_select``; MustDrop's tower merge)

    def pre_select(self, ctx: Any, n_keep: Sequence[int]) -> Any:
        """The pre-LM stage of a method with ``has_pre_lm``: a :class:`vtrlab.reduce.Selection` of the
        image tokens entering the LM (``embeds`` may hold them in the method's LM order, with
        ``info["content"][i]`` the layout token whose content each kept slot holds; see :func:`pre_lm`)."""
        raise NotImplementedError(f"method {self.name!r} has no pre-LM stage")

    def lm_layers(self, vlm: Any) -> list[int]:
        raise NotImplementedError

    def lm_schedule(self, n_image: int, n_final: int) -> list[int]:
        """Image tokens left after each stage (last = the budget). Default: geometric steps from
        ``n_image`` to ``n_final`` over the stages (one stage: the budget)."""
        n_st = len(self._layers)
        ratio = n_final / n_image if n_image else 1.0
        steps = [int(round(n_image * ratio ** ((j + 1) / n_st))) for j in range(n_st)]
        steps[-1] = n_final
        return steps

    def query_rows(self, state: RemovalState) -> list[np.ndarray]:
        """Per sample, the current columns whose layer K-1 attention rows are recorded (needs_prev_rows).
        Default: the last prompt token."""
        cols = state.cols.cpu().numpy()
        return [np.flatnonzero(cols[i] == state.prompt_len - 1) for i in range(cols.shape[0])]

    def lm_score(self, probe: StageProbe, stage: int) -> list[np.ndarray]:
        """Per sample, one score per image token still present (in layout order)."""
        raise NotImplementedError

    def lm_keep(self, probe: StageProbe, stage: int, scores: list[np.ndarray], n_keep: list[int]) -> list[np.ndarray]:
        """Per sample, bool over the present image tokens: the top ``n_keep`` by score (ties: lower index)."""
        from ..context import top_k_mask

        return [top_k_mask(s, k) for s, k in zip(scores, n_keep)]

    def layers_checked(self, vlm: Any) -> list[int]:
        layers = [lm_layer_index(vlm, int(k), what=f"{self.name} layer") for k in self.lm_layers(vlm)]
        if any(k < 1 for k in layers):
            raise ValueError(
                f"method {self.name!r}: pruning layer must be >= 1 (tokens enter at layer 0); got {layers}"
            )
        if sorted(set(layers)) != layers:
            raise ValueError(f"method {self.name!r}: layers {layers} must be strictly increasing")
        self._layers = layers
        return layers


def _expand_batch(t: torch.Tensor, bsz: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == bsz:
        return t
    shape = list(t.shape)
    shape[dim] = bsz
    return t.expand(*shape)


def _gather_seq(t: torch.Tensor, idx: torch.Tensor, seq_dim: int, batch_dim: int) -> torch.Tensor:
    """Gather ``t`` along ``seq_dim`` with per-sample ``idx`` (B, L') (batch along ``batch_dim``)."""
    bsz = idx.shape[0]
    t = _expand_batch(t, bsz, batch_dim)
    seq_dim = seq_dim % t.dim()
    batch_dim = batch_dim % t.dim()
    view = [1] * t.dim()
    view[batch_dim] = bsz
    view[seq_dim] = idx.shape[1]
    shape = list(t.shape)
    shape[seq_dim] = idx.shape[1]
    return torch.gather(t, seq_dim, idx.view(view).expand(shape))


@dataclass
class StageProbe:
    """What a method sees at stage layer K (prefill): the hidden states entering layer K and the
    image tokens still present, with helpers for attention rows."""

    state: RemovalState
    layer: int
    hidden: torch.Tensor  # (B, L_cur, D), the input to layer K
    kwargs: dict  # the layer's keyword arguments, already sliced to the present columns
    image_tokens: list[np.ndarray]  # per sample: layout indices of the image tokens present (ascending)
    image_columns: list[np.ndarray]  # per sample: their current column indices
    last_column: np.ndarray  # per sample: current column of the last prompt token

    def prev_rows(self) -> torch.Tensor:
        """Layer K-1's attention probabilities of the last prompt token, (B, H, L_cur) over the present
        columns (recorded during the forward; requires ``needs_prev_rows``)."""
        return self.prev_rows_all()[:, :, 0]

    def prev_rows_all(self) -> torch.Tensor:
        """Layer K-1's attention probabilities of the method's ``query_rows``: (B, H, R, L_cur), NaN rows
        where a sample has fewer rows (requires ``needs_prev_rows``)."""
        p = self.state.prev_probs.get(self.layer - 1)
        if p is None:
            raise RuntimeError(f"no attention rows recorded at layer {self.layer - 1}; set needs_prev_rows = True")
        return p

    def rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Layer K's own attention probabilities of query ``rows`` ((B, R) current columns; default
        the last prompt token), recomputed on its input: (B, H, R, L_cur)."""
        from ...probes.attention import Site, session
        from ...probes.switch import attention_switched

        vlm = self.state.vlm
        layer = vlm.lm_layers[self.layer]
        attn = vlm.adapter.lm_attention(layer)
        if rows is None:
            rows = torch.as_tensor(self.last_column, device=self.hidden.device)[:, None]
        site = Site("lm", self.layer, rows=rows.to(self.hidden.device), store_device=self.hidden.device)
        normed = layer.input_layernorm(self.hidden)
        kw = {k: v for k, v in self.kwargs.items() if k in ("attention_mask", "position_embeddings", "position_ids")}
        with attention_switched(vlm.model), session({id(attn): site}), torch.no_grad():
            attn(hidden_states=normed, **kw)
        return site.probs[0].float()

    def prev_keys(self) -> torch.Tensor:
        """Layer K-1's keys as its attention computes them (projection, k-norm where the family has
        one, RoPE with the positions that layer saw), heads concatenated: (B, L_cur, kv_heads * head_dim).
        Recomputed from the input recorded at layer K-1 (requires ``needs_prev_input``)."""
        import sys

        got = self.state.prev_inputs.get(self.layer - 1)
        if got is None:
            raise RuntimeError(f"no input recorded at layer {self.layer - 1}; set needs_prev_input = True")
        hidden, kwargs = got
        vlm = self.state.vlm
        layer = vlm.lm_layers[self.layer - 1]
        attn = vlm.adapter.lm_attention(layer)
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if rope is None:
            raise ValueError(f"{type(attn).__name__}: no apply_rotary_pos_emb in its module; keys cannot be recomputed")
        with torch.no_grad():
            x = layer.input_layernorm(hidden)
            bsz, L, _ = x.shape
            k = attn.k_proj(x).view(bsz, L, -1, attn.head_dim).transpose(1, 2)
            if getattr(attn, "k_norm", None) is not None:
                k = attn.k_norm(k)
            cos, sin = kwargs["position_embeddings"]
            _, k = rope(k, k, cos, sin)
            return k.transpose(1, 2).reshape(bsz, L, -1)

    def final_normed(self) -> torch.Tensor:
        """The hidden states entering layer K through the LM's final norm, (B, L_cur, D)."""
        lm = self.state.vlm.adapter.language_model(self.state.vlm.model)
        with torch.no_grad():
            return lm.norm(self.hidden)

    def text_after_image(self) -> list[np.ndarray]:
        """Per sample: current columns of the real prompt tokens after the last image token present."""
        cols = self.state.cols.cpu().numpy()
        valid = (self.state.valid & _gather_seq(self.state.real_cols, self.state.cols, 1, 0)).cpu().numpy()
        out = []
        for i in range(cols.shape[0]):
            after = np.arange(cols.shape[1]) > self.image_columns[i].max()
            out.append(np.flatnonzero(after & valid[i] & (cols[i] < self.state.prompt_len)))
        return out

    def rows_without_rope(self) -> torch.Tensor:
        """Layer K's attention of the last prompt token computed **without rotary embeddings**:
        ``softmax(q_last · Kᵀ · scale)`` over the present keys it may see, (B, H, L_cur) float32.
        q and k come from the layer's own projections (and q/k norms where the family has them)
        of its normalised input; K/V heads are shared by query groups as the model does."""
        vlm = self.state.vlm
        layer = vlm.lm_layers[self.layer]
        attn = vlm.adapter.lm_attention(layer)
        with torch.no_grad():
            x = layer.input_layernorm(self.hidden)
            bsz, L, _ = x.shape
            last = torch.as_tensor(self.last_column, device=x.device)
            x_last = x[torch.arange(bsz, device=x.device), last][:, None]
            hd = attn.head_dim
            q = attn.q_proj(x_last).view(bsz, 1, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(bsz, L, -1, hd).transpose(1, 2)
            if getattr(attn, "q_norm", None) is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scale = getattr(attn, "scaling", hd**-0.5)
            scores = (q.float() @ k.float().transpose(-1, -2))[:, :, 0] * scale  # (B, H, L)
            mask = self.kwargs.get("attention_mask")
            if mask is not None:
                row = mask[torch.arange(bsz, device=x.device), 0, last]  # (B, L)
                allowed = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
                scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            return torch.softmax(scores, -1)

    def image_scores(self, per_column: torch.Tensor) -> list[np.ndarray]:
        """(B, L_cur) per-column values read at each sample's present image tokens."""
        v = per_column.detach().double().cpu().numpy()
        return [v[i, c] for i, c in enumerate(self.image_columns)]


@dataclass
class RemovalState:
    vlm: Any
    batch: Batch
    method: LMMethod
    layers: list[int]
    schedule: list[list[int]]  # per sample, image tokens left after each stage
    prompt_len: int  # columns of the prompt in the run (appended tokens follow)
    col_image: np.ndarray  # (B, L_prompt) layout image index of each prompt column, -1 otherwise
    positions: str
    # filled during the prefill
    run_len: int = 0
    cols: torch.Tensor | None = None  # (B, L_cur) run columns present now
    valid: torch.Tensor | None = None  # (B, L_cur) False for dummy columns
    layer_cols: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    renum: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, L_cur) renumbered positions
    shift: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B,) decode position shift
    base_mask: Any = None
    base_posemb: Any = None
    base_posids: Any = None
    prev_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    prev_inputs: dict[int, tuple] = field(default_factory=dict)  # layer -> (hidden, kwargs) it received
    inputs_embeds: torch.Tensor | None = None  # (B, run_len, D) the LM's input embeddings (prefill)
    kept: list[list[np.ndarray]] = field(default_factory=list)  # per stage, per sample: bool over image tokens
    scores: list[list[np.ndarray]] = field(default_factory=list)  # per stage, per sample: float over image tokens
    forwards: int = 0
    decoded: int = 0
    done: list[int] = field(default_factory=list)  # stage layers executed in the prefill
    pending_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    last_q: int = 1
    window: int | None = None
    real_cols: torch.Tensor | None = None  # (B, run_len) real (non-pad) columns of the prefill
    group: list[np.ndarray] | None = None  # per sample: layout slot each token was merged into (-1: none)
    col_remap: np.ndarray | None = None  # (B, run_len): run column whose token a column holds (recycling)
    pre: Any = None  # the method's pre-LM Selection (has_pre_lm), None otherwise

    def source_positions(self, source: torch.Tensor) -> torch.Tensor:
        """Map the prompt's ``source_positions`` (B, L) to the columns left after the last stage (-1 for dummies)."""
        cols, valid = self.cols, self.valid
        if cols is None:
            return source
        if self.col_remap is not None:
            cols = torch.as_tensor(self.col_remap, device=cols.device).gather(1, cols)
        src = torch.where(cols < source.shape[1], source.gather(1, cols.clamp(max=source.shape[1] - 1)), -1)
        return src.masked_fill(~valid, -1)


def _present_image(state: RemovalState) -> tuple[list[np.ndarray], list[np.ndarray]]:
    cols = state.cols.cpu().numpy()
    valid = state.valid.cpu().numpy()
    tokens, columns = [], []
    for i in range(cols.shape[0]):
        c = cols[i]
        in_prompt = c < state.prompt_len
        lay_idx = np.full(c.shape, -1)
        lay_idx[in_prompt] = state.col_image[i, c[in_prompt]]
        sel = (lay_idx >= 0) & valid[i]
        tokens.append(lay_idx[sel])
        columns.append(np.flatnonzero(sel))
    return tokens, columns


def _stage(state: RemovalState, k: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Score, choose and slice at stage layer ``k``; returns the new hidden states."""
    j = state.layers.index(k)
    tokens, columns = _present_image(state)
    cols_np = state.cols.cpu().numpy()
    last_col = np.array([int(np.flatnonzero(cols_np[i] == state.prompt_len - 1)[0]) for i in range(cols_np.shape[0])])
    probe = StageProbe(state, k, hidden, kwargs, tokens, columns, last_col)
    scores = state.method.lm_score(probe, j)
    n_keep = [int(state.schedule[i][j]) for i in range(len(tokens))]
    keep = state.method.lm_keep(probe, j, scores, n_keep)
    bsz = len(tokens)
    n_total = [lay.n_image_tokens for lay in state.batch.layouts]
    kept_full, score_full = [], []
    drop_cols = []
    for i in range(bsz):
        m = np.asarray(keep[i], dtype=bool)
        exact = getattr(state.method, "exact_budget", True)
        if m.shape != tokens[i].shape or (exact and int(m.sum()) != n_keep[i]):
            raise RuntimeError(
                f"{state.method.name}: stage {j} sample {i} keeps {int(m.sum())} of {m.shape}; budget {n_keep[i]}"
            )
        kf = np.zeros(n_total[i], dtype=bool)
        kf[tokens[i][m]] = True
        sf = np.full(n_total[i], np.nan)
        sf[tokens[i]] = np.asarray(scores[i], dtype=float)
        kept_full.append(kf)
        score_full.append(sf)
        drop_cols.append(columns[i][~m])
    recycle = getattr(state.method, "lm_recycle", None)
    moves = recycle(probe, j, scores, keep) if recycle is not None else None
    if moves is not None:
        hidden = _recycle(state, hidden, tokens, columns, keep, moves, kept_full, drop_cols)
    state.prev_probs.pop(k - 1, None)  # rows of many queries (FitPrune: every image and text row) are large
    state.kept.append(kept_full)
    state.scores.append(score_full)
    # new column set: every current column minus the dropped; samples that drop more keep dummies
    n_drop = [len(d) for d in drop_cols]
    r = min(n_drop)
    cur = state.cols.shape[1]
    new_len = cur - r
    rel = torch.empty(bsz, new_len, dtype=torch.long, device=hidden.device)
    new_valid = torch.empty(bsz, new_len, dtype=torch.bool, device=hidden.device)
    valid_np = state.valid.cpu().numpy()
    for i in range(bsz):
        dropped = drop_cols[i]
        removed = dropped[:r]  # really removed; the rest become dummies
        dummies = dropped[r:]
        keep_cols = np.setdiff1d(np.arange(cur), removed, assume_unique=True)
        v = valid_np[i, keep_cols].copy()
        v[np.isin(keep_cols, dummies)] = False
        rel[i] = torch.as_tensor(keep_cols, device=hidden.device)
        new_valid[i] = torch.as_tensor(v, device=hidden.device)
    state.cols = state.cols.gather(1, rel)
    state.valid = new_valid
    state.done.append(k)
    return _gather_seq(hidden, rel, 1, 0)


def _recycle(state, hidden, tokens, columns, keep, moves, kept_full, drop_cols) -> torch.Tensor:
    """Merged tokens inside the LM (SparseVLM v1.5's recycling): ``moves[i]`` is None or (centres, merged,
    members): indices into the present image tokens (dropped ones, cluster order), their merged hidden
    states, and per centre the indices of the tokens merged into it.
    As the code appends them after the kept image tokens (positions renumbered), the sample's present
    image columns — one contiguous block — are refilled in that order: kept tokens (layout order), then
    the merged tokens, each standing in its centre's layout slot; the remaining columns are removed."""
    if state.positions != "renumbered":
        raise ValueError(f"{state.method.name}: recycling appends merged tokens and needs renumbered positions")
    hidden = hidden.clone()
    src = hidden.detach().clone()
    for i, mv in enumerate(moves):
        if mv is None:
            continue
        centres, merged, members = mv
        cols = columns[i]
        if cols.size and not np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))):
            raise ValueError(
                f"{state.method.name}: recycling needs the image tokens in one contiguous block (LLaVA-1.5 layout); "
                f"sample {i} has other tokens between them"
            )
        m = np.asarray(keep[i], dtype=bool)
        if m[centres].any():
            raise RuntimeError(f"{state.method.name}: a recycling centre of sample {i} is a kept token")
        kept_cols = cols[m]
        a = len(kept_cols) + len(centres)
        slots = cols[:a]
        dev = hidden.device
        hidden[i, torch.as_tensor(slots[: len(kept_cols)], device=dev)] = src[i, torch.as_tensor(kept_cols, device=dev)]
        hidden[i, torch.as_tensor(slots[len(kept_cols) :], device=dev)] = merged.to(dev, hidden.dtype)
        run_cols = state.cols[i].cpu().numpy()
        new_tokens = np.concatenate([tokens[i][m], tokens[i][centres]])
        state.col_image[i, run_cols[slots]] = new_tokens  # which layout slot each refilled column stands for
        if state.col_remap is None:
            state.col_remap = np.tile(np.arange(state.run_len), (len(moves), 1))
        held = np.concatenate([kept_cols, cols[centres]])  # current columns whose tokens the slots now hold
        state.col_remap[i, run_cols[slots]] = state.col_remap[i, run_cols[held]]
        kept_full[i][tokens[i][centres]] = True
        drop_cols[i] = cols[a:]
        if state.group is None:
            state.group = [np.full(n, -1, dtype=np.int64) for n in (lay.n_image_tokens for lay in state.batch.layouts)]
        for c_tok, mem in zip(tokens[i][centres], members):
            state.group[i][tokens[i][np.asarray(mem, dtype=np.int64)]] = c_tok
    return hidden


def _mask_for(state: RemovalState, base: Any, cols: torch.Tensor, valid: torch.Tensor, q_cols: torch.Tensor | None):
    """The attention mask over present columns: queries ``q_cols`` (None: same as keys), keys ``cols``."""
    bsz = cols.shape[0]
    q_cols = cols if q_cols is None else q_cols
    if base is None:
        # no mask built by the model: plain causal over the run's columns (no padding)
        allowed = q_cols[:, :, None] >= cols[:, None, :]
        allowed = allowed[:, None]
    else:
        m = _expand_batch(base, bsz, 0)
        m = _gather_seq(m, q_cols, -2, 0)
        m = _gather_seq(m, cols, -1, 0)
        if m.dtype == torch.bool:
            allowed = m
        else:
            return m.masked_fill(~valid[:, None, None, :], torch.finfo(m.dtype).min)
    return allowed & valid[:, None, None, :]


def _rotary(state: RemovalState, k: int, hidden: torch.Tensor, pos: torch.Tensor):
    """The LM's own rotary embedding at positions ``pos`` for layer ``k`` (its layer type, if typed)."""
    import inspect

    lm = state.vlm.adapter.language_model(state.vlm.model)
    rot = getattr(lm, "rotary_emb", None)
    if rot is None:
        raise ValueError(f"positions='renumbered' needs the LM's rotary_emb; {type(lm).__name__} has none")
    if "layer_type" in inspect.signature(rot.forward).parameters:
        return rot(hidden, pos, lm.config.layer_types[k])
    return rot(hidden, pos)


def _pre_hook(state: RemovalState, k: int):
    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs = dict(kwargs)
        prefill = state.forwards == 0
        if prefill:
            if state.cols is None:
                _start(state, hidden, kwargs)
            if k in state.layers:
                current = _sliced_kwargs(state, k, kwargs, hidden) if state.done else kwargs
                hidden = _stage(state, k, hidden, current)
                if state.positions == "renumbered":
                    real = state.valid & _gather_seq(_real_columns(state), state.cols, 1, 0)
                    state.renum[k] = (real.long().cumsum(-1) - 1).clamp_min(0)
                    state.shift[k] = _orig_pos(state)[:, -1] - state.renum[k][:, -1]
            state.layer_cols[k] = (state.cols, state.valid)
            if state.done:
                kwargs = _sliced_kwargs(state, k, kwargs, hidden)
            if state.method.needs_prev_rows and (k + 1) in state.layers:
                _arm_prev_site(state, k)
            if state.method.needs_prev_input and (k + 1) in state.layers:
                state.prev_inputs[k] = (hidden, kwargs)
        else:
            state.last_q = hidden.shape[1]
            kwargs = _decode_kwargs(state, k, kwargs, hidden)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    return hook


def _start(state: RemovalState, hidden: torch.Tensor, kwargs: dict) -> None:
    state.run_len = hidden.shape[1]
    bsz = hidden.shape[0]
    state.cols = torch.arange(state.run_len, device=hidden.device)[None].expand(bsz, -1).contiguous()
    state.valid = torch.ones(bsz, state.run_len, dtype=torch.bool, device=hidden.device)
    state.base_mask = kwargs.get("attention_mask")
    state.base_posemb = kwargs.get("position_embeddings")
    state.base_posids = kwargs.get("position_ids")
    if isinstance(state.base_mask, dict) or isinstance(state.base_posemb, dict):
        raise ValueError("in-LM removal: a decoder layer got a dict of masks / position embeddings; unsupported")
    window = getattr(getattr(state.vlm.model.config, "get_text_config", lambda: None)(), "sliding_window", None)
    state.window = None if window is None else int(window)
    state.real_cols = _real_columns(state)
    if window is not None and state.run_len >= int(window):
        raise ValueError(
            f"in-LM removal: the sequence ({state.run_len}) reaches the sliding window ({window}); sliding caches "
            "drop keys themselves, which this mechanism does not track"
        )


def _real_columns(state: RemovalState) -> torch.Tensor:
    """(B, run_len) True for real (non-pad) run columns."""
    m = state.base_mask
    bsz = state.cols.shape[0]
    if m is None:
        return torch.ones(bsz, state.run_len, dtype=torch.bool, device=state.cols.device)
    m = _expand_batch(m, bsz, 0)
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return allowed[:, 0].any(-2)  # a column some query may see


def _orig_pos(state: RemovalState) -> torch.Tensor:
    pos = state.base_posids
    bsz = state.cols.shape[0]
    if pos is None or pos.dim() != 2:
        raise ValueError("positions='renumbered' needs 1-D position ids")
    return _gather_seq(_expand_batch(pos, bsz, 0), state.cols, 1, 0)


def _renum_stage(state: RemovalState, k: int) -> int | None:
    """The latest stage at or before layer k whose renumbered positions exist."""
    done = [j for j in state.renum if j <= k]
    return max(done) if done else None


def _sliced_kwargs(state: RemovalState, k: int, kwargs: dict, hidden: torch.Tensor) -> dict:
    cols, valid = state.cols, state.valid
    out = dict(kwargs)
    out["attention_mask"] = _mask_for(state, state.base_mask, cols, valid, None)
    stage = _renum_stage(state, k)
    if stage is not None:
        pos = state.renum[stage]
        out["position_embeddings"] = _rotary(state, k, hidden, pos)
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = pos
        return out
    pe = state.base_posemb
    if pe is not None:
        out["position_embeddings"] = tuple(_gather_seq(t, cols, -2, 0 if t.dim() == 3 else 1) for t in pe)
    if state.base_posids is not None:
        out["position_ids"] = _gather_seq(state.base_posids, cols, -1, -2)
    return out


def _decode_kwargs(state: RemovalState, k: int, kwargs: dict, hidden: torch.Tensor) -> dict:
    if k not in state.layer_cols or not state.done or k < state.done[0]:
        return kwargs
    cols, valid = state.layer_cols[k]
    q = hidden.shape[1]
    bsz = cols.shape[0]
    start = state.run_len + state.decoded
    new = torch.arange(start, start + q, device=cols.device)[None].expand(bsz, -1)
    past_new = torch.arange(state.run_len, start, device=cols.device)[None].expand(bsz, -1)
    key_cols = torch.cat([cols, past_new, new], 1)
    # the mask is rebuilt here, not gathered from the model's: the model sizes decode masks from the
    # cache of the first layer of each attention type, which may be a shortened one
    if state.window is not None and start + q >= state.window:
        raise ValueError(f"in-LM removal: decoding reached the sliding window ({state.window}); not tracked")
    real = torch.cat(
        [
            _gather_seq(state.real_cols, cols, 1, 0) & valid,
            torch.ones(bsz, past_new.shape[1] + q, dtype=torch.bool, device=cols.device),
        ],
        1,
    )
    out = dict(kwargs)
    out["attention_mask"] = (new[:, :, None] >= key_cols[:, None, :])[:, None] & real[:, None, None, :]
    stage = _renum_stage(state, k)
    if stage is not None:
        pos = kwargs.get("position_ids")
        if pos is None or pos.dim() != 2:
            raise ValueError("positions='renumbered' decoding needs 1-D position_ids")
        pos = _expand_batch(pos, bsz, 0) - state.shift[stage][:, None]
        out["position_embeddings"] = _rotary(state, k, hidden, pos)
        out["position_ids"] = pos
    return out


def _arm_prev_site(state: RemovalState, k: int) -> None:
    """Record layer k's attention rows of the method's query rows during this forward (site in a session)."""
    rows = state.method.query_rows(state)
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.long, device=state.cols.device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(np.asarray(r), dtype=torch.long, device=out.device)
    state.pending_rows[k] = out


def pre_lm(vlm: Any, batch: Batch, method: Method, keep: Any, decoder_inputs: dict | None = None) -> Any:
    """The pre-LM :class:`vtrlab.reduce.Selection` of an in-LM method that also acts before the LM
    (``has_pre_lm``, e.g. MustDrop's tower merge), checked; None for every other method. Its ``keep`` /
    ``embeds`` / the method's ``positions`` build the LM inputs (``reduced_decoder_inputs``), and it is
    passed to :func:`lm_removal` as ``pre=``."""
    if not getattr(method, "has_pre_lm", False):
        return None
    from ..context import ReductionContext
    from ..registry import prepare

    prepare(method, vlm)
    n_keep = budgets(batch, keep)
    sel = method.pre_select(ReductionContext(vlm, batch, decoder_inputs), n_keep)
    if len(sel.keep) != len(batch):
        raise RuntimeError(f"method {method.name!r} returned {len(sel.keep)} masks for {len(batch)} samples")
    content = sel.info.get("content")
    for i, (m, lay) in enumerate(zip(sel.keep, batch.layouts)):
        if m.shape != (lay.n_image_tokens,):
            raise RuntimeError(f"method {method.name!r}: sample {i} mask {m.shape} != ({lay.n_image_tokens},)")
        if content is not None and sorted(content[i][m].tolist()) != np.flatnonzero(m).tolist():
            raise RuntimeError(f"method {method.name!r}: sample {i}'s content map is no permutation of its kept slots")
    return sel


@contextlib.contextmanager
def lm_removal(vlm: Any, batch: Batch, method: LMMethod, keep: Any, source_positions: torch.Tensor, pre: Any = None):
    """Within the block, forwards of ``vlm.model`` on the prompt whose columns hold ``source_positions``
    (B, L) (then cached decode steps) remove image tokens inside the LM as ``method`` does.
    ``pre``: the method's pre-LM Selection (:func:`pre_lm`; required when it has one): the LM inputs
    hold only its kept tokens, and kept slot j holds the content of layout token ``info["content"][i][j]``.
    Yields the :class:`RemovalState` (kept sets per stage, scores, column maps)."""
    from ...probes.attention import Site, session
    from ...probes.switch import attention_switched
    from ..registry import prepare

    if getattr(method, "has_pre_lm", False) and pre is None:
        raise ValueError(
            f"method {method.name!r} also acts before the LM: pass its pre-LM selection (stages.lm.pre_lm) as pre=, "
            "or use vtrlab.reduce.apply / answer / logits"
        )
    prepare(method, vlm)
    layers = method.layers_checked(vlm)
    n_final = budgets(batch, keep)
    schedule = []
    for i, (lay, n) in enumerate(zip(batch.layouts, n_final)):
        n_in = lay.n_image_tokens if pre is None else int(np.asarray(pre.keep[i]).sum())
        s = [int(x) for x in method.lm_schedule(n_in, n)]
        last_ok = s[-1] == n or not getattr(method, "exact_budget", True)
        if len(s) != len(layers) or not last_ok or any(b > a for a, b in zip([n_in] + s, s)):
            raise RuntimeError(f"{method.name}: schedule {s} for {n_in} tokens, budget {n}, layers {layers}")
        schedule.append(s)
    src = source_positions.cpu().numpy()
    col_image = np.full(src.shape, -1, dtype=np.int64)
    content = None if pre is None else pre.info.get("content")
    for i, lay in enumerate(batch.layouts):
        where = {int(p): j for j, p in enumerate(lay.image_positions)}
        for c, p in enumerate(src[i]):
            j = where.get(int(p), -1)
            col_image[i, c] = j if content is None or j < 0 else int(content[i][j])
    state = RemovalState(vlm, batch, method, layers, schedule, src.shape[1], col_image, method.positions, pre=pre)
    mods = vlm.lm_layers
    handles = []
    sites: dict[int, Site] = {}

    def attn_pre(k, site):
        def hook(_m, _a, _kw):
            site.probs.clear()
            site.rows = state.pending_rows.pop(k) if state.forwards == 0 and k in state.pending_rows else None

        return hook

    def attn_post(k, site):
        def hook(_m, _a, _o):
            if site.probs and site.rows is not None:
                state.prev_probs[k] = site.probs[-1].float()
            site.rows = None
            site.probs.clear()

        return hook

    def after_forward(_m, _a, output):
        if state.forwards > 0:
            state.decoded += state.last_q
        state.forwards += 1

    def grab_embeds(_m, args, kwargs):
        if state.forwards == 0:
            state.inputs_embeds = kwargs.get("inputs_embeds", args[0] if args else None)

    lm = vlm.adapter.language_model(vlm.model)
    try:
        handles.append(lm.register_forward_pre_hook(grab_embeds, with_kwargs=True))
        first = layers[0] - 1 if (method.needs_prev_rows or method.needs_prev_input) else layers[0]
        for k in range(first, len(mods)):
            handles.append(mods[k].register_forward_pre_hook(_pre_hook(state, k), with_kwargs=True))
        if method.needs_prev_rows:
            for k in layers:
                attn = vlm.adapter.lm_attention(mods[k - 1])
                site = Site("lm", k - 1, rows=None, store_device=source_positions.device)
                sites[id(attn)] = site
                handles.append(attn.register_forward_pre_hook(attn_pre(k - 1, site), with_kwargs=True))
                handles.append(attn.register_forward_hook(attn_post(k - 1, site)))
        handles.append(lm.register_forward_hook(after_forward))
        with contextlib.ExitStack() as ctx:
            if sites:
                ctx.enter_context(attention_switched(vlm.model))
                ctx.enter_context(session(sites))
            yield state
    finally:
        for h in handles:
            h.remove()
