"""Fidelity of answers from a reduced model: accuracy, answer log-probability, KL to the full model.

Small pure functions over strings, logits and token ids; no model, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .answers import answer_accuracy


def exact_match(prediction: str, reference: str) -> bool:
    """Normalised exact match (:func:`vtrlab.metrics.answers.normalize_answer`, the VQA normalisation)."""
    return answer_accuracy(prediction, [reference]) == 1.0


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of normalised exact matches."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; need the same number")
    if not predictions:
        raise ValueError("accuracy of zero predictions is undefined; pass at least one")
    return float(np.mean([exact_match(p, r) for p, r in zip(predictions, references)]))


def answer_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over answer tokens of log p(target_t | prefix), per sample.

    ``logits`` (B, T, V): row t predicts ``targets[:, t]`` (B, T); ``mask`` (B, T) marks real answer
    tokens (default all). Computed in float64.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}; need (B, T, V) and (B, T)")
    logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.long()[..., None]).squeeze(-1)
    if mask is not None:
        logp = logp * mask.to(logp.dtype)
    return logp.sum(-1)


def kl_divergence(full_logits: torch.Tensor, reduced_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_full || P_reduced) over the last axis (vocabulary), in nats, float64; shape of the leading axes."""
    if full_logits.shape != reduced_logits.shape:
        raise ValueError(
            f"logit shapes differ: full {tuple(full_logits.shape)} vs reduced {tuple(reduced_logits.shape)}"
        )
    lp = torch.log_softmax(full_logits.double(), dim=-1)
    lq = torch.log_softmax(reduced_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)
