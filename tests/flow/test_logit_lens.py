"""vl.logit_lens against a float64 reference built from HF's own ``output_hidden_states`` and the model's
logits, on every tiny family; composition with knockout; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.flow import knocked_out, logit_lens
from vtrlab.flow.logit_lens import _final_norm, _softcap


def _reference(vlm, batch):
    """(L, B, N, V) float64 log-probs of the lens: norm + head on HF's hidden_states[l + 1] for every layer
    but the last, and the model's own logits for the last layer."""
    with torch.no_grad():
        out = vlm.model(**batch.inputs, use_cache=False, output_hidden_states=True)
        hs = out.hidden_states
        n = len(vlm.lm_layers)
        assert len(hs) == n + 1
        norm, head, cap = _final_norm(vlm), vlm.adapter.lm_head(vlm.model), _softcap(vlm)
        per = []
        for i in range(n - 1):
            lg = head(norm(hs[i + 1]))
            if cap:
                lg = torch.tanh(lg / cap) * cap
            per.append(torch.log_softmax(lg, -1))
        per.append(torch.log_softmax(out.logits, -1))
    return torch.stack(per).numpy()


def test_logit_lens_equals_float64_reference(tiny_f64):
    vlm, batch = tiny_f64
    ref = _reference(vlm, batch)
    words = {"a": 3, "b": 7, "c": 11}
    ds = logit_lens(vlm, batch, queries="image", layers="all", targets=words, top_k=4, chunk=5)
    assert ds.layer.values.tolist() == list(range(len(vlm.lm_layers)))
    assert ds.target.values.tolist() == ["a", "b", "c"]
    for b, L in enumerate(batch.layouts):
        pos = np.sort(L.image_positions)
        n = len(pos)
        assert np.isnan(ds.query_position.values[b, n:]).all()
        np.testing.assert_array_equal(ds.query_position.values[b, :n], pos)
        assert (ds.query_kind.values[b, :n] == "image").all()
        r = ref[:, b, pos]  # (L, n, V)
        np.testing.assert_allclose(ds.target_logprob.values[b, :, :n], r[..., [3, 7, 11]], atol=1e-10, rtol=1e-10)
        top = np.sort(r, -1)[..., ::-1][..., :4]
        np.testing.assert_allclose(ds.top_prob.values[b, :, :n], np.exp(top), atol=1e-6)
        got_top = np.take_along_axis(r, ds.top_token.values[b, :, :n], -1)
        np.testing.assert_allclose(got_top, top, atol=1e-10)  # the named tokens have those probabilities
        rank = (r[..., None, :] > r[..., [3, 7, 11]][..., None]).sum(-1)
        np.testing.assert_array_equal(ds.target_rank.values[b, :, :n], rank)
        assert np.isnan(ds.target_logprob.values[b, :, n:]).all()


def test_logit_lens_default_target_is_the_answer(tiny_f64):
    vlm, batch = tiny_f64
    ref = _reference(vlm, batch)
    last_layer = len(vlm.lm_layers) - 1
    ds = logit_lens(vlm, batch, queries="last", layers=[0, -1], top_k=2, full=True)
    assert ds.layer.values.tolist() == [0, last_layer]
    for b, L in enumerate(batch.layouts):
        answer = int(ref[-1, b, L.last_position].argmax())
        assert ds.target_id.values[b, 0] == answer
        assert ds.top_token.values[b, 1, 0, 0] == answer  # after the last layer the lens is the output
        assert ds.target_rank.values[b, 1, 0, 0] == 0
        np.testing.assert_allclose(ds.logprobs.values[b, :, 0], ref[[0, -1], b, L.last_position], atol=1e-6)


def test_logit_lens_under_knockout_reads_the_knocked_out_stream(tiny_f64):
    vlm, batch = tiny_f64
    n = len(vlm.lm_layers)
    with knocked_out(vlm, batch, keys="image", queries="last", layers="all"):
        with torch.no_grad():
            cut = torch.log_softmax(vlm.model(**batch.inputs, use_cache=False).logits, -1).numpy()
        ds = logit_lens(vlm, batch, queries="last", layers=[n - 1], targets=[[1, 2], [3, 4]], full=True)
    plain = logit_lens(vlm, batch, queries="last", layers=[n - 1], targets=[[1, 2], [3, 4]], full=True)
    for b, L in enumerate(batch.layouts):
        np.testing.assert_allclose(ds.logprobs.values[b, 0, 0], cut[b, L.last_position], atol=1e-6)
    np.testing.assert_array_equal(ds.target_id.values, [[1, 2], [3, 4]])
    assert np.abs(ds.logprobs.values - plain.logprobs.values).max() > 1e-8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"targets": "red"}, "targets='red' is not accepted"),
        ({"targets": [1]}, "targets gives 1 entries for a batch of 2"),
        ({"targets": [1, 10**9]}, "outside the vocabulary"),
        ({"targets": {"red": 1.5}}, "is not a token id"),
        ({"top_k": 0}, "top_k=0"),
        ({"queries": "pixels"}, "queries='pixels' is not accepted"),
        ({"layers": [99]}, "99 is not an index"),
    ],
)
def test_logit_lens_bad_input(kwargs, match, llava_f64):
    vlm, batch = llava_f64
    with pytest.raises(ValueError, match=match):
        logit_lens(vlm, batch, **kwargs)
