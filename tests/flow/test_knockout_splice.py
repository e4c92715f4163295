"""Knockout as plain sdpa + the cut rows recomputed and spliced in (RowSplice), against float64 eager references.

Every family's tiny model, float64, a padded batch of two samples: the spliced forward equals an explicit
softmax(QKᵀ·s + mask) with the cut edges set to -inf, for several rows per sample (different counts per
sample), nested knockouts (the union of their edges) and under autograd; the splice is what runs (one per
cut layer), and many cut rows fall back to one masked sdpa with the same values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.flow import knocked_out
from vtrlab.probes import attention as att

from .test_flow import _families, _ref_attention, _run_reference, _tiny64


@pytest.fixture(scope="module", params=_families())
def tiny64(request):
    return _tiny64(request.param)


def _blocked(vlm, batch, layers, queries_of, keys_of, into=None):
    """{id(attention module): (B, N, N) bool} with queries_of(L) x keys_of(L) cut at ``layers``."""
    N = batch.inputs["input_ids"].shape[1]
    out = {} if into is None else into
    for i in layers:
        key = id(vlm.adapter.lm_attention(vlm.lm_layers[i]))
        m = out.get(key, torch.zeros(len(batch), N, N, dtype=torch.bool))
        for b, L in enumerate(batch.layouts):
            q = torch.as_tensor(np.asarray(queries_of(L), dtype=np.int64))
            k = torch.as_tensor(np.asarray(keys_of(L), dtype=np.int64))
            m[b, q[:, None], k[None, :]] = True
        out[key] = m
    return out


def _assert_valid_close(got, ref, batch, atol=1e-10):
    for b, L in enumerate(batch.layouts):  # padded rows are undefined in every implementation
        valid = torch.as_tensor(L.valid_positions)
        torch.testing.assert_close(got[b, valid], ref[b, valid], atol=atol, rtol=atol)


def knocked_with_and_without_grad(vlm, batch, layers):
    """(logits under autograd, logits under no_grad, |d last-position logits / d embeddings| summed) of a forward
    knocked out at ``layers`` (image -> last); the gradient is checked finite, the embeddings restored."""
    with knocked_out(vlm, batch, keys="image", queries="last", layers=layers):
        with torch.no_grad():
            plain = vlm.model(**batch.inputs, use_cache=False).logits
        emb = vlm.model.get_input_embeddings()
        was = emb.weight.requires_grad
        emb.weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                got = vlm.model(**batch.inputs, use_cache=False).logits
                got[:, -1].sum().backward()
            assert emb.weight.grad is not None and torch.isfinite(emb.weight.grad).all()
            grad = float(emb.weight.grad.abs().sum())
        finally:
            emb.weight.grad = None
            emb.weight.requires_grad_(was)
    return got.detach(), plain, grad


@pytest.fixture
def splices(monkeypatch):
    """Count RowSplice.apply calls (the splice is what runs, not the full masked sdpa)."""
    calls = []
    apply = att.RowSplice.apply

    def spy(self, *args, **kwargs):
        calls.append(tuple(self.rows.shape))
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(att.RowSplice, "apply", spy)
    return calls


def test_question_rows_spliced_equal_float64_reference(tiny64, splices):
    vlm, batch = tiny64
    layers = [0, len(vlm.lm_layers) - 1]
    counts = [len(L.question_positions) for L in batch.layouts]
    assert min(counts) > 0 and len(set(counts)) > 1  # rows of different counts per sample: padded row plan
    blocked = _blocked(vlm, batch, layers, lambda L: L.question_positions, lambda L: L.image_positions)
    ref = _run_reference(vlm, batch, _ref_attention(blocked))
    plain = _run_reference(vlm, batch, _ref_attention({}))
    with knocked_out(vlm, batch, keys="image", queries="question", layers=layers), torch.no_grad():
        got = vlm.model(**batch.inputs, use_cache=False).logits
    assert splices == [(len(batch), max(counts))] * len(layers)
    _assert_valid_close(got, ref, batch)
    # the cut changes the question rows and what follows them, never the rows before the first one
    first = min(int(L.question_positions.min()) for L in batch.layouts)
    assert (got[:, first:] - plain[:, first:]).abs().max() > 1e-6
    for b, L in enumerate(batch.layouts):
        before = torch.as_tensor([p for p in L.valid_positions if p < L.question_positions.min()])
        torch.testing.assert_close(got[b, before], plain[b, before], atol=1e-10, rtol=1e-10)


def test_nested_knockouts_splice_the_union(tiny64, splices):
    vlm, batch = tiny64
    n = len(vlm.lm_layers)
    outer_layers, inner_layers = [0, n - 1], [n - 1]
    blocked = _blocked(vlm, batch, outer_layers, lambda L: L.question_positions, lambda L: L.image_positions[::2])
    blocked = _blocked(vlm, batch, inner_layers, lambda L: [L.last_position], lambda L: L.image_positions, blocked)
    ref = _run_reference(vlm, batch, _ref_attention(blocked))
    q_outer = [L.question_positions.tolist() for L in batch.layouts]
    k_outer = [L.image_positions[::2].tolist() for L in batch.layouts]
    with knocked_out(vlm, batch, keys=k_outer, queries=q_outer, layers=outer_layers):
        with knocked_out(vlm, batch, keys="image", queries="last", layers=inner_layers), torch.no_grad():
            got = vlm.model(**batch.inputs, use_cache=False).logits
    assert len(splices) == 2
    _assert_valid_close(got, ref, batch)


def test_splice_under_autograd_equals_no_grad(tiny64, splices):
    vlm, batch = tiny64
    got, plain, _ = knocked_with_and_without_grad(vlm, batch, layers=[0])
    assert len(splices) == 2
    _assert_valid_close(got, plain, batch, atol=1e-12)


def test_many_rows_mask_every_row_with_the_same_values(tiny64, splices, monkeypatch):
    vlm, batch = tiny64
    layers = [0]
    # every image row loses the first real token; with the splice share at 0, one masked sdpa of every row runs
    monkeypatch.setattr(att, "_SPLICE_MAX_SHARE", 0.0)
    blocked = _blocked(vlm, batch, layers, lambda L: L.image_positions, lambda L: L.valid_positions[:1])
    ref = _run_reference(vlm, batch, _ref_attention(blocked))
    first = [[int(L.valid_positions[0])] for L in batch.layouts]
    with knocked_out(vlm, batch, keys=first, queries="image", layers=layers), torch.no_grad():
        got = vlm.model(**batch.inputs, use_cache=False).logits
    assert splices == []
    _assert_valid_close(got, ref, batch)
