"""Greedy answers and logits of a VLM whose LM sees only the kept image tokens.

One decode loop for every family: the model's own code builds the decoder inputs
(``FamilyAdapter.decoder_inputs``), :mod:`vtrlab.reduce.keep` removes dropped image tokens,
and the loop below runs the model with its KV cache. Generated tokens take position
``max kept position + 1 + step`` (on every mRoPE axis), which is exactly what ``generate`` uses
when every token is kept.

The reduced sequence goes through the model's own ``forward`` as ``inputs_embeds`` (no pixels),
as ``generate`` would call it: the model then builds its own attention masks (Gemma3's
bidirectional image blocks from ``token_type_ids``) and applies its own head (final-logit
soft-capping), so nothing family-specific is re-implemented here.

Probes active around these calls (e.g. ``vtrlab.knocked_out(vlm, batch, ...)``) are told which
original position each column of the reduced sequence holds (``source_positions``), so a knockout
of ``batch`` applies to the kept tokens exactly as in the full sequence (an edge is cut iff both of
its ends were kept and it is cut there). Generated tokens and appended (teacher-forced) tokens are
no position of ``batch``: a knockout refuses them with a clear error.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models.base import Batch
from ..probes.attention import APPENDED
from .forward import forward_embeds
from .keep import KeepMasks, ReducedInputs, reduced_decoder_inputs


def _tokenizer(vlm: Any):
    return getattr(vlm.processor, "tokenizer", vlm.processor)


def _eos_ids(vlm: Any) -> list[int]:
    ids = getattr(getattr(vlm.model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = _tokenizer(vlm).eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def _pad_id(vlm: Any, eos: list[int]) -> int:
    pad = getattr(getattr(vlm.model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = _tokenizer(vlm).pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad[0] if isinstance(pad, (list, tuple)) else pad)


def check_max_new_tokens(value: Any) -> int:
    """``max_new_tokens`` as an int >= 1; floats (also 2.0), bools, strings and None are refused, never rounded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"max_new_tokens={value!r} ({type(value).__name__}); accepted: an integer >= 1")
    if value < 1:
        raise ValueError(f"max_new_tokens={value!r}; accepted: an integer >= 1")
    return int(value)


def _source(batch: Batch, positions: torch.Tensor) -> tuple:
    """What a probe bound to ``batch`` needs to map the reduced sequence: (source positions, ids)."""
    return positions, dict(batch.inputs).get("input_ids")


@dataclass
class _Plan:
    keep: Any  # keep masks (or None: all)
    embeds: Any
    positions: str
    removal: Any  # removal(red): the context the reduced inputs run in (in-LM removal for LM-stage methods)
    extra: Any  # tokens a pre-LM method sends that are no layout token (``Selection.info["extra"]``)
    decoder_inputs: dict | None  # the batch's decoder inputs when already computed (checked / built here)

    def reduced(self, vlm: Any, batch: Batch) -> ReducedInputs:
        return reduced_decoder_inputs(
            vlm,
            batch,
            self.keep,
            self.decoder_inputs,
            embeds=self.embeds,
            positions=self.positions,
            extra=self.extra,
            _built_here=True,
        )


def _plan(vlm: Any, batch: Batch, method: Any, keep: Any, params: dict, decoder_inputs: dict | None) -> _Plan:
    """What :func:`generate_ids` / :func:`logits` run for ``method`` at budget ``keep``. Given
    ``decoder_inputs`` are checked against the batch once, here; a pre-LM method whose scoring ran the
    tower hands its decoder inputs on, so the tower runs once per call."""
    from .apply import resolve, select_in_context
    from .keep import check_decoder_inputs

    if decoder_inputs is not None:
        check_decoder_inputs(batch, decoder_inputs)
    none = lambda red: contextlib.nullcontext()  # noqa: E731
    if method is None:
        if params:
            raise ValueError(f"parameters {sorted(params)} given without method=; they are a method's parameters")
        if isinstance(keep, (float, int)) and not isinstance(keep, bool):
            raise ValueError(f"keep={keep!r} is a budget; give method= (e.g. 'random') or per-sample bool masks")
        return _Plan(keep, None, "kept", none, None, decoder_inputs)
    m = resolve(method, params)
    if keep is None:
        raise ValueError(f"method={m.name!r} needs a budget keep= (ratio in (0, 1] or a number of image tokens)")
    if m.stage == "lm":
        from .stages.lm import lm_removal, pre_lm

        pre = pre_lm(vlm, batch, m, keep, decoder_inputs)  # None unless the method also acts before the LM

        def removal(red):
            return lm_removal(vlm, batch, m, keep, red.source_positions, pre=pre)

        if pre is None:
            return _Plan(None, None, "kept", removal, None, decoder_inputs)
        return _Plan(pre.keep, pre.embeds, m.positions, removal, pre.info.get("extra"), decoder_inputs)
    sel, ctx = select_in_context(vlm, batch, m, keep, decoder_inputs)
    dec = ctx.decoder_inputs() if ctx.has_decoder_inputs() else None
    return _Plan(sel.keep, sel.embeds, m.positions, none, sel.info.get("extra"), dec)


@torch.no_grad()
def generate_ids(
    vlm: Any,
    batch: Batch,
    keep: KeepMasks = None,
    max_new_tokens: int = 16,
    progress: bool = False,
    decoder_inputs: dict | None = None,
    *,
    method: Any = None,
    on_token: Callable[[int], None] | None = None,
    **params: Any,
) -> list[list[int]]:
    """Greedy new token ids per sample (up to and excluding the first EOS); ``method``/``keep`` as
    in :func:`answer`. ``on_token(step)`` is called once each step's tokens are on the host (step 0:
    the first token, i.e. time to first token; benchmarks time prefill and decode with it)."""
    check_max_new_tokens(max_new_tokens)
    plan = _plan(vlm, batch, method, keep, params, decoder_inputs)
    red = plan.reduced(vlm, batch)
    with plan.removal(red):
        return _decode(vlm, batch, red, max_new_tokens, progress, on_token)


def _decode(
    vlm: Any, batch: Batch, red: ReducedInputs, max_new_tokens: int, progress: bool, on_token=None
) -> list[list[int]]:
    embed = vlm.model.get_input_embeddings()
    eos = _eos_ids(vlm)
    pad = _pad_id(vlm, eos)
    eos_t = torch.tensor(eos, device=red.inputs_embeds.device, dtype=torch.long)

    attn = red.attention_mask
    source = _source(batch, red.source_positions)
    logit, cache = forward_embeds(
        vlm, red.inputs_embeds, attn, red.position_ids, extras=red.per_token, last_only=True, source=source
    )
    next_pos = red.next_position
    bsz = attn.shape[0]
    done = torch.zeros(bsz, dtype=torch.bool, device=attn.device)
    out: list[list[int]] = [[] for _ in range(bsz)]
    for step in tqdm(range(max_new_tokens), desc="decode", disable=not progress, leave=False):
        token = logit[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        host_tok, host_done = token.tolist(), done.tolist()  # one copy per step, not one per sample
        for i in range(bsz):
            if not host_done[i] and not (eos and host_tok[i] in eos):
                out[i].append(host_tok[i])
        if on_token is not None:
            on_token(step)
        if eos:
            done = done | torch.isin(token, eos_t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, attn.new_ones(bsz, 1)], dim=1)
        pos = next_pos + step
        # per-token extras are prompt-only (generate drops e.g. token_type_ids after the prefill)
        logit, cache = forward_embeds(
            vlm, embed(token)[:, None].to(red.inputs_embeds.dtype), attn, pos, cache, source=source
        )
    return out


def answer(
    vlm: Any,
    batch: Batch,
    keep: KeepMasks | float | int = None,
    max_new_tokens: int = 16,
    progress: bool = False,
    decoder_inputs: dict | None = None,
    *,
    method: Any = None,
    **params: Any,
) -> list[str]:
    """Greedy answer strings.

    Without ``method``: ``keep[i]`` (bool over sample i's image tokens, layout order) drops the
    False tokens before the LM; ``keep=None`` keeps all and answers as ``model.generate``.
    With ``method`` (a registry name or a :class:`vtrlab.reduce.Method`; ``params`` override its
    defaults): ``keep`` is the budget — a ratio in (0, 1] or a number of image tokens per sample —
    and the method is applied at its stage (before the LM, or inside it from layer K on).
    ``decoder_inputs`` (:func:`vtrlab.reduce.decoder_inputs`) may be passed to reuse one vision
    forward over many keep masks of the same batch."""
    ids = generate_ids(
        vlm,
        batch,
        keep,
        max_new_tokens=max_new_tokens,
        progress=progress,
        decoder_inputs=decoder_inputs,
        method=method,
        **params,
    )
    tok = _tokenizer(vlm)
    return [tok.decode(t, skip_special_tokens=True).strip() for t in ids]


@dataclass
class ReducedLogits:
    """Logits of the reduced sequence (left-padded) plus, optionally, of appended tokens.

    ``logits[b, j]`` is the next-token prediction after column j; ``source_positions[b, j]`` is
    that column's position in the unreduced sequence (-1 pad). ``last`` is the next-token
    distribution after the prompt. ``appended[b, t]`` predicts appended token t of sample b
    (teacher forcing), valid where ``appended_mask`` is True.
    """

    logits: torch.Tensor
    source_positions: torch.Tensor
    last: torch.Tensor
    appended: torch.Tensor | None = None
    appended_mask: torch.Tensor | None = None


@torch.no_grad()
def logits(
    vlm: Any,
    batch: Batch,
    keep: KeepMasks | float | int = None,
    append: Sequence[Sequence[int]] | None = None,
    decoder_inputs: dict | None = None,
    *,
    method: Any = None,
    **params: Any,
) -> ReducedLogits:
    """Full logits of the LM over the kept tokens (float32), for fidelity measures.

    ``append`` (one list of token ids per sample, e.g. the gold answer) is fed after the prompt
    at positions ``max kept + 1, + 2, ...`` so that ``appended`` scores it by teacher forcing.
    ``method``/``keep`` as in :func:`answer`. For a method that prunes inside the LM, ``logits``
    and ``source_positions`` cover the columns left after its last stage.
    """
    plan = _plan(vlm, batch, method, keep, params, decoder_inputs)
    red = plan.reduced(vlm, batch)
    with plan.removal(red) as state:
        return _logits(vlm, batch, red, append, state)


def _logits(vlm: Any, batch: Batch, red: ReducedInputs, append, state: Any) -> ReducedLogits:
    embeds, attn, pos, extras = red.inputs_embeds, red.attention_mask, red.position_ids, red.per_token
    length = embeds.shape[1]
    source = red.source_positions
    app_mask = None
    if append is not None:
        append = [list(map(int, a)) for a in append]
        if len(append) != len(batch):
            raise ValueError(f"append has {len(append)} entries for a batch of {len(batch)}; need one per sample")
        width = max(len(a) for a in append)
        if width == 0:
            raise ValueError("append holds no tokens; give at least one token id per sample or append=None")
        ids = torch.zeros(len(append), width, dtype=torch.long, device=embeds.device)
        app_mask = torch.zeros(len(append), width, dtype=torch.bool, device=embeds.device)
        for i, a in enumerate(append):
            ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
            app_mask[i, : len(a)] = True
        # right-padding after the prompt is harmless for a causal LM: nothing real attends it
        steps = torch.arange(width, device=embeds.device)
        app_pos = red.next_position + steps  # (B, W) or (A, B, W)
        embeds = torch.cat([embeds, vlm.model.get_input_embeddings()(ids).to(embeds.dtype)], dim=1)
        attn = torch.cat([attn, app_mask.long()], dim=1)
        pos = torch.cat([pos, app_pos], dim=-1)
        # appended tokens are text: per-token extras continue with zeros (text) there
        extras = {k: torch.cat([v, v.new_zeros(v.shape[0], width)], dim=1) for k, v in extras.items()}
        source = torch.cat([source, source.new_full((source.shape[0], width), APPENDED)], dim=1)
    out, _ = forward_embeds(vlm, embeds, attn, pos, use_cache=False, extras=extras, source=_source(batch, source))
    kept_source = red.source_positions
    if state is not None:  # columns removed inside the LM: the head saw only the survivors (appended last)
        width = 0 if app_mask is None else app_mask.shape[1]
        length = out.shape[1] - width
        kept_source = state.source_positions(kept_source)[:, :length]
    full = out[:, :length]
    appended = None
    if append is not None:
        # the token at appended index t is predicted by the column just before it
        appended = out[:, length - 1 : length - 1 + app_mask.shape[1]]
    return ReducedLogits(full, kept_source, full[:, -1], appended, app_mask)
