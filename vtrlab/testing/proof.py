"""The layout proof: route features that name themselves through the model's own packing code
and check that every LM position holds what the layout says.

Each row n of the family's proof module output (see ``register_proof``) is replaced by the code
``((n + 1) % 128, MARK, (n + 1) // 128, 0, ...)`` (digits small enough to be exact in bfloat16);
the decoder's ``inputs_embeds`` are read back with the adapter's ``decoder_inputs`` and decoded.
"""

from __future__ import annotations

import numpy as np
import torch

from vtrlab.models.base import KIND_IMAGE, KIND_NEWLINE

from .registry import PROOF

MARK = 4096.0  # channel 1 of every code; no text embedding of a random model comes near it
BASE = 128


def _replace(out, codes_fn):
    """Replace the feature tensor inside a module output with identity codes."""
    if torch.is_tensor(out):
        return codes_fn(out)
    for name in ("pooler_output", "last_hidden_state"):
        t = getattr(out, name, None)
        if torch.is_tensor(t):
            new = codes_fn(t)
            setattr(out, name, new)
            if isinstance(out, dict) and name in out:
                out[name] = new
            return out
    if isinstance(out, tuple):
        return (codes_fn(out[0]),) + tuple(out[1:])
    raise TypeError(f"cannot find the feature tensor in a {type(out).__name__}")


def route_identity_codes(vlm, batch, module=None, codes=None):
    """(inputs_embeds as float, expected rows per sample, number of feature rows) with every feature
    row n of the proof module replaced by ``codes(t)`` (default: the identity code above)."""
    spec_module, expected = PROOF[vlm.family](vlm, batch)
    module = module or spec_module
    n_rows = {}

    def default_codes(t):
        flat = torch.zeros(t.numel() // t.shape[-1], t.shape[-1], dtype=t.dtype, device=t.device)
        n = torch.arange(1, flat.shape[0] + 1, device=t.device)
        if flat.shape[0] >= BASE * 256:
            raise ValueError(f"{flat.shape[0]} feature rows exceed what the bfloat16-safe code can name")
        flat[:, 0] = (n % BASE).to(t.dtype)
        flat[:, 1] = MARK
        flat[:, 2] = torch.div(n, BASE, rounding_mode="floor").to(t.dtype)
        return flat.reshape(t.shape)

    def wrapped(t):
        n_rows["n"] = t.numel() // t.shape[-1]
        return (codes or default_codes)(t)

    handle = module.register_forward_hook(lambda m, a, out: _replace(out, wrapped))
    try:
        embeds = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)["inputs_embeds"]
    finally:
        handle.remove()
    return embeds.float(), expected, n_rows["n"]


def assert_layout_proven(vlm, batch, n_images: list[int] | None = None) -> int:
    """Assert the whole proof for ``batch``; returns the number of image positions checked."""
    embeds, expected, n_rows = route_identity_codes(vlm, batch)
    ids = batch.inputs["input_ids"].cpu()
    newline = getattr(vlm.adapter, "newline_embedding", lambda m: None)(vlm.model)
    seen_rows = []
    for i, lay in enumerate(batch.layouts):
        e = embeds[i].cpu()
        is_code = e[:, 1] == MARK
        # (a) the processor's image placeholders are exactly the layout's image + newline positions
        placeholder = set(torch.nonzero(ids[i] == vlm.adapter.image_token_id(vlm.model)).flatten().tolist())
        fed = set(lay.positions[np.isin(lay.kind, [KIND_IMAGE, KIND_NEWLINE])].tolist())
        assert placeholder == fed, f"sample {i}: processor placeholders and layout positions disagree"
        if n_images is not None:
            assert sorted(set(lay.image.tolist())) == list(range(n_images[i]))
        # (b) every image position holds exactly the feature row the layout names
        img_pos = lay.image_positions
        assert is_code[img_pos].all(), f"sample {i}: some image positions hold no feature"
        got = (torch.round(e[img_pos, 0]) + BASE * torch.round(e[img_pos, 2])).long().numpy() - 1
        exp = np.asarray(expected[i])
        assert len(exp) == len(img_pos), f"sample {i}: proof spec gives {len(exp)} rows for {len(img_pos)} positions"
        assert (exp >= 0).all(), f"sample {i}: the layout names no single source for some positions"
        bad = np.flatnonzero(got != exp)
        assert bad.size == 0, (
            f"sample {i}: {bad.size}/{len(exp)} positions hold another feature than the layout names; first: "
            f"position {img_pos[bad[0]]} holds row {got[bad[0]]}, layout says {exp[bad[0]]}"
        )
        assert torch.all(e[img_pos, 3:] == 0)
        seen_rows.append(got)
        others = np.setdiff1d(np.arange(e.shape[0]), img_pos)
        assert not is_code[others].any(), f"sample {i}: a feature landed outside the layout's image positions"
        nl = lay.positions[lay.kind == KIND_NEWLINE]
        if len(nl):
            assert newline is not None, f"{vlm.family} has newline tokens but its adapter gives no newline_embedding"
            assert torch.equal(e[nl], newline.detach().float().cpu().expand(len(nl), -1)), "newline positions differ"
        # bookkeeping
        assert lay.seq_len == ids.shape[1]
        assert np.isin(lay.positions, lay.valid_positions).all()
        assert not np.isin(lay.question_positions, lay.positions).any()
        assert lay.last_position == int(torch.nonzero(batch.inputs["attention_mask"][i]).max())
        sel = lay.kind == KIND_IMAGE
        for j, t in set(zip(lay.image[sel].tolist(), lay.tile[sel].tolist())):
            grid = lay.to_grid(np.ones(lay.n_image_tokens), j, t)
            assert np.nansum(grid) == (sel & (lay.image == j) & (lay.tile == t)).sum(), "two tokens share a grid cell"
    rows = np.concatenate(seen_rows)
    assert len(np.unique(rows)) == len(rows), "two positions claim the same feature row"
    assert rows.max() < n_rows
    return len(rows)
