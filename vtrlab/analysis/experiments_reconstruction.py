"""Experiments of notebook 03 that run the model: the keep-ratio sweep, the selector's agreement
with ground-truth relevance, the context diagnostic, and loading (or training) the selector.

Each returns a tidy DataFrame; the tables and the claim are built from them by the pure functions
of ``vtrlab.analysis.reconstruction``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data.answers import answer_accuracy
from ..data.groundtruth import relevant_tokens
from .reconstruction import DIAGNOSTIC_PLANS, KEEP_METHODS, family_group, random_keep


def _correct(prediction: str, sample: Any) -> bool:
    """Exact match (VQA normalisation) with any accepted answer (``sample.answers``, else ``sample.answer``)."""
    return answer_accuracy(prediction, list(getattr(sample, "answers", None) or [sample.answer])) == 1.0


def keep_ratio_sweep(
    vlm: Any,
    samples: Sequence[Any],
    selector: Any,
    ratios: Sequence[float],
    methods: Sequence[str] = KEEP_METHODS,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 6,
    progress: bool = True,
):
    """Greedy answers of ``vlm`` on ``samples`` (objects with image, question, answer, family)
    when only a fraction of image tokens reaches the LM.

    Returns a tidy DataFrame: sample, family, method, ratio, prediction, answer, correct, kept.
    ``selector`` keeps the top-k by the selector's logits, ``random`` a uniform random subset
    (seeded per sample and ratio), ``full`` all tokens (ratio 1) and ``no_image`` none (ratio 0).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from ..reduce import answer, decoder_inputs

    bad = [m for m in methods if m not in KEEP_METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; accepted: {KEEP_METHODS}")
    ratios = [float(r) for r in ratios]
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"ratios {ratios}; accepted: keep ratios in [0, 1]")
    if "selector" in methods and selector is None:
        raise ValueError("method 'selector' needs a selector; pass one or drop 'selector' from methods")
    rows = []
    for a in tqdm(range(0, len(samples), batch_size), desc="keep-ratio sweep", disable=not progress):
        chunk = samples[a : a + batch_size]
        batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        dec = decoder_inputs(vlm, batch)
        n = [lay.n_image_tokens for lay in batch.layouts]
        plans: list[tuple[str, float, list[np.ndarray] | None]] = []
        if "full" in methods:
            plans.append(("full", 1.0, None))
        if "no_image" in methods:
            plans.append(("no_image", 0.0, [np.zeros(k, dtype=bool) for k in n]))
        scores = selector.token_scores(vlm, batch) if "selector" in methods else None
        for r in ratios:
            if "selector" in methods:
                plans.append(("selector", r, [selector.topk_mask(s, r) for s in scores]))
            if "random" in methods:
                rngs = [np.random.default_rng([seed, a + i, int(round(r * 1000))]) for i in range(len(chunk))]
                plans.append(("random", r, [random_keep(k, r, g) for k, g in zip(n, rngs)]))
        for method, r, keep in plans:
            preds = answer(vlm, batch, keep=keep, max_new_tokens=max_new_tokens, decoder_inputs=dec)
            for i, (s, p) in enumerate(zip(chunk, preds)):
                rows.append(
                    {
                        "sample": a + i,
                        "family": s.family,
                        "method": method,
                        "ratio": r,
                        "prediction": p,
                        "answer": s.answer,
                        "correct": _correct(p, s),
                        "kept": int(n[i] if keep is None else keep[i].sum()),
                    }
                )
    return pd.DataFrame(rows)


def load_or_train_selector(
    vlm: Any,
    *,
    train: bool = False,
    selector_path: str = "",
    n_train: int = 4000,
    steps: int = 3000,
    p: float = 0.5,
    d_model: int = 128,
    layers: int = 3,
    seed: int = 0,
    device: str = "cpu",
):
    """(selector, training history): trained here (``n_train`` images at data seed 3, with the sizes
    given) when ``train``, else loaded from ``selector_path`` (empty: the one shipped beside the
    organism; a relative path is taken from the current directory — a notebook resolves it against
    the project root first). The selector is on ``vlm.device``, in eval mode."""
    from pathlib import Path

    from ..models.loader import organism_path
    from ..recon import Selector
    from ..recon.train import train_for

    if train:
        sel, history = train_for(
            vlm,
            n_train=n_train,
            n_val=max(n_train // 16, 4),
            steps=steps,
            p=p,
            d_model=d_model,
            n_heads=4 if d_model % 4 == 0 and d_model >= 16 else 1,
            selector_layers=layers,
            reconstructor_layers=layers,
            seed=seed,
            device=device,
            batch_size=min(32, n_train),
        )
    else:
        path = Path(selector_path) if selector_path else organism_path() / "selector"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no selector at {str(path)!r}; set train=True or point selector_path at one")
        sel = Selector.load(path, device=vlm.device)
        history = Selector.history(path)
    return sel.to(vlm.device).eval(), history


def relevance_agreement(
    vlm: Any,
    selector: Any,
    samples: Sequence[Any],
    budgets: Sequence[float],
    seed: int = 0,
    batch_size: int = 32,
    group_of=family_group,
):
    """Agreement of the selector's kept set with ground-truth relevance, per sample.

    Tidy DataFrame: sample, family, group, relevant_fraction, method, ratio, metric, value, with
    metric ``auroc`` (selector logits vs relevant tokens; ratio NaN) and, at each budget, ``recall``
    (share of relevant tokens kept) and ``iou`` (kept vs relevant) for ``selector`` (top-k) and
    ``random`` (seeded per sample). A token is relevant when its pixel box touches the sample's boxes
    or mask. Samples without ground truth, or whose tokens are all or none relevant, are skipped."""
    import pandas as pd

    from ..metrics.agreement import auroc

    rows = []
    for a in range(0, len(samples), batch_size):
        chunk = samples[a : a + batch_size]
        b = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        scores = selector.token_scores(vlm, b)
        for i, (s, lay, sc) in enumerate(zip(chunk, b.layouts, scores)):
            rel = relevant_tokens(lay, s)
            if rel is None or rel.all() or not rel.any():
                continue
            base = {"sample": a + i, "family": s.family, "group": group_of(s.family), "relevant_fraction": rel.mean()}
            rows.append(
                {**base, "method": "selector", "ratio": np.nan, "metric": "auroc", "value": float(auroc(sc, rel))}
            )
            rng = np.random.default_rng([seed, a + i])
            for r in budgets:
                for method, keep in (("selector", selector.topk_mask(sc, r)), ("random", random_keep(len(sc), r, rng))):
                    rows.append(
                        {
                            **base,
                            "method": method,
                            "ratio": r,
                            "metric": "recall",
                            "value": (keep & rel).sum() / rel.sum(),
                        }
                    )
                    rows.append(
                        {
                            **base,
                            "method": method,
                            "ratio": r,
                            "metric": "iou",
                            "value": (keep & rel).sum() / (keep | rel).sum(),
                        }
                    )
    return pd.DataFrame(rows)


def context_diagnostic(
    vlm: Any,
    selector: Any,
    samples: Sequence[Any],
    ratio: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
    families: Sequence[str] | None = None,
    max_new_tokens: int = 6,
):
    """What the LM needs besides the relevant tokens, at keep ratio ``ratio``: greedy answers per
    sample for each of ``DIAGNOSTIC_PLANS`` (selector top-k, random, relevant tokens only, relevant
    topped up with random other tokens to the budget, random other tokens only, selector minus relevant).

    Samples go family by family (``families``: default, in order of first appearance), in batches;
    samples without ground truth are left out. Returns a DataFrame: family, plan, correct, kept."""
    import pandas as pd

    from ..reduce import answer, decoder_inputs

    samples = [s for s in samples if getattr(s, "has_ground_truth", True)]

    if families is None:
        families = list(dict.fromkeys(s.family for s in samples))
    rows = []
    for fam in families:
        fam_samples = [s for s in samples if s.family == fam]
        for a in range(0, len(fam_samples), batch_size):
            chunk = fam_samples[a : a + batch_size]
            b = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
            dec = decoder_inputs(vlm, b)
            scores = selector.token_scores(vlm, b)
            plans = {k: [] for k in DIAGNOSTIC_PLANS}
            for i, (s, lay, sc) in enumerate(zip(chunk, b.layouts, scores)):
                rng = np.random.default_rng([seed, 7, a + i])
                rel = relevant_tokens(lay, s)
                n, k = len(sc), int(round(ratio * len(sc)))
                others = np.flatnonzero(~rel)
                fill = np.zeros(n, dtype=bool)
                fill[rng.choice(others, min(max(k - rel.sum(), 0), len(others)), replace=False)] = True
                alone = np.zeros(n, dtype=bool)
                alone[rng.choice(others, min(k, len(others)), replace=False)] = True
                top = selector.topk_mask(sc, ratio)
                for name, keep in (
                    ("selector", top),
                    ("random", random_keep(n, ratio, rng)),
                    ("relevant only", rel),
                    ("relevant + random others", rel | fill),
                    ("random others only", alone),
                    ("selector minus relevant", top & ~rel),
                ):
                    plans[name].append(keep)
            for name, keep in plans.items():
                preds = answer(vlm, b, keep=keep, max_new_tokens=max_new_tokens, decoder_inputs=dec)
                for s, pred, m in zip(chunk, preds, keep):
                    rows.append({"family": fam, "plan": name, "correct": _correct(pred, s), "kept": int(m.sum())})
    return pd.DataFrame(rows)
