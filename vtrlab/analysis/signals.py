"""One interface for every importance signal the kit has: ``(vlm, batch) -> {name: scores per image token}``.

A *signal* gives each image token of each sample one score (higher = more important), aligned with
``layout.image_positions`` (the layout's ``token`` axis). The signals reuse the kit's verbs; none adds
numerics of its own:

============== ==================================================================================== ===========
kind           what (names produced)                                                                depends on
============== ==================================================================================== ===========
lm_attn        last token's LM attention per layer, mean over heads, causal-visible rows only       LM, tower
               (:func:`vtrlab.capture` → :func:`~vtrlab.analysis.attention.image_token_scores`;
               ``lm_attn.<l>``)
cls_attn       vision [CLS] attention per vision layer (mean over queries without [CLS]), each      tower
               crop's own, pooled onto the LM image tokens of its view (``cls_attn.<l>``)
saliency       ``|Σ_heads A ⊙ ∂ log p(answer)/∂A|`` of the last row per LM layer (:func:`vtrlab.saliency`; LM, tower
               ``saliency.<l>``)
rollout        attention rollout of the last row after each LM layer (:func:`vtrlab.rollout`;          LM, tower
               ``rollout.<l>``)
logit_lens     probability of the answer's first token decoded at each image position after each     LM, tower
               LM layer (:func:`vtrlab.logit_lens`; ``logit_lens.<l>``)
recon_error    the selector-reconstructor's error when the token is masked (random masks by default)   tower
               (:func:`vtrlab.recon.token_error`; ``recon_error``)
selector       the reconstruction selector's logits (:meth:`vtrlab.recon.Selector.token_scores`;          tower
               ``selector``; the ranking the ``selector`` reduction method keeps by)
reduce         each reduction method's score at its first stage (``vtrlab.reduce.apply(...)``'s       method
               ``score``; ``reduce.<method>``)
ground_truth   covered fraction of the token's pixel box by the ground truth (``ground_truth``)     input
random         uniform random, seeded (``random``)                                                  nothing
============== ==================================================================================== ===========

"The answer" is each record's reference answer (first token) when ``records`` are given, else the
model's own greedy answer. Scores a verb leaves undefined (a token no captured row sees, a method that
ranks only its kept tokens) rank below every defined score of the sample (:func:`finite`), so every
returned score is finite.

:func:`compute` runs the chosen kinds on one batch; :func:`signal_fn` binds options into the
``(vlm, batch)`` function :func:`vtrlab.analysis.randomization.randomization_check` takes;
:func:`compute_over` runs batches over a data set for :func:`vtrlab.analysis.deletion.deletion_curves`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = (
    "lm_attn",
    "cls_attn",
    "saliency",
    "rollout",
    "logit_lens",
    "recon_error",
    "selector",
    "reduce",
    "ground_truth",
    "random",
)
# what each kind's scores depend on: "lm" and "vision" weights, or neither (input / nothing)
DEPENDS = {
    "lm_attn": ("lm", "vision"),
    "cls_attn": ("vision",),
    "saliency": ("lm", "vision"),
    "rollout": ("lm", "vision"),
    "logit_lens": ("lm", "vision"),
    "recon_error": ("vision",),
    "selector": ("vision",),
    "reduce": ("lm", "vision"),
    "ground_truth": (),
    "random": (),
}
DEFAULT_METHODS = ("fastv", "feather", "sparsevlm", "pyramiddrop", "fastervlm", "vtc_cls", "visionzip")

Signals = dict[str, list[np.ndarray]]


@dataclass
class Options:
    """What the signals of :func:`compute` need besides ``(vlm, batch)``.

    ``records``: one per sample of the batch (ground truth, reference answers); ``layers`` /
    ``vision_layers``: ``"all"`` or indices; ``selector``: a :class:`vtrlab.recon.Selector` for recon_error and
    selector (None: the one shipped beside the organism, loaded once; the ``selector`` reduction method reads
    its own ``path`` parameter, so rank by the ``selector`` kind instead); ``methods``: reduction
    method names; ``keep``: their budget (tokens a method leaves unranked rank last); ``seed``: random's,
    which draws sample i of the batch from ``default_rng([seed, start + i])`` (the same scores however the
    data is batched)."""

    records: Sequence[Any] | None = None
    layers: Any = "all"
    vision_layers: Any = "all"
    selector: Any = None
    methods: Sequence[str] = DEFAULT_METHODS
    keep: float = 0.25
    seed: int = 0
    start: int = 0  # index of the batch's first sample in the data (random's per-sample seeds)
    recon_mode: str = "random"  # vtrlab.recon.token_error's mode: "random" (16 masks) or "single" (n masks)
    skipped: dict[str, str] = field(default_factory=dict)  # filled: signal -> why it was left out


def finite(scores) -> np.ndarray:
    """Scores as float64 with NaN (undefined) and -inf replaced by ``min(finite) - 1``, +inf by
    ``max(finite) + 1`` (0 and 1 when no score is finite): undefined tokens rank below every defined one,
    the order of the rest is kept."""
    s = np.asarray(scores, dtype=np.float64).copy()
    ok = np.isfinite(s)
    if not ok.all():
        high = s == np.inf
        s[~ok & ~high] = (np.min(s[ok]) - 1.0) if ok.any() else 0.0
        s[high] = (np.max(s[ok]) + 1.0) if ok.any() else 1.0
    return s


def _per_sample(values: np.ndarray, batch: Any) -> list[np.ndarray]:
    """(sample, key) array over sequence positions -> per sample, the scores at its image positions."""
    return [finite(values[b, lay.image_positions]) for b, lay in enumerate(batch.layouts)]


def _answer_targets(vlm: Any, opts: Options) -> list[int] | None:
    """First token id of each record's reference answer, or None (the model's greedy answer is used)."""
    if opts.records is None:
        return None
    from .reduction_sweep import _gold_ids

    return [ids[0] for ids in _gold_ids(vlm, [r.answer for r in opts.records])]


@contextlib.contextmanager
def _gradients_on(vlm: Any) -> Iterator[None]:
    """Every parameter requires grad inside the block (saliency needs a path); the flags are restored after."""
    params = list(vlm.model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def attention_signals(
    vlm: Any, batch: Any, layers="all", vision: bool = True, vision_layers="all"
) -> dict[str, list[np.ndarray]]:
    """LM attention of the last token to each image token per layer (``lm_attn.<l>``, mean over heads), and
    the vision [CLS] attention per vision layer (``cls_attn.<l>``): each crop's own [CLS] row, pooled onto the
    LM image tokens its patches feed (:func:`patch_scores_on_tokens`; every view of multi-tile layouts).
    An image token no captured LM row sees gets 0 in ``lm_attn``."""
    from vtrlab.probes import capture

    from .attention import image_token_scores, vision_token_scores

    ds = capture(vlm, batch, queries="last", layers=layers, vision=vision, vision_layers=vision_layers)
    out: dict[str, list[np.ndarray]] = {}
    lm = image_token_scores(ds)
    for lay, g in lm.groupby("layer", sort=True):
        out[f"lm_attn.{int(lay)}"] = [
            g[g["sample"] == b].set_index("position").loc[lay_.image_positions, "score"].fillna(0.0).to_numpy()
            for b, lay_ in enumerate(batch.layouts)
        ]
    if vision and "vision_attn" in ds:
        vt = vision_token_scores(ds)
        vt = vt[vt["row"] >= 0]  # patches the LM sees (unpadding drops some of a crop's rows / columns)
        for lay, g in vt.groupby("vision_layer", sort=True):
            out[f"cls_attn.{int(lay)}"] = [
                patch_scores_on_tokens(g[g["sample"] == b], layout, sample=b) for b, layout in enumerate(batch.layouts)
            ]
    return out


def patch_scores_on_tokens(patches: Any, layout: Any, sample: int = 0) -> np.ndarray:
    """Per LM image token (aligned with ``layout.image_positions``), the mean score of the vision patches it
    covers: a patch belongs to the token of the same (image, tile) whose pixel box holds the patch's centre
    (:func:`vtrlab.recon.features` maps patches to tokens the same way), so the map is right whether the vision
    table's row / col are the encoder's own grid (Gemma3, Qwen2-VL, Idefics3) or the LM's. Every crop keeps its
    own [CLS] signal and lands on the tokens of its view (LLaVA-NeXT: the base view on tile 0, each
    high-resolution crop on its part of tile 1; merged grids pool several patches into one token).
    ``patches``: rows (crop, vpos, score) of :func:`~vtrlab.analysis.attention.vision_token_scores` of one sample
    and one vision layer. An image token that covers no patch is refused (its signal would be made up)."""
    from vtrlab.recon.features import _token_index

    vis = layout.vision_table()
    vis = vis[(vis["kind"] == "patch") & (vis["row"] >= 0)]  # row -1: a patch the LM never sees (unpadding)
    rows = vis.merge(patches[["crop", "vpos", "score"]], on=["crop", "vpos"], how="inner", validate="one_to_one")
    token = _token_index(layout, rows)
    ok = token >= 0
    n = layout.n_image_tokens
    counts = np.bincount(token[ok], minlength=n)
    if (counts == 0).any():
        sel = layout.kind == "image"
        missing = sorted({(int(i), int(t)) for i, t, c in zip(layout.image[sel], layout.tile[sel], counts) if c == 0})
        raise ValueError(
            f"sample {sample}: {int((counts == 0).sum())} of {n} image tokens (views (image, tile) {missing}) "
            "cover no vision patch of the capture; capture every crop of the sample"
        )
    return np.bincount(token[ok], weights=rows["score"].to_numpy(np.float64)[ok], minlength=n) / counts


def lm_attn(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``lm_attn.<l>``: the last token's attention to each image token at LM layer l (mean over heads)."""
    return {k: [finite(s) for s in v] for k, v in attention_signals(vlm, batch, opts.layers, vision=False).items()}


def cls_attn(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``cls_attn.<l>``: vision [CLS] attention per vision layer, pooled onto each LM token's grid cell."""
    out = attention_signals(vlm, batch, layers=[0], vision=True, vision_layers=opts.vision_layers)
    out = {k: [finite(s) for s in v] for k, v in out.items() if k.startswith("cls_attn.")}
    if not out:
        opts.skipped["cls_attn"] = "the capture holds no vision attention for this model"
    return out


def saliency(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``saliency.<l>``: attention saliency of the last row for the answer token at LM layer l."""
    from vtrlab.flow import saliency as run

    with _gradients_on(vlm):
        ds = run(vlm, batch, queries="last", layers=opts.layers, target=_answer_targets(vlm, opts))
    vals = ds["saliency"].isel(query=0).transpose("sample", "layer", "key").values
    return {f"saliency.{int(lay)}": _per_sample(vals[:, j], batch) for j, lay in enumerate(ds["layer"].values)}


def rollout(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``rollout.<l>``: the last row of the attention rollout after LM layer l."""
    from vtrlab.flow import rollout as run

    ds = run(vlm, batch, queries="last", layers=opts.layers)
    vals = ds["rollout"].isel(query=0).transpose("sample", "layer", "key").values.astype(np.float64)
    return {f"rollout.{int(lay)}": _per_sample(vals[:, j], batch) for j, lay in enumerate(ds["layer"].values)}


def logit_lens(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``logit_lens.<l>``: probability of the answer's first token decoded at each image position after
    LM layer l."""
    from vtrlab.flow import logit_lens as run

    ds = run(vlm, batch, queries="image", layers=opts.layers, targets=_answer_targets(vlm, opts), top_k=1)
    prob = ds["target_prob"].isel(target=0).transpose("sample", "layer", "query").values
    qpos = ds["query_position"].values
    out: Signals = {}
    for j, lay in enumerate(ds["layer"].values):
        per = []
        for b, layout in enumerate(batch.layouts):
            n = layout.n_image_tokens
            if not np.array_equal(qpos[b, :n], layout.image_positions):
                raise RuntimeError(f"logit lens rows of sample {b} are not the layout's image positions")
            per.append(finite(prob[b, j, :n]))
        out[f"logit_lens.{int(lay)}"] = per
    return out


def _selector(vlm: Any, opts: Options) -> Any:
    if opts.selector is None:
        from vtrlab.models.loader import organism_path
        from vtrlab.recon import Selector

        path = organism_path() / "selector"
        if not (path / "config.json").is_file():
            raise ValueError(f"no selector given and none at {str(path)!r}; pass selector=")
        opts.selector = Selector.load(path, device=vlm.device).eval()
    return opts.selector


def recon_error(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``recon_error``: the selector-reconstructor's error on each token when it is masked (``opts.recon_mode``:
    "random", 16 random half masks, the default; "single", one token masked at a time, n reconstructions)."""
    from vtrlab.recon import token_error

    ds = token_error(vlm, batch, selector=_selector(vlm, opts), mode=opts.recon_mode, seed=opts.seed)
    vals = ds["recon_error"].values
    return {"recon_error": [finite(vals[b, : lay.n_image_tokens]) for b, lay in enumerate(batch.layouts)]}


def selector(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``selector``: the selector's score of each image token (mean logit of the patches it covers)."""
    return {"selector": [finite(s) for s in _selector(vlm, opts).token_scores(vlm, batch)]}


def reduce(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``reduce.<method>``: each method's score at its first stage on ``batch`` (budget ``opts.keep``; in-LM
    methods' layers scaled to the LM's depth). Methods not applicable to the family, or that rank no token
    (e.g. pooling), are left out with the reason in ``opts.skipped``."""
    from vtrlab.reduce import NotApplicable, apply, get

    from .reduction_sweep import depth_scaled_params

    out: Signals = {}
    for name in opts.methods:
        params = depth_scaled_params(vlm, name, collapse=True)
        try:
            rec = apply(vlm, batch, get(name, **params), keep=opts.keep)
        except NotApplicable as e:
            opts.skipped[f"reduce.{name}"] = e.why
            continue
        score = rec["score"].isel(stage_layer=0).values
        per = [score[b, : lay.n_image_tokens] for b, lay in enumerate(batch.layouts)]
        if all(np.isnan(s).all() for s in per):
            opts.skipped[f"reduce.{name}"] = "the method ranks no token (no score)"
            continue
        out[f"reduce.{name}"] = [finite(s) for s in per]
    return out


def ground_truth(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``ground_truth``: covered fraction of each token's pixel box by the record's boxes or mask (needs
    ``records``; None for a record without ground truth)."""
    from .deletion import ground_truth_signal

    if opts.records is None:
        raise ValueError("signal 'ground_truth' needs the batch's records (records=)")
    return {"ground_truth": ground_truth_signal(batch.layouts, opts.records)}


def random(vlm: Any, batch: Any, opts: Options) -> Signals:
    """``random``: one uniform random score per image token, from ``default_rng([opts.seed, opts.start + i])``
    for sample i of the batch (as :func:`vtrlab.analysis.deletion.random_signal` draws sample ``start + i``)."""
    rng = [np.random.default_rng([opts.seed, opts.start + i]) for i in range(len(batch.layouts))]
    return {"random": [g.random(lay.n_image_tokens) for g, lay in zip(rng, batch.layouts)]}


REGISTRY: dict[str, Callable[[Any, Any, Options], Signals]] = {
    "lm_attn": lm_attn,
    "cls_attn": cls_attn,
    "saliency": saliency,
    "rollout": rollout,
    "logit_lens": logit_lens,
    "recon_error": recon_error,
    "selector": selector,
    "reduce": reduce,
    "ground_truth": ground_truth,
    "random": random,
}


def _kinds(kinds: str | Sequence[str]) -> list[str]:
    kinds = list(KINDS) if kinds == "all" else [kinds] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in kinds if k not in REGISTRY]
    if bad:
        raise ValueError(f"unknown signal kind(s) {bad}; accepted: {list(REGISTRY)} or 'all'")
    return kinds


def compute(
    vlm: Any, batch: Any, kinds: str | Sequence[str] = "all", opts: Options | None = None, **options: Any
) -> Signals:
    """Every signal of ``kinds`` (``"all"`` or names from :data:`KINDS`) on ``batch``:
    ``{signal name: [scores per image token, per sample]}`` (finite, aligned with ``layout.image_positions``;
    ground_truth holds None for a record without ground truth). ``options``: the fields of :class:`Options`
    (or pass one ``opts``, which then caches the loaded selector and collects ``opts.skipped``: the signals
    left out and why — ground_truth without records, reduction methods not applicable to the family)."""
    if opts is None:
        opts = Options(**options)
    elif options:
        raise ValueError(f"pass either opts= or options, not both (got {sorted(options)})")
    if opts.records is not None and len(opts.records) != len(batch.layouts):
        raise ValueError(f"{len(opts.records)} records for a batch of {len(batch.layouts)} samples")
    out: Signals = {}
    for kind in _kinds(kinds):
        if kind == "ground_truth" and opts.records is None:
            opts.skipped["ground_truth"] = "no records given"
            continue
        out |= REGISTRY[kind](vlm, batch, opts)
    return out


def signal_fn(kinds: str | Sequence[str] = "all", **options: Any) -> Callable[[Any, Any], Signals]:
    """``(vlm, batch) -> signals`` with ``kinds`` and ``options`` bound, for
    :func:`vtrlab.analysis.randomization.randomization_check` (``records``, if given, are those of the batch
    it is called with). One :class:`Options` serves every call: a selector loaded once is reused, and
    ``fn.opts.skipped`` says what was left out."""
    kinds = _kinds(kinds)
    opts = Options(**options)

    def fn(vlm: Any, batch: Any) -> Signals:
        return compute(vlm, batch, kinds, opts=opts)

    fn.opts = opts  # type: ignore[attr-defined]
    return fn


def compute_over(
    vlm: Any,
    data: Sequence[Any],
    kinds: str | Sequence[str] = "all",
    batch_size: int = 8,
    **options: Any,
) -> Signals:
    """:func:`compute` over ``data`` (records with image and question) in batches, joined per signal: one
    entry per record (the input :func:`vtrlab.analysis.deletion.deletion_curves` takes). A signal missing in
    some batch holds None there (like ground truth for a record without it). ``options``: the fields of
    :class:`Options` but ``records``."""
    if "records" in options:
        raise ValueError("compute_over takes the records from data; do not pass records=")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: need a positive integer")
    kinds = _kinds(kinds)
    opts = Options(**options)
    parts: list[tuple[int, Signals]] = []
    for start in range(0, len(data), batch_size):
        chunk = list(data[start : start + batch_size])
        batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        opts.records, opts.start = chunk, start
        parts.append((len(chunk), compute(vlm, batch, kinds, opts=opts)))
    opts.records, opts.start = None, 0
    names = list(dict.fromkeys(k for _, p in parts for k in p))
    return {k: [x for n, p in parts for x in (p[k] if k in p else [None] * n)] for k in names}


def describe(name: str) -> Mapping[str, Any]:
    """``{'kind', 'layer', 'depends'}`` of a signal name from :func:`compute` (layer None where it has none).
    ``depends``: the weight stacks the scores are computed with (:data:`DEPENDS`; a reduction method
    acting before the LM depends on the tower only)."""
    kind, _, rest = name.partition(".")
    if kind not in REGISTRY:
        raise ValueError(f"signal {name!r} is not one of {list(REGISTRY)}")
    layer = int(rest) if rest.isdigit() else None
    depends = DEPENDS[kind]
    if kind == "reduce" and rest:
        from vtrlab.reduce import get

        depends = ("lm", "vision") if get(rest).stage == "lm" else ("vision",)
    return {"kind": kind, "layer": layer, "depends": depends}
