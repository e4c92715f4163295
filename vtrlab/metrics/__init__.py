"""Small pure metric functions: agreement between importance signals, fidelity of reduced answers.

from vtrlab import metrics
metrics.auroc(scores, relevant)          # ties count 1/2
metrics.pointing_game(scores, relevant)  # ties count fractionally
metrics.spearman(a, b); metrics.top_k_iou(a, b, k=10)
metrics.accuracy(predictions, references); metrics.kl_divergence(full_logits, reduced_logits)
"""

from .agreement import auroc, kendall, pointing_game, rankdata, spearman, top_k_ioa, top_k_iou, top_k_mask
from .fidelity import accuracy, answer_logprob, exact_match, kl_divergence, normalize_answer

__all__ = [
    "accuracy",
    "answer_logprob",
    "auroc",
    "exact_match",
    "kendall",
    "kl_divergence",
    "normalize_answer",
    "pointing_game",
    "rankdata",
    "spearman",
    "top_k_ioa",
    "top_k_iou",
    "top_k_mask",
]
