"""The session-5 fast paths of capture, each against the computation it replaces (float64 references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_capture_rows import _inputs, _Module, _ref_probs

from vtrlab.probes import attention as A
from vtrlab.probes import engine


def test_last_row_plan_adds_no_bias_and_equals_reference():
    """Causal, no mask, every row the last position: the bias is all zeros, so none is built or added."""
    q, k = _inputs(3)
    B, H, N, D = q.shape
    last = A.RowPlan.build(np.full((B, 1), N - 1), "cpu")
    assert last.bias(None, True, N) is None
    other = A.RowPlan.build(np.array([[N - 1], [N - 2]]), "cpu")  # one row that must not see the last key
    assert other.bias(None, True, N) is not None
    ref = _ref_probs(q, k, None, 0.3, True)
    for plan in (last, other):
        got = A.row_probabilities(_Module(), q, k, None, 0.3, True, plan.rows, plan=plan)
        for b in range(B):
            r = int(plan.rows_host[b, 0])
            torch.testing.assert_close(got[b, :, 0].double(), ref[b, :, r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["causal", "additive"])
def test_probabilities_written_into_a_given_buffer(mask_kind):
    q, k = _inputs(4)
    B, H, N, D = q.shape
    mask = None
    if mask_kind == "additive":
        allowed = torch.ones(N, N, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
        allowed[1, :, :, :2] = False
        allowed[1, :, :2, 0] = True
        mask = torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)
    rows = np.array([[N - 1, 4], [7, -1]])
    plan = A.RowPlan.build(rows, "cpu")
    out = torch.full((B, H, 2, N), 7.0)
    got = A.row_probabilities(_Module(), q, k, mask, 0.3, mask is None, plan.rows, plan=plan, out=out)
    assert got.data_ptr() == out.data_ptr()
    fresh = A.row_probabilities(_Module(), q, k, mask, 0.3, mask is None, plan.rows, plan=plan)
    torch.testing.assert_close(out, fresh, equal_nan=True)
    assert torch.isnan(out[1, :, 1]).all()  # the padded row


def test_to_device_copies_values_and_dtype():
    arr = np.array([[3, -1], [0, 5]], dtype=np.int64)
    t = A.to_device(arr, "cpu")
    assert t.dtype == torch.int64 and t.tolist() == arr.tolist()
    plan = A.RowPlan.build(arr, torch.device("cpu"))
    assert plan.padded and plan.rows_host.tolist() == arr.tolist()


def test_vision_gather_then_labels_equal_a_host_gather():
    """The split vision table (device gather at launch, labels at build) against numpy fancy indexing."""
    import pandas as pd

    class L:
        def __init__(self, n):
            self.vision = pd.DataFrame(
                {
                    "kind": ["cls"] + ["patch"] * (n - 1),
                    "crop": [0] * n,
                    "vpos": np.arange(n),
                    "image": [0] * n,
                    "tile": [0] * n,
                    "row": np.arange(n) // 2,
                    "col": np.arange(n) % 2,
                }
            )

    layouts = [L(5), L(3)]
    g = torch.Generator().manual_seed(0)
    probs = {i: torch.rand(2, 3, 5, generator=g) for i in (0, 2)}  # (crops, H, S)
    for head_mean in (False, True):
        values, coords = engine._vision_labels(*engine._vision_gather(layouts, probs, [0, 2], head_mean, np.float32))
        for b, n in enumerate((5, 3)):
            ref = np.stack([probs[i][0].numpy()[:, :n] for i in (0, 2)])  # (L, H, n): every sample reads crop 0
            ref = ref.mean(1) if head_mean else ref
            np.testing.assert_allclose(values[b, ..., :n], ref, rtol=1e-6)
            assert np.isnan(values[b, ..., n:]).all()
        assert coords["vision_key_kind"][1][1].tolist() == ["cls", "patch", "patch", "pad", "pad"]
        assert coords["vision_key_row"][1][1].tolist() == [0, 0, 1, -1, -1]
        old = engine._vision_table(layouts, probs, [0, 2], head_mean=head_mean)
        np.testing.assert_array_equal(old[0], values)
