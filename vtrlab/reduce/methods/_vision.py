"""Vision-tower signals of the projector-stage methods, mapped onto the layout's image tokens.

* :func:`token_attention` — per sample, per layout image token: [CLS]→patch attention of a vision
  layer (probe sites in a vision-only forward, no eager attention, no LM), heads aggregated as the
  method does; where the tower
  has no [CLS] it is the mean attention each patch receives (capture's substitute). Where one LM
  token covers several vision patches (Qwen's 2×2 merger, Idefics3's pixel shuffle, Gemma3's
  pooling) the token's score is the mean over its patches — pooled as the merger pools.
* :func:`crop_attention` — the same per vision crop, (H, V) over that crop's patches (vpos order).
* :func:`tower_tensor` — output of a module of the tower (a layer, its ``k_proj``/``q_proj``) per
  crop, through a forward hook (removed in ``finally``), cached per batch in the context.
* :func:`one_to_one` — the crop and patch behind each image token where tokens and patches are 1:1
  (LLaVA-family CLIP towers); methods that merge tower features need it.
"""

from __future__ import annotations

import numpy as np
import torch

from ...models.base import KIND_IMAGE
from ..context import vision_layer_index
from ..registry import NotApplicable, Selection

HEAD_AGG = ("mean", "sum")


def _agg(values: np.ndarray, heads: str) -> np.ndarray:
    if heads not in HEAD_AGG:
        raise ValueError(f"heads={heads!r}; accepted: {', '.join(HEAD_AGG)}")
    return values.mean(-2) if heads == "mean" else values.sum(-2)


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` (float32, any devices) on the host, those on one device in one copy (the same path on a
    CPU model, where the copy is a no-op: the tests run the code the GPU runs)."""
    out: list = [None] * len(tensors)
    by_dev: dict = {}
    for j, t in enumerate(tensors):
        by_dev.setdefault(t.device, []).append(j)
    for js in by_dev.values():
        flat = torch.cat([tensors[j].reshape(-1) for j in js]).cpu()
        for j, part in zip(js, flat.split([tensors[j].numel() for j in js])):
            out[j] = part.view(tensors[j].shape)
    return out


def vision_forward(ctx, attention: list[int] = (), tensors: dict | None = None) -> None:
    """ONE vision-only forward that records what a method needs, cached in the context:

    * ``attention``: vision layers whose [CLS]→key attention (mean attention received without a
      [CLS]) is recorded by probe sites of the session every probe joins (no eager attention);
    * ``tensors``: ``{key: module}`` of the tower whose outputs are kept (forward hooks, removed in
      ``finally``; tower calls concatenated along the first axis).

    The forward stops before the LM (``adapter.decoder_inputs``), so scoring costs the tower, not a
    prefill. Items already cached are not recomputed."""
    from ...probes.attention import Site, session
    from ...probes.switch import attention_switched

    vlm = ctx.vlm
    have_p = ctx.cached("vision_probs_by_layer", dict)
    have_t = ctx.cached("tower_tensors", dict)
    idx = sorted({vision_layer_index(vlm, layer) for layer in attention} - set(have_p))
    todo = {k: m for k, m in (tensors or {}).items() if k not in have_t}
    asked = ctx.cached("vision_requests", lambda: {"attention": set(), "tensors": {}})
    asked["attention"].update(vision_layer_index(vlm, layer) for layer in attention)
    asked["tensors"].update(tensors or {})
    if not idx and not todo:
        return
    mode = "cls" if vlm.has_cls else "mean"
    vis = ctx.layouts[0].vision
    has_cls_row = vis is not None and bool((vis["kind"] == "cls").any())
    cls_index = int(vis.loc[vis["kind"] == "cls", "vpos"].iloc[0]) if has_cls_row else 0
    sites = {
        id(vlm.adapter.vision_attention(vlm.vision_layers[i])): Site(
            "vision", i, vision_mode=mode, cls_index=cls_index, probe="vtrlab.reduce"
        )
        for i in idx
    }
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in todo}
    handles = []

    def make(key):
        def hook(_m, _a, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            outs[key].append(h.detach())

        return hook

    try:
        for k, m in todo.items():
            handles.append(m.register_forward_hook(make(k)))
        with attention_switched(vlm.model), session(sites), torch.no_grad():
            dec = vlm.adapter.decoder_inputs(vlm.model, ctx.batch.inputs)
        ctx.offer_decoder_inputs(dec)  # the LM's inputs come from this same forward: the tower runs once
    finally:
        for h in handles:
            h.remove()
    for site in sites.values():
        if not site.probs:
            raise RuntimeError(f"vision layer {site.layer}'s attention never ran through {type(vlm.model).__name__}")
    for k, v in outs.items():
        if not v:
            raise RuntimeError(f"{type(todo[k]).__name__} ({k}) did not run during the vision forward")
    # float32 on the host: scoring runs in float64 on the CPU whatever the tower's dtype and device; every
    # recorded layer and tensor goes over in ONE copy (no device sync per layer)
    keys = [("p", site.layer) for site in sites.values()] + [("t", k) for k in outs]
    dev = [torch.cat(site.probs, dim=-1).float() for site in sites.values()]
    dev += [torch.cat(v, 0).float() for v in outs.values()]
    for (kind, key), host in zip(keys, _to_host(dev)):
        (have_p if kind == "p" else have_t)[key] = host


def replay_signals(ctx, requests: dict) -> None:
    """Record in ``ctx`` (a fresh context of the same batch) what a method's :func:`vision_forward` calls
    asked for (``requests``: the ``"vision_requests"`` signal of the context they ran in), in ONE
    forward: the instrumented tower of that method without its scoring (benchmarks time it against a
    plain forward)."""
    vision_forward(ctx, attention=sorted(requests["attention"]), tensors=dict(requests["tensors"]))


def scoring_device(ctx) -> torch.device:
    """Where a method's float64 tensor work runs: the model's device. Tower signals are cached on the host
    (float32); methods whose scoring is heavy (VisionZip's merge, VisPruner's dedup loop) copy their inputs
    there and one result back — on a CPU model nothing moves, so results are those of the host code."""
    return torch.device(ctx.vlm.device)


def prefetch_attention(ctx, layers: list[int]) -> None:
    """Record the vision attention of several layers in one forward (VTC-CLS, HiRED)."""
    vision_forward(ctx, attention=layers)


def _layer_probs(ctx, layer: int) -> torch.Tensor:
    idx = vision_layer_index(ctx.vlm, layer)
    vision_forward(ctx, attention=[idx])
    return ctx.cached("vision_probs_by_layer", dict)[idx]


def _table_rows(ctx, sample: int, n_calls: int, seq: int):
    """(vision table of the sample, crop, vpos): where each table row sits in a tower output of
    ``n_calls`` sequences of ``seq`` tokens (packed towers: one sequence holding every crop). Cached."""
    return ctx.cached(("table_rows", sample, n_calls, seq), lambda: _table_rows_uncached(ctx, sample, n_calls, seq))


def _table_rows_uncached(ctx, sample: int, n_calls: int, seq: int):
    tables = [lay.vision for lay in ctx.layouts]
    if any(t is None for t in tables):
        raise ValueError("a layout has no vision-encoder table; vision attention cannot be mapped to its tokens")
    counts: dict[int, int] = {}
    for t in tables:
        for c, n in t["crop"].value_counts().items():
            counts[int(c)] = counts.get(int(c), 0) + int(n)
    offsets, at = {}, 0
    for c in sorted(counts):
        offsets[c], at = at, at + counts[c]
    t = tables[sample].reset_index(drop=True)
    crop, vpos = t["crop"].to_numpy().astype(int), t["vpos"].to_numpy().astype(int)
    if n_calls == 1 and len(offsets) > 1:  # packed tower: one sequence holding every crop
        vpos = vpos + np.array([offsets[int(c)] for c in crop])
        crop = np.zeros_like(crop)
    if crop.max() >= n_calls or vpos.max() >= seq:
        raise ValueError(
            f"sample {sample}'s vision table names crop {t['crop'].max()} / vpos {t['vpos'].max()}, "
            f"but the tower ran {n_calls} sequence(s) of {seq} tokens"
        )
    return t, crop, vpos


def _patch_values(ctx, layer: int, sample: int):
    """(vision table of the sample, values (H, rows)) at ``layer``: each vision-table row's attention."""
    p = _layer_probs(ctx, layer).numpy()  # (calls_B, H, S)
    t, crop, vpos = _table_rows(ctx, sample, p.shape[0], p.shape[2])
    return t, p[crop, :, vpos].T.astype(np.float64)


def token_vectors(ctx, x: torch.Tensor, sample: int) -> torch.Tensor:
    """Per layout image token of ``sample`` (layout order), the mean of a tower output ``x`` ((calls, S, C),
    or (S, C) for packed towers) over the patches the token covers — pooled as the merger pools. float64."""
    if x.dim() == 2:
        x = x[None]
    lay = ctx.layouts[sample]
    t, crop, vpos = _table_rows(ctx, sample, x.shape[0], x.shape[1])
    rows, tok = _row_tokens(ctx, sample, t)
    sums = torch.zeros(lay.n_image_tokens, x.shape[-1], dtype=torch.float64)
    # one gather and one in-order accumulation (index_add_ adds row by row, as a loop over rows would)
    vals = x[torch.as_tensor(crop[rows]), torch.as_tensor(vpos[rows])].double().cpu()
    sums.index_add_(0, torch.as_tensor(tok), vals)
    counts = torch.as_tensor(np.bincount(tok, minlength=lay.n_image_tokens), dtype=torch.float64)
    if (counts == 0).any():
        raise RuntimeError(f"sample {sample}: {int((counts == 0).sum())} image tokens cover no vision patch")
    return sums / counts[:, None]


def layer_keys(ctx, layer: int, method: str = "?") -> torch.Tensor:
    """Raw keys of vision layer ``layer``'s attention, heads concatenated, per tower call: ``k_proj``'s
    output, or the key third of a fused ``qkv`` projection (Qwen's ViT); before any rotary embedding."""
    vlm = ctx.vlm
    idx = vision_layer_index(vlm, layer)
    attn = vlm.adapter.vision_attention(vlm.vision_layers[idx])
    if getattr(attn, "k_proj", None) is not None:
        return layer_proj(ctx, layer, "k_proj")
    qkv = getattr(attn, "qkv", None)
    if qkv is None:
        raise NotApplicable(method, vlm.family, "the vision attention has neither k_proj nor a fused qkv projection")
    out = tower_tensor(ctx, qkv, f"qkv{idx}")
    c = out.shape[-1] // 3
    return out[..., c : 2 * c]


def _row_tokens(ctx, sample: int, t) -> tuple[np.ndarray, np.ndarray]:
    """(rows, tokens): the vision-table rows of ``sample`` that are patches of an image token, and that
    token's layout index — matched on (image, tile, row, col) with arrays, not a per-row lookup (a
    Python loop over pandas cells cost ~0.1 ms per patch: 0.3 s at LLaVA-NeXT's 2,880). Where two
    tokens share a key the later one wins, as in :func:`_token_index`. Cached per sample."""

    def compute():
        lay = ctx.layouts[sample]
        img = lay.kind == KIND_IMAGE
        tok_keys = np.stack([np.asarray(getattr(lay, c))[img] for c in ("image", "tile", "row", "col")], 1)
        tab = np.stack([t[c].to_numpy().astype(np.int64) for c in ("image", "tile", "row", "col")], 1)
        ok = np.flatnonzero((t["kind"].to_numpy() == "patch") & (tab[:, 2] >= 0))
        j = _match_keys(tok_keys.astype(np.int64), tab[ok])
        return ok[j >= 0], j[j >= 0]

    return ctx.cached(("row_tokens", sample), compute)


def _token_index(lay) -> dict[tuple[int, int, int, int], int]:
    """The definition :func:`_match_keys` reproduces with arrays: token index by (image, tile, row, col),
    the later token winning where two share a key (a per-row lookup in it was the old, slow path; kept as
    the tests' reference)."""
    img = lay.kind == KIND_IMAGE
    keys = zip(lay.image[img], lay.tile[img], lay.row[img], lay.col[img])
    return {tuple(int(v) for v in k): j for j, k in enumerate(keys)}


def token_attention(ctx, layer: int, heads: str = "mean") -> list[np.ndarray]:
    """Per sample, (n_image_tokens,) float64 attention of vision layer ``layer`` (see module doc)."""

    def compute():
        out = []
        for b, lay in enumerate(ctx.layouts):
            t, vals = _patch_values(ctx, layer, b)
            a = _agg(vals, heads)  # (rows,)
            rows, tok = _row_tokens(ctx, b, t)
            # bincount accumulates in row order, as the per-row loop did (same float64 sums)
            sums = np.bincount(tok, weights=a[rows], minlength=lay.n_image_tokens)
            counts = np.bincount(tok, minlength=lay.n_image_tokens).astype(np.float64)
            if (counts == 0).any():
                raise RuntimeError(f"sample {b}: {int((counts == 0).sum())} image tokens cover no vision patch")
            out.append(sums / counts)
        return out

    return ctx.cached(("token_attention", vision_layer_index(ctx.vlm, layer), heads), compute)


def crop_attention(ctx, layer: int, sample: int, crop: int) -> torch.Tensor:
    """(H, V) [CLS]→patch attention of one crop at ``layer``, patches in vpos order (float64)."""
    t, vals = _patch_values(ctx, layer, sample)
    sel = np.flatnonzero((t["kind"].to_numpy() == "patch") & (t["crop"].to_numpy() == crop))
    sel = sel[np.argsort(t["vpos"].to_numpy()[sel], kind="stable")]
    return torch.as_tensor(vals[:, sel], dtype=torch.float64)


def tower_tensor(ctx, module, key: str) -> torch.Tensor:
    """Output of ``module`` (part of the vision tower) for this batch, cached under ``key``; tower
    calls concatenated along their first axis (crops). See :func:`vision_forward`."""
    vision_forward(ctx, tensors={key: module})
    return ctx.cached("tower_tensors", dict)[key]


def hidden_module(vlm, layer: int) -> tuple[str, torch.nn.Module]:
    """(cache key, module) whose output is vision layer ``layer``'s output (``hidden_states[layer]``
    in LLaVA's convention for negative values: -2 is the second-to-last layer's output)."""
    idx = vision_layer_index(vlm, layer)
    return f"hidden{idx}", vlm.vision_layers[idx]


def proj_module(vlm, layer: int, name: str, method: str = "?") -> tuple[str, torch.nn.Module]:
    """(cache key, module) of ``q_proj``/``k_proj`` of vision layer ``layer``'s attention."""
    idx = vision_layer_index(vlm, layer)
    mod = getattr(vlm.adapter.vision_attention(vlm.vision_layers[idx]), name, None)
    if mod is None:
        raise NotApplicable(method, vlm.family, f"the vision attention has no {name}")
    return f"{name}{idx}", mod


def layer_hidden(ctx, layer: int) -> torch.Tensor:
    """(crops, S, D) output of vision layer ``layer`` (see :func:`hidden_module`)."""
    return tower_tensor(ctx, hidden_module(ctx.vlm, layer)[1], hidden_module(ctx.vlm, layer)[0])


def layer_proj(ctx, layer: int, name: str) -> torch.Tensor:
    """(crops, S, C) output of ``q_proj``/``k_proj`` of vision layer ``layer``'s attention."""
    key, mod = proj_module(ctx.vlm, layer, name)
    return tower_tensor(ctx, mod, key)


def one_to_one(lay, family: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(crop, vpos) of each layout image token where tokens and vision patches are 1:1.

    Patches are matched to tokens on (image, tile, row, col) with arrays (a per-row pandas loop cost
    ~45 ms a crop at 576 patches); where two tokens share a key the later one wins (as a dict built in
    layout order would)."""
    out = _one_to_one(lay)
    if isinstance(out, str):
        raise NotApplicable(method, family, out)
    return out


def _one_to_one(lay):
    vis = lay.vision
    if vis is None:
        return "the layout has no vision-encoder table"
    img = lay.kind == KIND_IMAGE
    tok_keys = np.stack([np.asarray(getattr(lay, c))[img] for c in ("image", "tile", "row", "col")], 1)
    tok_keys = tok_keys.astype(np.int64)
    sel = (vis["kind"].to_numpy() == "patch") & (vis["row"].to_numpy() >= 0)
    tab = np.stack([vis[c].to_numpy()[sel].astype(np.int64) for c in ("image", "tile", "row", "col")], 1)
    pcrop = vis["crop"].to_numpy()[sel].astype(np.int64)
    pvpos = vis["vpos"].to_numpy()[sel].astype(np.int64)
    j = _match_keys(tok_keys, tab)
    hit = j >= 0
    crop = np.full(lay.n_image_tokens, -1)
    vpos = np.full(lay.n_image_tokens, -1)
    if len(np.unique(j[hit])) != int(hit.sum()):
        return "LM tokens merge several vision patches; the method merges tower features of single patches"
    crop[j[hit]], vpos[j[hit]] = pcrop[hit], pvpos[hit]
    return crop, vpos


def _match_keys(tok_keys: np.ndarray, tab: np.ndarray) -> np.ndarray:
    """For each row of ``tab`` (n, 4) the index of the LAST row of ``tok_keys`` (m, 4) with the same key,
    -1 where none has it."""
    if tab.shape[0] == 0 or tok_keys.shape[0] == 0:
        return np.full(tab.shape[0], -1, dtype=np.int64)
    both = np.concatenate([tok_keys, tab])
    lo = both.min(0)
    dims = tuple(int(d) for d in both.max(0) - lo + 1)
    tk = np.ravel_multi_index(tuple((tok_keys - lo).T), dims)
    rk = np.ravel_multi_index(tuple((tab - lo).T), dims)
    order = np.argsort(tk, kind="stable")
    at = np.searchsorted(tk[order], rk, side="right") - 1  # the last token with that key
    hit = (at >= 0) & (tk[order][np.clip(at, 0, None)] == rk)
    return np.where(hit, order[np.clip(at, 0, None)], -1).astype(np.int64)


def feature_layer_or(vlm, value, method: str, param: str) -> int:
    """A vision-layer parameter whose default (None) is the layer the model's projector reads: the
    official code hard-codes LLaVA-1.5's (-2); on a model that projects another layer (the organism
    projects the last) reading -2 would hand the projector features it was never trained on."""
    if value is None:
        return int(vlm.adapter.vision_feature_layer(vlm.model))
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{method}: {param}={value!r}; accepted: None (the model's feature layer) or an int vision layer"
        )
    return int(value)


def require_cls(vlm, method: str, why: str) -> None:
    if not vlm.has_cls:
        raise NotApplicable(method, vlm.family, f"the vision tower has no [CLS] token, and {why}")


def require_llava_tower(vlm, method: str) -> None:
    """Methods that read per-crop tower features: LLaVA-family towers (one sequence per crop)."""
    if vlm.family not in ("llava", "llava_next", "llava_onevision"):
        raise NotApplicable(
            method,
            vlm.family,
            "it merges or compares tower features per crop, which vtrlab reads "
            "from LLaVA-family towers only (one sequence per crop)",
        )


def single_crop(lay, family: str, method: str) -> tuple[int, np.ndarray]:
    """(crop, token order by vpos) for a sample whose image tokens all come from one crop, 1:1,
    patches 1..V after one [CLS] (LLaVA-1.5's CLIP tower)."""
    crop, vpos = one_to_one(lay, family, method)
    crops = np.unique(crop)
    if len(crops) != 1:
        raise NotApplicable(
            method,
            family,
            f"a sample spans {len(crops)} vision crops; vtrlab implements this "
            "method on single-crop images (LLaVA-1.5 style: one image, no anyres tiles)",
        )
    order = np.argsort(vpos, kind="stable")
    if not np.array_equal(vpos[order], np.arange(1, len(vpos) + 1)):
        raise NotApplicable(method, family, "the crop's patches are not all image tokens after one [CLS]")
    return int(crops[0]), order


def heads_mean(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(S, C) projection -> (S, C / n_heads): the mean over heads of the per-head vectors."""
    return x.reshape(x.shape[0], n_heads, -1).mean(1)


def n_vision_heads(vlm, layer: int) -> int:
    attn = vlm.adapter.vision_attention(vlm.vision_layers[vision_layer_index(vlm, layer)])
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            return int(getattr(attn, name))
    return int(attn.config.num_attention_heads)


def project(vlm, feats: torch.Tensor) -> torch.Tensor:
    """Tower features (N, D) through the model's projector (LLaVA: the MLP) -> (N, D_lm)."""
    proj = vlm.adapter.projector(vlm.model)
    p = next(proj.parameters())
    with torch.no_grad():
        return proj(feats.to(p.device, p.dtype))


# ---------------------------------------------------------------------------------------------
# anyres: one tower sequence per crop (LLaVA-NeXT / LLaVA-OneVision base view + tiles)


class CropTokens:
    """One vision crop of a sample on a 1:1 tower (LLaVA families), as the layout sees it.

    ``crop``: the tower call (index into tower outputs / ``vision_crops``). ``tokens``: layout
    image-token indices of the crop's patches that reach the LM, in vpos (raster) order; ``vpos``:
    their positions in the crop's tower sequence. ``columns``: their indices among **all** the
    crop's patches in vpos order (the columns of :func:`crop_attention`); patches the model unpads
    away (LLaVA-NeXT's padding rows/columns of the tile grid) have no layout token and no column
    here. ``contiguous``: the crop's tokens form one run of the LM sequence (LLaVA-1.5's single crop,
    the anyres base view), so a method's own LM order can be reproduced in its slots; the tiles of
    the anyres grid share rows (and the model's newline tokens) with each other and are not.
    """

    def __init__(self, crop: int, tokens: np.ndarray, vpos: np.ndarray, columns: np.ndarray, contiguous: bool):
        self.crop, self.tokens, self.vpos, self.columns, self.contiguous = crop, tokens, vpos, columns, contiguous

    def __len__(self) -> int:
        return len(self.tokens)


def per_crop(ctx) -> bool:
    """Whether a batch needs the per-crop (anyres) path: some sample spans several vision crops."""
    return any(lay.vision is not None and lay.vision["crop"].nunique() > 1 for lay in ctx.layouts)


def crop_tokens(lay, family: str, method: str) -> list[CropTokens]:
    """The sample's crops (tower order) with the layout tokens of each (see :class:`CropTokens`)."""
    crop, vpos = one_to_one(lay, family, method)
    vis = lay.vision
    img_pos = lay.image_positions
    out = []
    for c in np.unique(crop):
        idx = np.flatnonzero(crop == c)
        idx = idx[np.argsort(vpos[idx], kind="stable")]
        all_v = np.sort(vis.loc[(vis["crop"] == c) & (vis["kind"] == "patch"), "vpos"].to_numpy().astype(int))
        cols = np.searchsorted(all_v, vpos[idx])
        if not np.array_equal(all_v[cols], vpos[idx]):
            raise RuntimeError(f"crop {c}: layout patches missing from the vision table")
        pos = np.sort(img_pos[idx])
        # contiguous: one run of the sequence, no other token (newline, other crop) inside it
        contiguous = bool(pos[-1] - pos[0] == len(pos) - 1)
        out.append(CropTokens(int(c), idx, vpos[idx], cols, contiguous))
    return out


def split_budget(n: int, sizes: list[int]) -> list[int]:
    """``n`` split over parts of ``sizes`` in proportion to their sizes (largest remainder; ties: the
    earlier part), each part at most its size; sums to ``n`` exactly."""
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    if not 0 <= n <= total:
        raise ValueError(f"budget {n} outside 0..{total} (the crops hold {total} image tokens)")
    if total == 0:
        return [0] * len(sizes)
    quota = [n * s / total for s in sizes]
    out = [int(np.floor(q)) for q in quota]
    order = sorted(range(len(sizes)), key=lambda j: (-(quota[j] - out[j]), j))
    for j in order[: n - sum(out)]:
        out[j] += 1
    return out


def place_outputs(lay, crops: list[CropTokens], outputs: list[tuple[np.ndarray, torch.Tensor]]):
    """Put each crop's output tokens (``outputs[c] = (sources, embeds)`` in the method's LM order;
    ``sources`` a layout image-token index, or -1 for a token that is no layout token — a [CLS],
    PruMerge's extra token) into the keep path's terms: (keep mask, embeds of the kept tokens in
    layout order, extras ``[(anchor, tensor), ...]``).

    A contiguous crop's kept slots receive its tokens in the method's order, with its leading
    non-layout tokens inserted before the crop's run and its trailing ones after it, so the LM sees
    the method's sequence (renumbered positions). Tokens of a crop of the anyres grid sit in their
    own slots (raster order of the grid, the model's newline tokens kept); its non-layout tokens are
    inserted after the grid (after the last token of its image and tile), in crop order."""
    img = lay.kind == KIND_IMAGE
    n_tok = lay.n_image_tokens
    pos = lay.image_positions
    keep = np.zeros(n_tok, dtype=bool)
    slot_emb: dict[int, torch.Tensor] = {}
    extras = []
    for ct, (src, emb) in zip(crops, outputs):
        src = np.asarray(src)
        is_tok = src >= 0
        toks = src[is_tok]
        if len(np.unique(toks)) != len(toks) or not np.isin(toks, ct.tokens).all():
            raise RuntimeError(f"crop {ct.crop}: output tokens are not distinct tokens of the crop")
        keep[toks] = True
        rows = np.flatnonzero(is_tok)
        by_pos = ct.tokens[np.argsort(pos[ct.tokens], kind="stable")]
        if ct.contiguous:
            slots = np.sort(toks)  # layout order == sequence order within the run
            for s, r in zip(slots, rows):
                slot_emb[int(s)] = emb[r]
            non = np.flatnonzero(~is_tok)
            lead, trail = (non[non < rows[0]], non[non > rows[-1]]) if rows.size else (non, non[:0])
            if lead.size + trail.size != non.size:
                raise RuntimeError(f"crop {ct.crop}: non-layout tokens inside the method's sequence")
            if lead.size:
                extras.append((("before", int(by_pos[0])), emb[lead]))
            if trail.size:
                extras.append((("after", int(by_pos[-1])), emb[trail]))
        else:
            for s, r in zip(toks, rows):
                slot_emb[int(s)] = emb[r]
            non = np.flatnonzero(~is_tok)
            if non.size:
                j = ct.tokens[0]
                block = np.flatnonzero((lay.image[img] == lay.image[img][j]) & (lay.tile[img] == lay.tile[img][j]))
                extras.append((("after", int(block[np.argmax(pos[block])])), emb[non]))
    kept = np.flatnonzero(keep)
    if kept.size:
        embeds = torch.stack([slot_emb[int(s)] for s in kept])
    else:
        ref = next((e for _, e in outputs if e is not None and e.numel()), None)
        embeds = None if ref is None else ref.new_zeros(0, ref.shape[-1])
    return keep, embeds, extras


class PerCropResults:
    """Collects a per-crop (anyres) method's samples: each sample's crop outputs go through
    :func:`place_outputs` once (:meth:`add`), and :meth:`selection` builds the one Selection."""

    def __init__(self):
        self.keep, self.scores, self.embeds, self.groups, self.extra = [], [], [], [], []

    def add(self, lay, crops, outputs, scores: np.ndarray, group: np.ndarray | None = None) -> None:
        m, e, x = place_outputs(lay, crops, outputs)
        self.keep.append(m)
        self.scores.append(scores)
        self.embeds.append(e)
        self.extra.append(x)
        if group is not None:
            self.groups.append(group)

    def selection(self, *, extra: bool = False, **info) -> Selection:
        """``extra``: the crops' non-layout tokens ([CLS], merged extras) go to the LM too."""
        if extra:
            info = {"extra": self.extra, "embeds_order": "method (LM) order per crop", **info}
        return Selection(
            keep=self.keep,
            scores=self.scores,
            embeds=self.embeds,
            group=self.groups or None,
            info={**info, "budget_split": "per crop"},
        )
