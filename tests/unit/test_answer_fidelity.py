"""Fidelity metrics against float64 references on fresh random inputs."""

import numpy as np
import pytest
import torch

from vtrlab.metrics.answers import normalize_answer
from vtrlab.metrics.fidelity import accuracy, answer_logprob, exact_match, kl_divergence


def test_normalize_and_exact_match():
    assert normalize_answer("  The RED, circle! ") == "red circle"
    assert exact_match("Yes.", "yes") and not exact_match("yes", "no")
    assert accuracy(["Red", "blue", "a 3"], ["red", "green", "3"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="zero predictions"):
        accuracy([], [])


def test_answer_logprob_matches_float64_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 4))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    got = answer_logprob(torch.tensor(logits), torch.tensor(targets), torch.tensor(mask)).numpy()
    ref = np.zeros(3)
    for b in range(3):
        for t in range(4):
            if mask[b, t]:
                row = logits[b, t].astype(np.float64)
                ref[b] += row[targets[b, t]] - (np.log(np.sum(np.exp(row - row.max()))) + row.max())
    assert np.allclose(got, ref, atol=1e-9)
    with pytest.raises(ValueError, match="need \\(B, T, V\\)"):
        answer_logprob(torch.zeros(2, 3), torch.zeros(2, 3))


def test_kl_matches_float64_reference_and_is_zero_for_equal_logits():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(5, 13)) * 3, rng.normal(size=(5, 13)) * 3
    got = kl_divergence(torch.tensor(p, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)).numpy()
    pp = np.exp(p - p.max(1, keepdims=True))
    pp /= pp.sum(1, keepdims=True)
    qq = np.exp(q - q.max(1, keepdims=True))
    qq /= qq.sum(1, keepdims=True)
    ref = np.sum(pp * (np.log(pp) - np.log(qq)), axis=1)
    assert np.allclose(got, ref, atol=1e-5)
    assert np.all(got >= 0)
    assert np.allclose(kl_divergence(torch.tensor(p), torch.tensor(p)).numpy(), 0, atol=1e-12)
    with pytest.raises(ValueError, match="logit shapes differ"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))
