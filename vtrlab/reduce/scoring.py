"""Pure scoring and selection rules of the vision/projector-stage reduction methods.

Each function works on plain tensors of ONE vision sequence (one crop, or one sample's image
tokens) and returns indices/embeddings; nothing here touches a model. The methods under
:mod:`vtrlab.reduce.methods` gather the signals (vision-tower [CLS] attention, hidden states,
keys, projector outputs) and call these. Every rule is written from the official code's
definition (named in each docstring); tie-breaking is made deterministic (equal scores: the
lower index wins), where the official code leaves it to ``torch.topk``.

Conventions: ``V`` patches (no [CLS]) unless a function says the [CLS] row is included;
indices are 0-based into the patch axis; attention tensors are probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _check_k(k: int, n: int, what: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{what}={k!r}: need an integer in 0..{n}")
    if not 0 <= int(k) <= n:
        raise ValueError(f"{what}={k} is outside 0..{n} (there are {n} tokens)")
    return int(k)


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorted by score, largest first; equal scores keep index order (stable)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    return torch.sort(scores, descending=True, stable=True).indices


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring indices in ascending index order (ties: lower index wins)."""
    k = _check_k(k, scores.shape[0])
    return rank_desc(scores)[:k].sort().values


def mask_of(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of length ``n`` with ``idx`` set."""
    m = torch.zeros(n, dtype=torch.bool, device=idx.device)
    m[idx] = True
    return m


# ---------------------------------------------------------------------------------------------
# [CLS]-attention rankers


def fastervlm_select(cls_attn: torch.Tensor, k: int) -> torch.Tensor:
    """FasterVLM (Theia-4869/FasterVLM, ``llava_arch.py::encode_images``): head-mean [CLS]→patch
    attention ``(H, V)`` of the chosen vision layer, top ``k`` (ascending indices)."""
    return top_k(cls_attn.mean(0), k)


def vtc_cls_scores(cls_attn_layers: torch.Tensor) -> torch.Tensor:
    """VTC-CLS (THU-MIG/VTC-CLS, ``clip_encoder.py::cls_token_only``): Σ over layers of the
    head-mean [CLS]→patch attention; ``cls_attn_layers`` is ``(L, H, V)``."""
    return cls_attn_layers.mean(1).sum(0)


# ---------------------------------------------------------------------------------------------
# VisionZip


@dataclass
class MergeResult:
    """Output tokens of one sequence in the order the method sends them to the LM.

    ``sources[j]``: patch index output token j stands for, -1 for a token that is no patch (the
    [CLS] token, PruMerge's extra token). ``embeds``: (n_out, D) features of the output tokens in
    the space the method merges in (vision-tower features before the projector). ``group[v]``:
    for each patch, the patch index of the output token it was merged into (itself when kept,
    -1 when dropped or merged only into a non-patch token). ``scores``: what the method ranked by.
    """

    sources: torch.Tensor
    embeds: torch.Tensor
    group: torch.Tensor
    scores: torch.Tensor


def visionzip_merge(
    cls_attn: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    has_cls: bool = True,
) -> MergeResult:
    """VisionZip (dvlab-research/VisionZip, ``visionzip/clip_encoder.py``; ``main.py`` passes
    ``dominant - 1`` to the tower).

    ``cls_attn`` (H, V): [CLS]→patch attention of the chosen layer, **summed** over heads.
    ``hidden`` (1+V, D) / ``keys`` (1+V, d): that layer's output hidden states and its head-mean
    raw keys (``k_proj`` output, before any scaling), [CLS] row first when ``has_cls``, else
    (V, ·). Dominant: the top ``dominant - 1`` patches **plus the [CLS] token itself** (without a
    [CLS]: the top ``dominant`` patches). Contextual: the remaining patches (ascending), ``C``
    targets at ``arange(0, R, max(1, R // C))[:C]``; every other remaining patch goes to the
    target of highest cosine of normalised keys (first on ties); a target's token is
    ``target + mean(assigned)`` (its own feature plus the mean of the others, not a mean over
    all). LM order: [CLS], dominant patches ascending, contextual targets ascending.
    """
    H, V = cls_attn.shape
    off = 1 if has_cls else 0
    if hidden.shape[0] != V + off or keys.shape[0] != V + off:
        raise ValueError(
            f"hidden/keys have {hidden.shape[0]}/{keys.shape[0]} rows; expected {V + off} "
            f"({V} patches{' + [CLS]' if has_cls else ''})"
        )
    n_dom = dominant - off
    _check_k(n_dom, V, "dominant patches")
    scores = cls_attn.sum(0)
    dom = top_k(scores, n_dom)
    rest = torch.nonzero(~mask_of(dom, V)).flatten()
    R = rest.numel()
    contextual = _check_k(contextual, R, "contextual")
    group = torch.full((V,), -1, dtype=torch.long, device=cls_attn.device)
    group[dom] = dom
    parts = [hidden[:1]] if has_cls else []
    parts.append(hidden[dom + off])
    sources = [torch.full((off,), -1, dtype=torch.long, device=cls_attn.device), dom]
    if contextual > 0:
        step = max(1, R // contextual)
        t_pos = torch.arange(0, R, step, device=cls_attn.device)[:contextual]
        is_t = mask_of(t_pos, R)
        o_pos = torch.nonzero(~is_t).flatten()
        metric = keys[rest + off]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        sim = metric[o_pos] @ metric[t_pos].T  # (others, C)
        assign = sim.argmax(dim=1) if o_pos.numel() else torch.zeros(0, dtype=torch.long, device=sim.device)
        feats = hidden[rest + off]
        agg = torch.zeros(t_pos.numel(), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        agg.index_add_(0, assign, feats[o_pos])
        counts = torch.bincount(assign, minlength=t_pos.numel()).clamp(min=1).to(hidden.dtype)
        parts.append(feats[t_pos] + agg / counts[:, None])
        targets = rest[t_pos]
        sources.append(targets)
        group[targets] = targets
        group[rest[o_pos]] = targets[assign]
    return MergeResult(torch.cat(sources), torch.cat(parts), group, scores)


def visionzip_split(n_tokens: int, contextual_ratio: float = 10 / 64) -> tuple[int, int]:
    """(dominant, contextual) for a budget of ``n_tokens`` LM tokens, in the code's proportion
    (54+10, 108+20, 162+30: contextual = round(n · 10/64))."""
    c = int(round(n_tokens * contextual_ratio))
    return n_tokens - c, c


# ---------------------------------------------------------------------------------------------
# PruMerge / PruMerge+


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """Number of scores above Q3 + 1.5·IQR (numpy's linear percentiles, as PruMerge computes)."""
    a = scores.detach().float().cpu().numpy().ravel()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return int((a > q3 + 1.5 * (q3 - q1)).sum())


def prumerge_cls_attention(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q_CLS · Kᵀ / √C) over all 1+V tokens, full width C (no heads), patches returned (V,).

    ``q_cls`` (C,) and ``k`` (1+V, C) are the ``q_proj``/``k_proj`` outputs of the layer."""
    logits = (k @ q_cls) * q_cls.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1)[1:]


def prumerge_plus_grid(picked: torch.Tensor, ratio: float, n: int) -> torch.Tensor:
    """PruMerge+'s spatial supplement: ``arange(0, n - 1, int(int(1/ratio) / 3))`` minus the picked
    tokens (the code hard-codes ``n - 1 = 575``); the step is clamped to ≥ 1."""
    step = max(1, int(int(1 / ratio) / 3)) if ratio > 0 else 1
    seq = torch.arange(0, n - 1, step, device=picked.device)
    return seq[~torch.isin(seq, picked)]


def prumerge_merge(
    cls_attn: torch.Tensor,
    keys: torch.Tensor,
    feats: torch.Tensor,
    picked: torch.Tensor,
    n_neighbors: int = 32,
) -> MergeResult:
    """PruMerge's merge (42Shawn/LLaVA-PruMerge, ``clip_encoder.py::token_prune_merge_advanced``).

    ``picked``: kept patch indices in LM order (attention rank, then the PruMerge+ grid). Each kept
    token i becomes ``x_i + Σ_{j ∈ N(i)} a_j x_j`` where N(i) are the ``n_neighbors`` tokens most
    key-cosine-similar to i among all other tokens (the other kept ones in LM order, then the
    dropped ones ascending), ``a`` the [CLS] attention (no normalisation, as the code). One extra
    token ``Σ_{dropped} a_j x_j`` follows. With fewer than ``n_neighbors`` other tokens all are used.
    """
    V = cls_attn.shape[0]
    kept = mask_of(picked, V)
    compl = torch.nonzero(~kept).flatten()
    kn = F.normalize(keys, p=2, dim=-1)
    # all kept tokens at once (no loop over them): row i ranks ``cand`` = kept (LM order), then dropped
    # (ascending) with its own column masked to -inf, so a stable descending sort orders the others exactly
    # as ranking ``cand`` without position i would (ties: the earlier one), and never picks i itself
    P = picked.numel()
    cand = torch.cat([picked, compl])
    n_nb = min(n_neighbors, cand.numel() - 1)
    out = feats[picked].clone()
    if P and n_nb > 0:
        sim = kn[picked] @ kn[cand].T  # (P, P + C)
        diag = torch.arange(P, device=sim.device)
        sim[diag, diag] = -torch.inf
        nb = cand[torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :n_nb]]  # (P, n_nb)
        out = out + (feats[nb] * cls_attn[nb][..., None]).sum(1)
    extra = (feats[compl] * cls_attn[compl, None]).sum(0, keepdim=True)
    group = torch.full((V,), -1, dtype=torch.long, device=cls_attn.device)
    group[picked] = picked
    sources = torch.cat([picked, torch.full((1,), -1, dtype=torch.long, device=picked.device)])
    return MergeResult(sources, torch.cat([out, extra]), group, cls_attn)


# ---------------------------------------------------------------------------------------------
# VisPruner, DivPrune


def vispruner_select(cls_attn: torch.Tensor, feats: torch.Tensor, n_keep: int, important_ratio: float = 0.5):
    """VisPruner (Theia-4869/VisPruner, ``llava_arch.py::encode_images``).

    ``cls_attn`` (V,): head-mean [CLS] attention; ``feats`` (V, D): the same layer's patch features.
    Important: the top ``int(n_keep · important_ratio)``; the rest of the ranking is deduplicated:
    while more than ``n_keep - important`` remain, split them (rank order) into even/odd
    positions a, b; score each a by its max cosine to any b; drop the ``min(8, excess)`` a's of
    highest score. Returns ascending kept indices.
    """
    V = cls_attn.shape[0]
    n_keep = _check_k(n_keep, V, "n_keep")
    n_imp = int(n_keep * important_ratio)
    n_div = n_keep - n_imp
    order = rank_desc(cls_attn)
    important, residual = order[:n_imp], order[n_imp:]
    normed = feats / feats.norm(dim=-1, keepdim=True)
    while True:
        R = residual.numel()
        r = min(8, R - n_div)
        if r <= 0:
            break
        a, b = residual[::2], residual[1::2]
        if b.numel() == 0:  # one token left and none wanted
            residual = residual[:n_div]
            break
        s = (normed[a] @ normed[b].T).max(dim=-1).values
        distinct = rank_desc(s)[r:]
        residual = torch.cat([a[distinct], b])
    return torch.cat([important, residual]).sort().values


def divprune_order(feats: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune (vbdi/divprune, ``LLaVA/llava/model/llava_arch.py::DivPrune``): max–min diversity
    on D = 1 − cos of the projector outputs ``feats`` (V, D). First pick: the largest
    nearest-neighbour distance (second-smallest entry of each column); then repeatedly the token
    whose minimum distance to the picked set is largest (first index on ties). Indices in the
    order they were picked.
    """
    V = feats.shape[0]
    k = _check_k(k, V)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=feats.device)
    if V == 1:
        return torch.zeros(1, dtype=torch.long, device=feats.device)
    norms = feats.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(
            f"{int((norms == 0).sum())} of {V} features have zero norm; DivPrune's cosine distance is undefined"
        )
    normed = feats / norms
    dist = 1.0 - normed @ normed.T
    first = torch.topk(dist, 2, dim=0, largest=False).values[1]
    # on the device, no host sync per pick: the picked index stays a 1-element tensor (argmax returns
    # the first maximal index, as before); one copy at the end when the caller reads the indices
    picked = torch.empty(k, dtype=torch.long, device=feats.device)
    nxt = torch.argmax(first).reshape(1)
    picked[0:1] = nxt
    best = dist.index_select(0, nxt)[0].clone()
    for i in range(1, k):
        nxt = torch.argmax(best).reshape(1)
        picked[i : i + 1] = nxt
        torch.minimum(best, dist.index_select(0, nxt)[0], out=best)
    return picked


def divprune_select(feats: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`divprune_order`, ascending indices (the code re-sorts the kept tokens)."""
    return divprune_order(feats, k).sort().values


# ---------------------------------------------------------------------------------------------
# HiRED


def hired_select(
    layer0_attn: torch.Tensor,
    select_attn: torch.Tensor,
    grid: tuple[int, int],
    budget_rate: float = 0.2,
    alpha: float = 0.5,
) -> torch.Tensor:
    """HiRED (hasanar1f/HiRED, ``modeling_llava_next.py::HiRED_token_selection``) for one image.

    ``layer0_attn`` / ``select_attn``: (crops, H, V) [CLS]→patch attention of vision layer 0 and of
    the selection layer (22), crop 0 = the global view, crops 1.. in processor order; ``grid``
    = (crops down, crops across). Heads are **summed**. Budget B = int(crops·V·rate); the global
    view takes min(int(B·α), V) by top-layer attention; the sub-images share the rest in
    proportion to where the global view's layer-0 top int(V·(1−α)) tokens fall, the flat
    raster of the global view being cut into ``down·across`` **consecutive chunks** (the code's
    ``reshape``, not spatial quadrants); each share is floored (``.int()``) and each sub-image
    takes its own top-k. Returns a (crops, V) bool mask.
    """
    n_crops, _, V = select_attn.shape
    bottom = select_attn.sum(1)
    top0 = layer0_attn.sum(1)
    mask = torch.zeros(n_crops, V, dtype=torch.bool, device=select_attn.device)
    total = int(n_crops * V * budget_rate)
    full_budget = min(int(total * alpha), V)
    sub_budget = min(total - full_budget, (n_crops - 1) * V)
    mask[0, rank_desc(bottom[0])[:full_budget]] = True
    if sub_budget > 0 and n_crops > 1:
        down, across = grid
        if down * across != n_crops - 1:
            raise ValueError(f"grid {grid} has {down * across} sub-images; the image has {n_crops - 1}")
        if V % (n_crops - 1):
            raise ValueError(f"{V} global-view tokens do not split into {n_crops - 1} equal chunks (HiRED's reshape)")
        spatial = mask_of(rank_desc(top0[0])[: int(V * (1 - alpha))], V)
        per = spatial.reshape(n_crops - 1, -1).sum(-1).to(torch.float32)
        if per.sum() == 0:
            raise ValueError(f"alpha={alpha} leaves no layer-0 tokens to distribute the sub-image budget by")
        share = (per / per.sum() * sub_budget).int().clamp(max=V)
        for i, n in enumerate(share.tolist()):
            mask[i + 1, rank_desc(bottom[i + 1])[:n]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# ToMe


def tome_match(metric: torch.Tensor, r: int, protect_first: bool = True):
    """ToMe's bipartite soft matching (facebookresearch/ToMe, ``tome/merge.py``) on ``metric``
    (B, T, d): tokens alternate into sets A (even) and B (odd); each A token's best edge is its
    highest cosine to a B token; the ``r`` A tokens with the best edges (ties: lower index) merge
    into their B partner. With ``protect_first`` the first token ([CLS]) is never merged and the
    unmerged A tokens stay in index order. Returns (unm_idx, src_idx, dst_idx), each (B, ·) indices
    into A / A / B."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if protect_first:
        scores[:, 0, :] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    edge = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    unm, src = edge[:, r:], edge[:, :r]
    dst = node_idx.gather(1, src)
    if protect_first:
        unm = unm.sort(dim=1).values
    return unm, src, dst


def tome_merge(x: torch.Tensor, match, mode: str = "sum") -> torch.Tensor:
    """Apply a :func:`tome_match` result to (B, T, C): [unmerged A (in ``unm`` order), B with the
    merged A tokens reduced in] — ToMe's output order."""
    unm, src, dst = match
    xa, xb = x[:, ::2], x[:, 1::2]
    C = x.shape[-1]
    keep_a = xa.gather(1, unm[..., None].expand(-1, -1, C))
    moved = xa.gather(1, src[..., None].expand(-1, -1, C))
    xb = xb.scatter_reduce(1, dst[..., None].expand(-1, -1, C), moved, reduce=mode)
    return torch.cat([keep_a, xb], dim=1)


def tome_schedule(n_tokens: int, remove: int, n_layers: int, protected: int = 1) -> list[int]:
    """Tokens to merge per layer to remove exactly ``remove`` in ``n_layers`` layers: as even as
    possible (ToMe's constant r, the remainder on the first layers), each layer capped at
    ⌊(T − protected) / 2⌋ as ToMe caps it, the excess carried to later layers."""
    if remove < 0:
        raise ValueError(f"cannot remove {remove} tokens")
    plan = [remove // n_layers + (1 if i < remove % n_layers else 0) for i in range(n_layers)]
    out, T, carry = [], n_tokens, 0
    for want in plan:
        want += carry
        r = min(want, (T - protected) // 2)
        carry = want - r
        out.append(r)
        T -= r
    if carry:
        raise ValueError(
            f"ToMe cannot remove {remove} of {n_tokens} tokens in {n_layers} layers "
            f"(each layer merges at most half of its tokens)"
        )
    return out


# ---------------------------------------------------------------------------------------------
# FlowCut


def flowcut_score(cls_attn: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """FlowCut (TungChintao/FlowCut, ``flowcut/utils_flowcut.py::compute_score``):
    (cls / Σcls + semantic / Σsemantic) · ‖v‖₁, over the patches (last axis of the attentions,
    ``values`` (…, N, d) the head-mean values)."""
    rel = cls_attn / cls_attn.sum(-1, keepdim=True)
    sem = semantic / semantic.sum(-1, keepdim=True)
    return (rel + sem) * values.abs().sum(-1)


def flowcut_prune_count(cls_attn: torch.Tensor, rpl: int, target_patches: int) -> int:
    """FlowCut's adaptive count (``utils_flowcut.py::adaptive_prune_ratio``):
    round((N − target) / √rpl · (1 − (H / log N)²)), H the entropy of the normalised [CLS]
    attention over the N patches; the max over the batch."""
    N = cls_attn.shape[-1]
    p = cls_attn / cls_attn.sum(-1, keepdim=True)
    ent = -(p * torch.log(p)).sum(-1)
    ratio = ent / torch.log(torch.tensor(float(N), dtype=ent.dtype))
    r = (N - target_patches) / rpl**0.5 * (1 - ratio**2)
    return int(r.max().round())


# ---------------------------------------------------------------------------------------------
# CDPruner


def cdpruner_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CDPruner's relevance (Theia-4869/CDPruner, ``llava/model/llava_arch.py::encode_images``): the
    **negated** cosine of each patch's CLIP image embedding with the M text embeddings, averaged
    over M, min–max normalised as ``(r − min + 1e-6) / (max − min)`` (the sign is deliberate for
    LLaVA's CLIP, per the authors)."""
    im = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    tx = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    r = (-(im @ tx.T)).mean(-1)
    return (r - r.min() + 1e-6) / (r.max() - r.min())


def cdpruner_select(feats: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Conditional DPP, greedy MAP (fast incremental Cholesky, Chen et al. 2018) on the kernel
    L = diag(r) · S · diag(r), S the cosine similarity of the projector outputs ``feats`` (N, D);
    ``k`` steps, each the token of largest remaining marginal gain (first index on ties);
    ascending indices (the code re-sorts)."""
    N = feats.shape[0]
    k = _check_k(k, N)
    fn = feats / feats.norm(dim=-1, keepdim=True)
    kernel = relevance[:, None] * (fn @ fn.T) * relevance[None, :]
    cis = torch.zeros(k, N, dtype=kernel.dtype, device=kernel.device)
    d2 = torch.diagonal(kernel).clone()
    picked = []
    floor = float(torch.diagonal(kernel).max()) * 1e-10
    for i in range(k):
        j = int(torch.argmax(d2))
        if not float(d2[j]) > floor:
            raise ValueError(
                f"the DPP kernel has numerical rank {i} < k={k}: greedy MAP cannot pick more tokens "
                "(features of too low a rank for this budget)"
            )
        picked.append(j)
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(d2[j])
        cis[i] = e
        d2 = d2 - e**2
        d2[j] = -torch.inf
    return torch.as_tensor(sorted(picked), dtype=torch.long, device=feats.device)
