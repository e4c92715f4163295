"""Position-id policy of the reduction methods: each method's code policy, the ``positions=`` override,
and the mRoPE rule (pre-LM methods whose LLaVA code renumbers keep the ids on Qwen, as their Qwen ports do).

Oracle: the position ids the LM decoder really receives (a forward pre-hook on the LM records them)
compared with the ids the unreduced model gives the same tokens (``kept``: identical per surviving
token, gaps where tokens were dropped) or their running count (``renumbered``: consecutive).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.reduce import get, logits
from vtrlab.reduce.keep import reduced_decoder_inputs
from vtrlab.reduce.registry import NotApplicable
from vtrlab.testing import tiny

CODE_POLICY = {
    # in-LM methods (LLaVA-codebase behaviour inside the LM)
    "fastv": "kept",
    "dart": "kept",
    "feather": "kept",
    "fitprune": "kept",
    "sparsevlm": "kept",
    "pyramiddrop": "renumbered",
    # pre-LM methods whose LLaVA code concatenates the kept features (arange positions)
    "divprune": "renumbered",
    "fastervlm": "renumbered",
    "vispruner": "renumbered",
    "visionzip": "renumbered",
    "vtc_cls": "renumbered",
}


@pytest.mark.parametrize("name,policy", sorted(CODE_POLICY.items()))
def test_code_policies(name, policy):
    assert get(name).positions == policy


def _images(seed, n=1):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(n)]


def _lm_positions(vlm, batch, **kw):
    """Position ids the model is called with in a reduced forward (first call), and the run's source positions."""
    lm = vlm.model
    seen = []

    def hook(_m, args, kwargs):
        if kwargs.get("inputs_embeds") is not None and kwargs.get("position_ids") is not None:
            seen.append(kwargs["position_ids"])

    h = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = logits(vlm, batch, **kw)
    finally:
        h.remove()
    assert len(seen) == 1, "one reduced forward"
    return seen[0], out.source_positions


@pytest.mark.parametrize("positions", [None, "kept", "renumbered"])
def test_divprune_positions_reach_the_lm(positions):
    vlm = tiny("llava", seed=0)
    batch = vlm.prepare(_images(0), ["what is in the picture ?"])
    kw = {} if positions is None else {"positions": positions}
    ds = vl.reduce.apply(vlm, batch, "divprune", keep=0.5, **kw)
    want = positions or "renumbered"
    assert ds.attrs["positions"] == want
    pos, src = _lm_positions(vlm, batch, keep=0.5, method="divprune", **kw)
    full = reduced_decoder_inputs(vlm, batch, None).position_ids[0]
    src = src[0]
    real = src >= 0
    got = pos[0][real].tolist()
    if want == "kept":
        assert got == full[src[real]].tolist()  # each token keeps the id the full sequence gave it
        assert len(set(np.diff(got))) > 1  # gaps where tokens were dropped
    else:
        assert got == list(range(got[0], got[0] + len(got)))


@pytest.mark.parametrize("name", ["divprune", "fastervlm", "vtc_cls"])
def test_renumbering_methods_keep_ids_on_mrope(name):
    vlm = tiny("qwen2_vl", seed=0)
    batch = vlm.prepare(_images(1), ["what is in the picture ?"])
    try:
        ds = vl.reduce.apply(vlm, batch, name, keep=0.5)
    except NotApplicable:
        pytest.skip(f"{name} is not applicable to qwen2_vl")
    assert ds.attrs["positions"] == "kept"
    pos, src = _lm_positions(vlm, batch, keep=0.5, method=name)
    full = reduced_decoder_inputs(vlm, batch, None).position_ids[:, 0]  # (3, N) mRoPE
    real = src[0] >= 0
    torch.testing.assert_close(pos[:, 0][:, real], full[:, src[0][real]])
    with pytest.raises(ValueError, match="renumbered.*not defined for multi-axis"):
        vl.answer(vlm, batch, method=name, keep=0.5, positions="renumbered", max_new_tokens=1)


def test_pyramiddrop_on_mrope_needs_kept_positions():
    vlm = tiny("qwen2_vl", seed=0)
    batch = vlm.prepare(_images(2), ["what is in the picture ?"])
    with pytest.raises(NotApplicable, match="positions='kept'"):
        vl.reduce.apply(vlm, batch, "pyramiddrop", keep=0.5, layers=(1,))
    ds = vl.reduce.apply(vlm, batch, "pyramiddrop", keep=0.5, layers=(1,), positions="kept")
    assert ds.attrs["positions"] == "kept" and int(ds.budget[0]) == round(0.5 * batch.layouts[0].n_image_tokens)


def test_policy_does_not_leak_between_models():
    m = get("divprune")
    q = tiny("qwen2_vl", seed=0)
    vl.reduce.apply(q, q.prepare(_images(3), ["what ?"]), m, keep=0.5)
    assert m.positions == "kept"
    lv = tiny("llava", seed=0)
    ds = vl.reduce.apply(lv, lv.prepare(_images(3), ["what ?"]), m, keep=0.5)
    assert ds.attrs["positions"] == "renumbered"


def test_bad_positions_value():
    with pytest.raises(ValueError, match="positions='shifted'; accepted: kept, renumbered"):
        get("fastv", positions="shifted")
    with pytest.raises(ValueError, match="has no parameter 'nope'.*and positions=kept\\|renumbered"):
        get("fastv", nope=1)
