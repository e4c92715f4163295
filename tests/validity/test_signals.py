"""The signal interface: every signal aligned with the layout's image tokens, checked against HF eager
references (attention, saliency by autograd, rollout, logit lens) on a tiny random model; randomization
of every signal restores the model bit for bit; deletion of any signal equals a hand-built keep mask run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtrlab.analysis import deletion as dl
from vtrlab.analysis import randomization as rz
from vtrlab.analysis import signals as sg


@pytest.fixture(scope="module")
def eager():
    """A tiny LLaVA (sdpa, as vtrlab runs it) and a 2-sample batch of equal length (no padding, so the last
    real row is the last row)."""
    from PIL import Image

    from vtrlab.testing import tiny

    vlm = tiny("llava", seed=1)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    batch = vlm.prepare(images, ["what is it ?", "what is it ?"])
    assert len({lay.seq_len for lay in batch.layouts}) == 1
    return vlm, batch


def _hf(vlm, batch):
    """The reference forward: HF eager attention (returns the probabilities), switched back to sdpa after."""
    vlm.model.set_attn_implementation("eager")
    try:
        return vlm.model(**dict(batch.inputs), use_cache=False, output_attentions=True, output_hidden_states=True)
    finally:
        vlm.model.set_attn_implementation("sdpa")


def test_lm_attention_equals_hf_last_row(eager):
    vlm, batch = eager
    with torch.no_grad():
        ref = _hf(vlm, batch).attentions
    got = sg.compute(vlm, batch, ["lm_attn"])
    assert sorted(got) == sorted(f"lm_attn.{i}" for i in range(len(vlm.lm_layers)))
    for i, a in enumerate(ref):
        for b, lay in enumerate(batch.layouts):
            want = a[b, :, -1, lay.image_positions].double().mean(0).numpy()
            np.testing.assert_allclose(got[f"lm_attn.{i}"][b], want, rtol=1e-5, atol=1e-7)


def test_saliency_equals_autograd_of_eager_attention(eager):
    vlm, batch = eager
    params = list(vlm.model.parameters())
    for p in params:
        p.requires_grad_(False)  # frozen model: the signal must turn grads on and restore the flags
    try:
        got = sg.compute(vlm, batch, ["saliency"])
        assert not any(p.requires_grad for p in params)
        for p in params:
            p.requires_grad_(True)
        out = _hf(vlm, batch)
        for a in out.attentions:
            a.retain_grad()
        logp = torch.log_softmax(out.logits[:, -1].double(), -1)
        target = logp.argmax(-1)
        logp.gather(1, target[:, None]).sum().backward()
        for i, a in enumerate(out.attentions):
            contrib = (a * a.grad).sum(1).abs()  # |Σ_heads A ⊙ ∂L/∂A|
            for b, lay in enumerate(batch.layouts):
                want = contrib[b, -1, lay.image_positions].detach().double().numpy()
                np.testing.assert_allclose(got[f"saliency.{i}"][b], want, rtol=1e-4, atol=1e-9)
    finally:
        for p in params:
            p.requires_grad_(True)
            p.grad = None


def test_rollout_equals_float64_product_of_eager_attention(eager):
    vlm, batch = eager
    with torch.no_grad():
        ref = _hf(vlm, batch).attentions
    got = sg.compute(vlm, batch, ["rollout"])
    n = ref[0].shape[-1]
    prod = torch.eye(n, dtype=torch.float64).expand(len(batch.layouts), n, n)
    for i, a in enumerate(ref):
        hat = a.double().mean(1) + torch.eye(n, dtype=torch.float64)
        hat = hat / hat.sum(-1, keepdim=True)
        prod = hat @ prod
        for b, lay in enumerate(batch.layouts):
            want = prod[b, -1, lay.image_positions].numpy()
            np.testing.assert_allclose(got[f"rollout.{i}"][b], want, rtol=1e-4, atol=1e-7)


def test_logit_lens_last_layer_is_the_models_output(eager):
    """After the last layer the lens is the model's own distribution at the image positions; before it,
    the decoder's final norm + LM head applied to HF's hidden states."""
    vlm, batch = eager
    answers = [1, 2]

    class R:  # records carry the reference answer; the lens reads its first token
        def __init__(self, a):
            self.answer = a

    with torch.no_grad():
        out = _hf(vlm, batch)
    tok = getattr(vlm.processor, "tokenizer", vlm.processor)
    recs = [R(tok.decode([a])) for a in answers]
    from vtrlab.analysis.reduction_sweep import _gold_ids

    ids = [g[0] for g in _gold_ids(vlm, [r.answer for r in recs])]
    got = sg.compute(vlm, batch, ["logit_lens"], records=recs)
    last = len(vlm.lm_layers) - 1
    probs = torch.softmax(out.logits.double(), -1)
    decoder = vlm.model.get_decoder() if hasattr(vlm.model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    head = vlm.model.get_output_embeddings()
    for b, lay in enumerate(batch.layouts):
        want = probs[b, lay.image_positions, ids[b]].numpy()
        np.testing.assert_allclose(got[f"logit_lens.{last}"][b], want, rtol=1e-4, atol=1e-9)
        if norm is not None:
            with torch.no_grad():
                mid = torch.softmax(head(norm(out.hidden_states[1][b, lay.image_positions])).double(), -1)
            np.testing.assert_allclose(got["logit_lens.0"][b], mid[:, ids[b]].numpy(), rtol=1e-4, atol=1e-9)


def test_reduce_ground_truth_random_and_undefined_scores(eager):
    import vtrlab as vl

    vlm, batch = eager
    o = sg.Options(methods=("fastv", "pooling"), keep=0.5)
    got = sg.compute(vlm, batch, ["reduce", "random", "ground_truth"], opts=o)
    assert "reduce.pooling" in o.skipped and "ground_truth" in o.skipped  # ranks nothing; no records
    rec = vl.reduce.apply(vlm, batch, vl.reduce.get("fastv", **_scaled(vlm, "fastv")), keep=0.5)
    for b, lay in enumerate(batch.layouts):
        want = sg.finite(rec["score"].values[b, 0, : lay.n_image_tokens])
        np.testing.assert_array_equal(got["reduce.fastv"][b], want)
    np.testing.assert_array_equal(
        np.concatenate(got["random"]), np.concatenate(dl.random_signal([lay.n_image_tokens for lay in batch.layouts]))
    )
    # undefined scores rank below every defined one
    np.testing.assert_array_equal(sg.finite([np.nan, 2.0, 0.5, np.nan]), [-0.5, 2.0, 0.5, -0.5])
    np.testing.assert_array_equal(sg.finite([np.nan, np.nan]), [0.0, 0.0])
    np.testing.assert_array_equal(sg.finite([-np.inf, 1.0, np.inf, 3.0]), [0.0, 1.0, 4.0, 3.0])
    with pytest.raises(ValueError, match="unknown signal kind"):
        sg.compute(vlm, batch, ["attention"])
    with pytest.raises(ValueError, match="records for a batch"):
        sg.compute(vlm, batch, ["random"], records=[None])


def _scaled(vlm, name):
    from vtrlab.analysis.reduction_sweep import depth_scaled_params

    return depth_scaled_params(vlm, name, collapse=True)


def test_randomization_of_every_signal_restores_the_model(eager):
    vlm, batch = eager
    before = {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}
    fn = sg.signal_fn(["lm_attn", "saliency", "rollout", "logit_lens", "random"])
    n = [lay.n_image_tokens for lay in batch.layouts]
    rel = [np.arange(k) < k // 3 for k in n]
    table = rz.randomization_check(vlm, batch, fn, relevance=rel, stacks=("lm",))
    after = vlm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trained = fn(vlm, batch)
    step0 = table[table["step"] == 0]
    assert set(step0["signal"]) == set(trained) and (step0["spearman"] == 1.0).all()
    assert (table[table["signal"] == "random"]["spearman"] == 1.0).all()  # depends on no weights
    top = len(vlm.lm_layers) - 1
    below = table[(table["step"] == 1) & (table["signal"] == "rollout.0")]
    assert (below["spearman"] == 1.0).all()  # re-initialising the top layer leaves layer 0's rollout
    moved = table[(table["step"] == table["step"].max()) & (table["signal"] == f"logit_lens.{top}")]
    assert (moved["spearman"] < 0.999).all()
    ci = rz.randomization_ci(table.assign(family=["a", "b"] * (len(table) // 2)), n_boot=20, by_family=True)
    assert {"a", "b", "all"} == set(ci["family"])
    summary = rz.randomization_summary(ci)
    assert f"rand_spearman/lm/logit_lens.{top}" in summary
    lines = rz.randomization_prose(summary)
    assert any("random:" in line and "reference" in line for line in lines)

    # a signal function that raises mid-cascade still leaves the model restored
    calls = []

    def boom(m, b):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return fn(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        rz.randomization_check(vlm, batch, boom, stacks=("lm", "vision"))
    after = vlm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def organism_and_data():
    import vtrlab as vl
    from vtrlab.data.sources import load_data

    return vl.load("organism", device="cpu"), list(load_data("organism", n_samples=3, seed=0))


def test_compute_over_and_deletion_of_a_signal_equal_a_hand_built_keep_mask(organism_and_data):
    from vtrlab.reduce import answer

    vlm, data = organism_and_data
    sigs = sg.compute_over(vlm, data, ["rollout", "recon_error", "ground_truth", "random"], batch_size=2, layers=[3])
    batch = vlm.prepare([s.image for s in data], [s.question for s in data])
    whole = sg.compute(vlm, batch, ["rollout", "random", "ground_truth"], records=data, layers=[3])
    for k in whole:
        for a, b in zip(sigs[k], whole[k]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # batching changes nothing
    assert all(
        np.isfinite(s).all() and s.shape == (lay.n_image_tokens,) for s, lay in zip(sigs["recon_error"], batch.layouts)
    )
    curves = dl.deletion_curves(vlm, data, {"rollout.3": sigs["rollout.3"]}, fractions=(0.3,), batch_size=3, seed=5)
    for mode in ("deletion", "insertion"):
        keep = []
        for i, s in enumerate(sigs["rollout.3"]):
            order = np.lexsort((np.random.default_rng([5, i]).permutation(s.size), -s))
            top = np.zeros(s.size, bool)
            top[order[: round(0.3 * s.size)]] = True
            keep.append(~top if mode == "deletion" else top)
        want = answer(vlm, batch, keep=keep, max_new_tokens=6)
        got = curves[curves["mode"] == mode].sort_values("sample")
        assert got["prediction"].tolist() == want
        assert got["kept"].tolist() == [int(k.sum()) for k in keep]
    ci = dl.area_ci(
        dl.deletion_curves(vlm, data, {"random": sigs["random"]}, fractions=(0.0, 0.5, 1.0), batch_size=3), n_boot=20
    )
    summary = dl.area_summary(ci)
    assert "causal_auc_accuracy/deletion/all/random" in summary
    assert dl.area_prose(summary)[0].startswith("Causal ranking")


def test_selector_signal_is_the_selector_methods_ranking(organism_and_data):
    import vtrlab as vl

    vlm, data = organism_and_data
    batch = vlm.prepare([s.image for s in data], [s.question for s in data])
    got = sg.compute(vlm, batch, ["selector"])["selector"]
    rec = vl.reduce.apply(vlm, batch, "selector", keep=0.25)
    for b, lay in enumerate(batch.layouts):
        want = rec["score"].values[b, 0, : lay.n_image_tokens]
        np.testing.assert_allclose(got[b][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)
