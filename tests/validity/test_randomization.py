"""Model-randomization check: the model is restored bit for bit; signals decorrelate as layers are re-initialised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.analysis import randomization as rz


def _state(vlm):
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_llava():
    from vtrlab.testing import tiny

    return tiny("llava")


def test_randomized_restores_the_model_also_on_error(tiny_llava):
    vlm = tiny_llava
    before = _state(vlm)
    layers = list(vlm.lm_layers)[-1:]
    with rz.randomized(vlm, layers, seed=3):
        inside = _state(vlm)
        changed = [k for k in before if not torch.equal(before[k], inside[k])]
        assert changed and all(".layers." in k for k in changed)
    assert _same(before, _state(vlm))
    with pytest.raises(RuntimeError, match="boom"), rz.randomized(vlm, list(vlm.vision_layers), seed=0):
        raise RuntimeError("boom")
    assert _same(before, _state(vlm))


def test_cascade_steps_are_cumulative_from_the_top(tiny_llava):
    steps = rz.cascade_steps(tiny_llava)
    n_lm, n_v = len(tiny_llava.lm_layers), len(tiny_llava.vision_layers)
    assert len(steps) == 1 + n_lm + n_v and steps[0][1] == "trained" and steps[0][2] == []
    assert [len(m) for _, _, m in steps[1 : 1 + n_lm]] == list(range(1, n_lm + 1))
    assert steps[1][2][0] is tiny_llava.lm_layers[-1]
    with pytest.raises(ValueError, match="stacks"):
        rz.cascade_steps(tiny_llava, stacks=("text",))


def test_randomization_check_on_tiny_model(tiny_llava):
    from PIL import Image

    vlm = tiny_llava
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    batch = vlm.prepare(images, ["what is it ?", "where is the dot ?"])
    before = _state(vlm)
    n = [lay.n_image_tokens for lay in batch.layouts]
    rel = [np.arange(k) < k // 4 for k in n]
    table = rz.randomization_check(vlm, batch, relevance=rel, stacks=("lm",))
    assert _same(before, _state(vlm))
    trained = table[table["step"] == 0]
    assert np.allclose(trained["spearman"].dropna(), 1.0)
    # re-initialising the top LM layer leaves the maps of the layers below it unchanged (causal stack)
    top = len(vlm.lm_layers) - 1
    first = table[(table["step"] == 1) & table["signal"].str.startswith("lm_attn.")]
    below = first[first["signal"] != f"lm_attn.{top}"]
    assert np.allclose(below["spearman"].dropna(), 1.0)
    last = table[(table["step"] == table["step"].max()) & (table["signal"] == f"lm_attn.{top}")]
    assert (last["spearman"] < 0.999).any()
    ci = rz.randomization_ci(table, n_boot=50)
    assert {"spearman", "auroc", "object_auroc"} == set(ci["metric"])


def test_cascade_per_stack_keeps_evenly_spaced_steps_ending_with_the_whole_stack(tiny_llava):
    full = rz.cascade_steps(tiny_llava, stacks=("lm",))
    n = len(tiny_llava.lm_layers)
    one = rz.cascade_steps(tiny_llava, stacks=("lm",), per_stack=1)
    assert [s[1] for s in one] == ["trained", full[-1][1]] and len(one[-1][2]) == n
    assert rz.cascade_steps(tiny_llava, stacks=("lm",), per_stack=n + 3) == full
    two = rz.cascade_steps(tiny_llava, stacks=("lm",), per_stack=2)
    assert len(two) == 3 and two[-1][2] == full[-1][2] and two[1][1] in [s[1] for s in full]
    with pytest.raises(ValueError, match="per_stack"):
        rz.cascade_steps(tiny_llava, per_stack=0)


def test_randomization_prose_judges_only_the_stacks_a_signal_depends_on():
    def m(sig, stack, v, lo, hi):
        k = f"rand_spearman/{stack}/{sig}"
        return {k: v, k + "_low": lo, k + "_high": hi}

    metrics = (
        m("cls_attn.3", "lm", 1.0, 1.0, 1.0)  # the tower's map cannot move when the LM is random
        | m("cls_attn.3", "vision", 0.1, 0.0, 0.2)
        | m("lm_attn.1", "lm", 0.9, 0.85, 0.95)
        | m("reduce.fastervlm", "lm", 1.0, 1.0, 1.0)
        | m("reduce.fastervlm", "vision", 0.7, 0.6, 0.8)
        | m("random", "lm", 1.0, 1.0, 1.0)
    )
    lines = {line.split(":")[0].strip(): line for line in rz.randomization_prose(metrics)[1:]}
    assert lines["cls_attn.3"].endswith("passes.")
    assert "FAILS" in lines["lm_attn.1"] and "FAILS" in lines["reduce.fastervlm"]
    assert "reference" in lines["random"]
