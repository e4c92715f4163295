"""Experiment: every reduction method at every budget on samples with ground truth (runs the model).

:func:`reduction_sweep` returns two tidy tables (pure analysis of them lives in
:mod:`vtrlab.analysis.reduction`):

* ``answers`` — one row per (sample, method, seed, budget): greedy prediction, exact match, the
  gold answer's log-probability (teacher forcing) and KL(full ‖ reduced) of the next-token
  distribution after the prompt; ``method == "full"`` rows are the unreduced model.
* ``tokens`` — one row per (sample, method, seed, budget, image token): whether it survives the
  method's last stage, the score the method ranked by at its first stage, the token's grid
  position (tile, row, col) and ground-truth relevance (``relevant``: the token's pixel box touches the
  sample's boxes or mask, through the model's own layout; False for a sample without ground truth, whose
  ``has_truth`` is False).

Samples are ``vtrlab.data`` records (or synthetic samples): ``answers`` lists every accepted answer (a
prediction is correct when it matches any of them after the VQA normalisation); the first is the gold
answer whose log-probability is measured.

Methods that prune inside the LM ship defaults for a 32-layer LLaVA; on a shallower LM their
layers are scaled by depth (:func:`depth_scaled_params`), and the parameters used are in the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

RANDOM = "random"
REFERENCE_DEPTH = 32  # LM depth the in-LM methods' default layers were chosen for (LLaVA-1.5-7B)


def depth_scaled_params(vlm: Any, name: str, collapse: bool = False) -> dict:
    """Parameters of in-LM method ``name`` whose default layers do not fit ``vlm``'s LM, scaled by
    depth (layer k of 32 -> round(k * n / 32), at least 1, strictly increasing); {} when they fit.
    Stages that cannot stay distinct raise, or with ``collapse`` merge (smoke runs on 2-layer models)."""
    from ..reduce import get

    m = get(name)
    if m.stage != "lm":
        return {}
    n = len(vlm.lm_layers)
    out = {}
    for key in ("layer", "layers"):
        if key not in m.defaults:
            continue
        vals = [m.defaults[key]] if key == "layer" else list(m.defaults[key])
        if max(vals) < n:
            continue
        scaled, prev = [], 0
        for v in vals:
            k = max(int(round(v * n / REFERENCE_DEPTH)), 1, prev + 1)
            scaled.append(min(k, n - 1))
            prev = scaled[-1]
        if len(set(scaled)) != len(scaled) and collapse:
            scaled = sorted(set(scaled))
        if len(set(scaled)) != len(scaled):
            raise ValueError(f"{name}: layers {vals} do not fit an LM of {n} layers even scaled ({scaled})")
        out[key] = scaled[0] if key == "layer" else tuple(scaled)
    return out


def _gold_ids(vlm: Any, answers: Sequence[str]) -> list[list[int]]:
    tok = getattr(vlm.processor, "tokenizer", vlm.processor)
    return [tok(" " + a if not a.startswith(" ") else a, add_special_tokens=False)["input_ids"] or [0] for a in answers]


def _accepted(sample: Any) -> tuple[str, ...]:
    """Every accepted answer of a sample: a record's ``answers``, else a synthetic sample's ``answer``."""
    answers = getattr(sample, "answers", None)
    if answers:
        return tuple(answers)
    one = getattr(sample, "answer", None)
    return () if one is None else (one,)


def reduction_sweep(
    vlm: Any,
    samples: Sequence[Any],
    methods: Sequence[str],
    budgets: Sequence[float],
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 16,
    max_new_tokens: int = 6,
    progress: bool = True,
):
    """Run ``methods`` at keep ratios ``budgets`` on ``samples`` (``vtrlab.data`` records or synthetic samples:
    image, question, answers (or answer), family, ground truth as boxes / masks). ``random`` runs once per
    seed; other methods are deterministic; ``oracle`` needs ground truth on every sample.
    Returns ``(answers, tokens)`` DataFrames (see module docstring)."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from ..data.groundtruth import relevant_tokens
    from ..metrics.answers import answer_accuracy
    from ..metrics.fidelity import answer_logprob, kl_divergence
    from ..models.base import KIND_IMAGE
    from ..reduce import answer, apply, decoder_inputs, get, logits

    for name in methods:
        get(name)  # unknown names fail before any forward
    for b in budgets:
        if not 0 < float(b) <= 1:
            raise ValueError(f"budget {b!r}; accepted: keep ratios in (0, 1]")
    accepted = [_accepted(s) for s in samples]
    no_answer = [i for i, a in enumerate(accepted) if not a]
    if no_answer:
        raise ValueError(f"samples {no_answer[:5]} have no answer; the reduction sweep scores answers (give answers)")
    params_of = {name: depth_scaled_params(vlm, name) for name in methods}
    ans_rows: list[dict] = []
    tok_rows: list[dict] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="reduction sweep", unit="batch", disable=not progress):
        chunk = list(samples[start : start + batch_size])
        batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        acc = accepted[start : start + batch_size]
        gold = _gold_ids(vlm, [a[0] for a in acc])
        dec = decoder_inputs(vlm, batch)
        full_pred = answer(vlm, batch, max_new_tokens=max_new_tokens, decoder_inputs=dec)
        full = logits(vlm, batch, append=gold, decoder_inputs=dec)
        app_t = torch.zeros_like(full.appended_mask, dtype=torch.long)
        for i, g in enumerate(gold):
            app_t[i, : len(g)] = torch.tensor(g)
        full_lp = answer_logprob(full.appended, app_t, full.appended_mask)
        truth = [relevant_tokens(lay, s) for lay, s in zip(batch.layouts, chunk)]  # None: no ground truth
        if "oracle" in methods and any(t is None for t in truth):
            missing = [start + i for i, t in enumerate(truth) if t is None]
            raise ValueError(f"method 'oracle' needs ground truth (boxes or masks); samples {missing[:5]} have none")
        rel = [np.zeros(lay.n_image_tokens, bool) if t is None else t for t, lay in zip(truth, batch.layouts)]
        for i, s in enumerate(chunk):
            ans_rows.append(
                dict(
                    sample=start + i,
                    family=s.family,
                    method="full",
                    seed=-1,
                    budget=1.0,
                    prediction=full_pred[i],
                    answer=acc[i][0],
                    correct=answer_accuracy(full_pred[i], acc[i]) == 1.0,
                    logprob=float(full_lp[i]),
                    kl=0.0,
                    kept=batch.layouts[i].n_image_tokens,
                    params="{}",
                )
            )
        for name in methods:
            run_seeds = list(seeds) if name == RANDOM else [-1]
            for seed in run_seeds:
                params = dict(params_of[name])
                if name == RANDOM:
                    params["seed"] = int(seed)
                if name == "oracle":
                    params["relevance"] = rel
                for b in budgets:
                    b = float(b)
                    m = get(name, **params)
                    rec = apply(vlm, batch, m, keep=b)
                    pred = answer(
                        vlm,
                        batch,
                        keep=b,
                        method=m,
                        max_new_tokens=max_new_tokens,
                        decoder_inputs=None if m.stage == "lm" else dec,
                    )
                    red = logits(
                        vlm, batch, keep=b, method=m, append=gold, decoder_inputs=None if m.stage == "lm" else dec
                    )
                    lp = answer_logprob(red.appended, app_t, red.appended_mask)
                    kl = kl_divergence(full.last, red.last)
                    shown = json.dumps({k: v for k, v in params.items() if k != "relevance"}, default=str)
                    for i, (s, lay) in enumerate(zip(chunk, batch.layouts)):
                        n = lay.n_image_tokens
                        kept = rec.kept.values[i, -1, :n]
                        score = rec.score.values[i, 0, :n]
                        ans_rows.append(
                            dict(
                                sample=start + i,
                                family=s.family,
                                method=name,
                                seed=int(seed),
                                budget=b,
                                prediction=pred[i],
                                answer=acc[i][0],
                                correct=answer_accuracy(pred[i], acc[i]) == 1.0,
                                logprob=float(lp[i]),
                                kl=float(kl[i]),
                                kept=int(kept.sum()),
                                params=shown,
                            )
                        )
                        img = lay.kind == KIND_IMAGE
                        tok_rows.append(
                            pd.DataFrame(
                                dict(
                                    sample=start + i,
                                    family=s.family,
                                    method=name,
                                    seed=int(seed),
                                    budget=b,
                                    token=np.arange(n),
                                    tile=lay.tile[img],
                                    row=lay.row[img],
                                    col=lay.col[img],
                                    kept=kept,
                                    score=score,
                                    relevant=rel[i],
                                    has_truth=truth[i] is not None,
                                )
                            )
                        )
    answers_df = pd.DataFrame(ans_rows)
    tokens_df = pd.concat(tok_rows, ignore_index=True) if tok_rows else pd.DataFrame()
    return answers_df, tokens_df
