"""Keep masks over a sample's image tokens, and the LM inputs with the dropped tokens removed.

This is the one place where image tokens leave the LM sequence. Every reduction method that
prunes at the projector output (before the LM) ends here: it produces per-sample boolean keep
masks over ``layout.image_positions`` (layout order) and hands them to
:func:`reduced_decoder_inputs`.

Positions stay right for every family because dropped tokens are *removed* and the kept tokens
keep the position ids the model itself gave them:

* 3-D (mRoPE, ``(3, B, N)`` or ``(4, B, N)``) position ids are taken exactly as the model passed
  them to its decoder (``FamilyAdapter.decoder_inputs``) and sliced.
* 1-D rotary/learned position ids are the running count of real tokens (``cumsum(mask) - 1``),
  which is what ``generate`` feeds a left-padded batch and what a plain forward feeds an unpadded
  one; they are then sliced the same way, so gaps remain where tokens were dropped.

Samples end up with different lengths; they are left-padded again (attention mask 0, embeddings
0, position 0) so the last column is every sample's last real token. Other per-token inputs of
the model (e.g. ``token_type_ids``) are sliced the same way, so that the model's own forward,
fed ``inputs_embeds`` instead of pixels, builds its family-specific masks over the kept tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.base import Batch
from ..probes.attention import APPENDED

KeepMasks = Sequence[Any] | None

FINGERPRINT_KEY = "batch_fingerprint"


def batch_fingerprint(batch: Batch) -> str:
    """A short hash of the batch's model inputs (token ids, masks, pixels): two batches with the same
    fingerprint give the model the same inputs."""
    h = hashlib.sha1()
    for name in sorted(dict(batch.inputs)):
        v = batch.inputs[name]
        if torch.is_tensor(v):
            t = v.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def decoder_inputs(vlm: Any, batch: Batch) -> dict[str, Any]:
    """What the LM decoder receives for ``batch`` (the family adapter's ``decoder_inputs``: embeddings
    with the image features merged in, mask, positions), tagged with the batch's fingerprint so that
    :func:`vtrlab.answer` / :func:`vtrlab.reduce.logits` can reuse it over many keep masks of *this*
    batch (one vision forward) and refuse it for any other."""
    dec = dict(vlm.adapter.decoder_inputs(vlm.model, batch.inputs))
    dec[FINGERPRINT_KEY] = batch_fingerprint(batch)
    return dec


def check_decoder_inputs(batch: Batch, dec: dict) -> None:
    """Raise unless ``dec`` was built by :func:`decoder_inputs` for ``batch`` (size, length, fingerprint)."""
    if not isinstance(dec, dict) or "inputs_embeds" not in dec:
        raise ValueError(
            f"decoder_inputs must be the dict of vtrlab.reduce.decoder_inputs(vlm, batch), got {type(dec).__name__}"
        )
    ids = dict(batch.inputs).get("input_ids")
    want = (len(batch), int(ids.shape[1]) if ids is not None else int(batch.layouts[0].seq_len))
    got = tuple(dec["inputs_embeds"].shape[:2])
    if got != want:
        raise ValueError(
            f"decoder_inputs hold {got[0]} sample(s) x {got[1]} positions, but the batch has {want[0]} x {want[1]}; "
            "build them for this batch with vtrlab.reduce.decoder_inputs(vlm, batch)"
        )
    fp = dec.get(FINGERPRINT_KEY)
    if fp is None:
        raise ValueError(
            "decoder_inputs carry no batch fingerprint (raw adapter output?); build them with "
            "vtrlab.reduce.decoder_inputs(vlm, batch) so they can be checked against the batch"
        )
    if fp != batch_fingerprint(batch):
        raise ValueError(
            f"decoder_inputs were built for another batch (fingerprint {fp}, this batch "
            f"{batch_fingerprint(batch)}); build them with vtrlab.reduce.decoder_inputs(vlm, batch)"
        )


def validate_keep(batch: Batch, keep: KeepMasks) -> list[np.ndarray]:
    """Per sample a bool array over that sample's image tokens (layout order); ``None`` keeps all."""
    n_tokens = [lay.n_image_tokens for lay in batch.layouts]
    if keep is None:
        return [np.ones(n, dtype=bool) for n in n_tokens]
    if isinstance(keep, (np.ndarray, torch.Tensor)) and keep.ndim == 1:
        raise ValueError("keep must be one mask per sample (a list of 1-D bool arrays), got a single 1-D array")
    keep = list(keep)
    if len(keep) != len(batch):
        raise ValueError(f"keep has {len(keep)} masks for a batch of {len(batch)} samples; need one per sample")
    out = []
    for i, (mask, n) in enumerate(zip(keep, n_tokens)):
        if mask is None:
            out.append(np.ones(n, dtype=bool))
            continue
        arr = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
        if arr.dtype != bool:
            raise ValueError(f"keep[{i}] has dtype {arr.dtype}; accepted: bool (True = keep the image token)")
        if arr.shape != (n,):
            raise ValueError(
                f"keep[{i}] has shape {arr.shape}; sample {i} has {n} image tokens, so the mask must be ({n},)"
            )
        out.append(arr)
    return out


@dataclass
class ReducedInputs:
    """Decoder inputs with dropped image tokens removed, left-padded to a common length."""

    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    position_ids: torch.Tensor  # (B, L) or (A, B, L) for multi-axis (mRoPE) positions
    source_positions: torch.Tensor  # (B, L) position of each column in the original sequence, -1 for pads
    per_token: dict[str, torch.Tensor]  # other (B, N) model inputs (token_type_ids, ...) sliced the same way

    @property
    def next_position(self) -> torch.Tensor:
        """Position id of the first generated token: max kept position + 1, per sample.

        For multi-axis (mRoPE) ids the max is taken over every axis and the same value is used on
        each axis, as ``generate`` does (``rope_deltas``); prompts end in text, whose axes agree,
        so this equals each axis' own max + 1.
        """
        pos = self.position_ids.masked_fill(self.attention_mask == 0, torch.iinfo(self.position_ids.dtype).min)
        top = pos.amax(dim=-1, keepdim=True)  # (B, 1) or (A, B, 1)
        if top.dim() == 3:
            top = top.amax(dim=0, keepdim=True).expand_as(top)
        return top + 1


def _one_d_positions(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def reduced_decoder_inputs(
    vlm: Any,
    batch: Batch,
    keep: KeepMasks = None,
    decoder_inputs: dict | None = None,
    embeds: Sequence[torch.Tensor | None] | None = None,
    positions: str = "kept",
    extra: Sequence[tuple[str, torch.Tensor] | None] | None = None,
    *,
    _built_here: bool = False,
) -> ReducedInputs:
    """The inputs the LM decoder receives, minus the image tokens whose keep mask is False.

    Non-image tokens of the image block (newline / separator kinds) are always kept; only
    ``kind == image`` tokens are subject to the mask. ``decoder_inputs``: the result of
    :func:`decoder_inputs` ``(vlm, batch)`` when it is reused over many keep masks of the same batch
    (saves the vision tower; checked against ``batch``); computed here when None.

    ``embeds[i]`` (None, or a ``(n_kept_i, D)`` tensor, kept tokens in layout order) replaces the
    embeddings of sample i's kept image tokens: merged tokens (VisionZip's contextual tokens,
    PruMerge's weighted sums, pooled windows) enter the LM through this same path.
    ``positions``: ``"kept"`` (kept tokens keep their position ids; gaps remain) or
    ``"renumbered"`` (1-D positions recounted over the kept tokens, as methods that rebuild
    ``position_ids`` after pruning do; not defined for multi-axis mRoPE ids, which raise).
    ``extra[i]`` (None, ``(where, (e, D) tensor)`` or a list of such pairs): tokens a method sends that
    are no layout token (VisionZip's [CLS] token, PruMerge's extra token), inserted before the sample's
    first kept image token (``where="start"``), after its last (``"end"``), or before / after the
    sample's image token ``j`` (layout order, kept or not: ``("before", j)`` / ``("after", j)``; one
    per anyres crop); pairs at the same place go in list order. Only with ``positions="renumbered"``
    (they have no position of their own). Their ``source_positions`` are
    :data:`vtrlab.probes.attention.APPENDED` (no position of the batch).
    ``_built_here`` (internal): ``decoder_inputs`` are the adapter's output for ``batch`` computed by
    vtrlab in this call chain (a method's scoring forward) or already checked by the caller; the
    fingerprint check (a host copy and hash of the pixels) is skipped.
    """
    if positions not in ("kept", "renumbered"):
        raise ValueError(f"positions={positions!r}; accepted: 'kept', 'renumbered'")
    masks = validate_keep(batch, keep)
    extra = _check_extra(batch, extra, positions)
    if embeds is not None:
        embeds = list(embeds)
        if len(embeds) != len(batch):
            raise ValueError(f"embeds has {len(embeds)} entries for a batch of {len(batch)}; need one per sample")
        for i, (e, m) in enumerate(zip(embeds, masks)):
            if e is not None and tuple(e.shape[:1]) != (int(m.sum()),):
                raise ValueError(f"embeds[{i}] has {tuple(e.shape)} rows; sample {i} keeps {int(m.sum())} tokens")
    if decoder_inputs is not None and not _built_here:
        check_decoder_inputs(batch, decoder_inputs)
    dec = decoder_inputs if decoder_inputs is not None else vlm.adapter.decoder_inputs(vlm.model, batch.inputs)
    dec_embeds: torch.Tensor = dec["inputs_embeds"]
    bsz, seq, _ = dec_embeds.shape
    attn = dec["attention_mask"]
    device = dec_embeds.device
    attn = torch.ones(bsz, seq, dtype=torch.long, device=device) if attn is None else attn.to(device)
    pos = dec["position_ids"].to(device)
    if pos.dim() == 2:
        pos = _one_d_positions(attn)
    elif positions == "renumbered":
        raise ValueError("positions='renumbered' is not defined for multi-axis (mRoPE) position ids; use 'kept'")
    elif pos.dim() != 3:
        raise ValueError(f"position_ids of shape {tuple(pos.shape)}; expected (B, N) or (axes, B, N)")

    columns = []
    for i, (lay, m) in enumerate(zip(batch.layouts, masks)):
        valid = attn[i].bool().cpu().numpy()
        cols = np.flatnonzero(valid)
        dropped = lay.image_positions[~m]
        if dropped.size and not valid[dropped].all():
            raise ValueError(f"sample {i}: layout image positions fall on padding; layout and inputs disagree")
        columns.append(np.setdiff1d(cols, dropped, assume_unique=True))
    n_extra = [sum(int(t.shape[0]) for _, t in e) for e in extra]
    length = max(len(c) + n for c, n in zip(columns, n_extra))

    # per-token model inputs besides ids and mask (e.g. Gemma3's token_type_ids, from which the model
    # builds its bidirectional image-block mask) follow the kept columns
    extras = {
        k: v
        for k, v in dict(batch.inputs).items()
        if torch.is_tensor(v) and k not in ("input_ids", "attention_mask") and tuple(v.shape) == (bsz, seq)
    }
    new_extras = {k: v.new_zeros(bsz, length) for k, v in extras.items()}
    new_embeds = dec_embeds.new_zeros(bsz, length, dec_embeds.shape[-1])
    new_attn = attn.new_zeros(bsz, length)
    new_pos = pos.new_zeros(*pos.shape[:-1], length)
    source = torch.full((bsz, length), -1, dtype=torch.long, device=device)
    for i, cols in enumerate(columns):
        idx = torch.as_tensor(cols, dtype=torch.long, device=device)
        row = dec_embeds[i, idx]
        if embeds is not None and embeds[i] is not None:
            kept_pos = batch.layouts[i].image_positions[masks[i]]  # layout order, as embeds[i] rows
            img_cols = torch.as_tensor(np.searchsorted(cols, kept_pos), device=idx.device)
            row = row.clone()
            row[img_cols] = embeds[i].to(row.device, row.dtype)
        src = idx
        per_tok = {k: v[i, idx.to(v.device)] for k, v in extras.items()}
        ats = [_insert_at(batch.layouts[i], masks[i], cols, where) for where, _ in extra[i]]
        for j in sorted(range(len(ats)), key=lambda j: (ats[j], j), reverse=True):  # back to front
            at, e = ats[j], extra[i][j][1]
            row = torch.cat([row[:at], e.to(row.device, row.dtype), row[at:]])
            marker = torch.full((e.shape[0],), APPENDED, dtype=torch.long, device=device)
            src = torch.cat([src[:at], marker, src[at:]])
            # per-token inputs of an inserted token: those of the image block's first token (image kind)
            ref = int(batch.layouts[i].image_positions[0])
            per_tok = {
                k: torch.cat([t[:at], batch.inputs[k][i, ref].repeat(e.shape[0]).to(t.device), t[at:]])
                for k, t in per_tok.items()
            }
        n = row.shape[0]
        start = length - n  # left padding: every sample's last real token is the last column
        new_embeds[i, start:] = row
        new_attn[i, start:] = 1
        if positions == "renumbered":
            new_pos[i, start:] = torch.arange(n, device=pos.device) + pos[i, idx[0]]
        else:
            new_pos[..., i, start:] = pos[..., i, idx]
        source[i, start:] = src
        for k, t in per_tok.items():
            new_extras[k][i, start:] = t
    return ReducedInputs(new_embeds, new_attn, new_pos, source, new_extras)


def _check_extra(batch: Batch, extra, positions: str) -> list:
    if extra is None:
        return [[] for _ in range(len(batch))]
    extra = list(extra)
    if len(extra) != len(batch):
        raise ValueError(f"extra has {len(extra)} entries for a batch of {len(batch)}; need one per sample")
    out = []
    for i, e in enumerate(extra):
        pairs = [] if e is None else [e] if isinstance(e, tuple) else list(e)
        pairs = [(where, t) for where, t in pairs if t.shape[0] > 0]
        n_img = batch.layouts[i].n_image_tokens
        for where, _ in pairs:
            ok = where in ("start", "end") or (
                isinstance(where, tuple)
                and len(where) == 2
                and where[0] in ("before", "after")
                and isinstance(where[1], (int, np.integer))
                and 0 <= where[1] < n_img
            )
            if not ok:
                raise ValueError(
                    f"extra[{i}] is placed at {where!r}; accepted: 'start', 'end', ('before' | 'after', j) "
                    f"with j an image-token index 0..{n_img - 1}"
                )
        if pairs and positions != "renumbered":
            raise ValueError("extra tokens (no layout token) need positions='renumbered': they have no position id")
        out.append(pairs)
    return out


def _insert_at(layout, mask: np.ndarray, cols: np.ndarray, where: str) -> int:
    """Column (index into ``cols``) where extra tokens go: before the first kept image token / after
    the last; with none kept, where the image block starts / ends; before / after image token j."""
    if isinstance(where, tuple):
        p = int(layout.image_positions[where[1]])
        return int(np.searchsorted(cols, p, side="left" if where[0] == "before" else "right"))
    kept = layout.image_positions[mask]
    if where == "start":
        anchor = int(kept[0]) if kept.size else int(layout.positions.min())
        return int(np.searchsorted(cols, anchor, side="left"))
    anchor = int(kept[-1]) if kept.size else int(layout.positions.max())
    return int(np.searchsorted(cols, anchor, side="right"))
