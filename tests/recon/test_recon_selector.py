"""Selector unit tests on fresh random features (no VLM): loss, straight-through mask, top-k, save/load."""

import json

import numpy as np
import pytest
import torch

from vtrlab.recon import SampleFeatures, Selector, SelectorConfig, gumbel_keep_mask, selector_loss, train_selector
from vtrlab.recon.error import masked_token_error, patches_to_tokens
from vtrlab.recon.selector import collate


def _samples(n=6, side=4, c=8, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rr, cc = np.divmod(np.arange(side * side), side)
        L = side * side if lengths is None else lengths[i]
        out.append(SampleFeatures(torch.randn(L, c, generator=g), rr[:L], cc[:L], np.zeros(L, int), np.arange(L), L))
    return out


def _cfg(**kw):
    return SelectorConfig(feature_dim=8, d_model=16, n_heads=2, selector_layers=1, reconstructor_layers=1, **kw)


def test_loss_matches_float64_reference_including_max_term():
    g = torch.Generator().manual_seed(1)
    rec, tgt = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.5).float()
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 3:] = False
    p = 0.45
    out = selector_loss(rec, tgt, mask, valid, p)
    ref_recon, ref_ratio = [], []
    for b in range(3):
        n = int(valid[b].sum())
        r, t = rec[b, :n].double().numpy(), tgt[b, :n].double().numpy()
        ref_recon.append(np.mean(np.sum((r - t) ** 2, axis=1) / 4))
        ref_ratio.append(max(mask[b, :n].double().mean().item(), p))
    assert out["loss"].item() == pytest.approx(np.mean(ref_recon) + np.mean(ref_ratio), rel=1e-6)
    assert out["ratio"].item() == pytest.approx(np.mean(ref_ratio), rel=1e-6)
    # the max term: no gradient on the mask below p, gradient 1/n per token above p
    m = torch.full((1, 4), 0.25, requires_grad=True)
    selector_loss(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), m, torch.ones(1, 4, dtype=torch.bool), 0.5)[
        "loss"
    ].backward()
    assert torch.all(m.grad == 0)
    m = torch.full((1, 4), 0.75, requires_grad=True)
    selector_loss(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), m, torch.ones(1, 4, dtype=torch.bool), 0.5)[
        "loss"
    ].backward()
    assert torch.allclose(m.grad, torch.full((1, 4), 0.25))


def test_straight_through_mask_is_hard_forward_soft_backward():
    logits = torch.randn(2, 50, requires_grad=True)
    hard, soft = gumbel_keep_mask(logits, tau=0.7, generator=torch.Generator().manual_seed(0))
    assert set(torch.unique(hard.detach()).tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.detach(), (soft.detach() > 0.5).float())
    w = torch.randn(2, 50)
    (hard * w).sum().backward()
    # d hard / d logits equals d soft / d logits = soft (1 - soft) / tau
    expected = w * soft.detach() * (1 - soft.detach()) / 0.7
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_gradients_flow_to_selector_through_the_mask():
    torch.manual_seed(0)
    sel = Selector(_cfg(p=0.5))
    feats, row, col, valid = collate(_samples(3), "cpu")
    out = sel(feats, row, col, valid, generator=torch.Generator().manual_seed(0))
    out["recon"].backward()  # reconstruction alone must train the selector (via the straight-through mask)
    assert sel.select_head.weight.grad is not None and sel.select_head.weight.grad.abs().sum() > 0
    assert sel.selector.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0
    assert sel.mask_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("n", [1, 7, 16, 49])
def test_topk_keeps_exactly_k_for_every_budget(n):
    scores = np.random.default_rng(n).normal(size=n)
    for r in (0.0, 0.1, 0.3, 0.5, 0.77, 1.0):
        keep = Selector.topk_mask(scores, r)
        assert keep.dtype == bool and keep.sum() == int(round(r * n))
        if 0 < keep.sum() < n:
            assert scores[keep].min() >= scores[~keep].max()
    assert Selector.topk_mask(scores, 1.0).all()
    with pytest.raises(ValueError, match="ratio=1.5"):
        Selector.topk_mask(scores, 1.5)


def test_token_scores_average_patches_of_a_token_and_padding_is_ignored():
    torch.manual_seed(0)
    sel = Selector(_cfg()).eval()
    samples = _samples(2, lengths=[16, 11])
    merged = SampleFeatures(
        samples[0].features, samples[0].row, samples[0].col, samples[0].tile, np.arange(16) // 4, 4
    )  # 4 patches per token, like a 2x2 merge
    patch = sel.patch_scores([samples[0]])[0]
    tok = sel.token_scores_from([merged])[0]
    assert np.allclose(tok, patch.reshape(4, 4).mean(1), atol=1e-6)
    # a padded sample scores the same alone and in a batch with a longer one
    alone = sel.patch_scores([samples[1]])[0]
    batched = sel.patch_scores(samples)[1]
    assert np.allclose(alone, batched, atol=1e-5)


def test_training_reduces_loss_keeps_near_p_and_save_load_round_trip(tmp_path):
    train = _samples(16, seed=1)
    sel, hist = train_selector(
        train,
        _cfg(p=0.5),
        steps=60,
        batch_size=8,
        lr=3e-3,
        progress=False,
        eval_samples=_samples(4, seed=2),
        eval_every=20,
    )
    assert {"step", "loss", "recon", "kept", "eval_recon"} <= set(hist.columns)
    assert hist["loss"].iloc[-10:].mean() < hist["loss"].iloc[:10].mean()
    path = sel.save(tmp_path / "sel", history=hist)
    (path / "README.md").write_text("card")
    sel.save(path, history=hist)  # replacing keeps foreign files, leaves no temp dirs
    assert (path / "README.md").read_text() == "card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sel"]
    assert json.loads((path / "config.json").read_text())["p"] == 0.5
    again = Selector.load(path)
    test = _samples(3, seed=3)
    for a, b in zip(sel.patch_scores(test), again.patch_scores(test)):
        assert np.array_equal(a, b)
    e1 = masked_token_error(sel, test[:1], mode="random", n_draws=4)
    e2 = masked_token_error(again, test[:1], mode="random", n_draws=4)
    assert np.array_equal(e1[0], e2[0])
    assert len(Selector.history(path)) == 60
    with pytest.raises(FileNotFoundError, match="holds no selector"):
        Selector.load(tmp_path / "missing")


def test_masked_token_error_single_matches_direct_reconstruction():
    torch.manual_seed(0)
    sel = Selector(_cfg()).eval()
    s = _samples(1)[0]
    err = masked_token_error(sel, [s], mode="single")[0]
    feats, row, col, valid = collate([s])
    for j in (0, 5, 15):
        keep = torch.ones(1, 16)
        keep[0, j] = 0
        with torch.no_grad():
            rec = sel.reconstruct(feats, keep, row, col, valid)
        ref = ((rec[0, j] - sel.normalize(feats)[0, j]) ** 2).mean().item()
        assert err[j] == pytest.approx(ref, rel=1e-5)
    assert np.allclose(
        patches_to_tokens(SampleFeatures(s.features, s.row, s.col, s.tile, np.arange(16) // 2, 8), err),
        err.reshape(8, 2).mean(1),
    )
    with pytest.raises(ValueError, match="mode='every'"):
        masked_token_error(sel, [s], mode="every")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="p=1.5"):
        _cfg(p=1.5)
    with pytest.raises(ValueError, match="d_model=18"):
        SelectorConfig(feature_dim=4, d_model=18, n_heads=2)


def test_topk_reconstruction_error_matches_direct_computation():
    from vtrlab.recon import topk_reconstruction_error

    torch.manual_seed(0)
    sel = Selector(_cfg()).eval()
    samples = _samples(3, seed=4, lengths=[16, 12, 9])
    got = topk_reconstruction_error(sel, samples, 0.5, batch_size=2)
    total, n = 0.0, 0
    for s in samples:  # one sample at a time, float64 accumulation
        feats, row, col, valid = collate([s])
        with torch.no_grad():
            lg = sel.logits(feats, row, col, valid)[0]
            keep = torch.zeros(1, len(s.features))
            keep[0, lg.topk(int(round(0.5 * len(s.features)))).indices] = 1
            rec = sel.reconstruct(feats, keep, row, col, valid)
        total += ((rec - sel.normalize(feats)) ** 2).mean(-1).double().sum().item()
        n += len(s.features)
    assert got == pytest.approx(total / n, rel=1e-5)


def test_masked_token_error_chunks_bounded_by_attention_bytes_give_the_same_errors():
    """Memory is bounded by ``budget`` (the chunk of masks shrinks as patches grow), the errors do not change."""
    from vtrlab.recon.error import mask_chunk

    sel = Selector(_cfg()).eval()  # 2 heads
    assert mask_chunk(sel, 2880) == (1 << 30) // (2 * 2880 * 2880 * 4) == 16
    assert mask_chunk(sel, 16) == 256 and mask_chunk(sel, 10**6) == 1
    s = _samples(1)[0]
    whole = masked_token_error(sel, [s], mode="single")[0]
    per_mask = 2 * 16 * 16 * 4
    for budget in (per_mask, 3 * per_mask, 1):  # 1, 3 and (at least) 1 mask per chunk
        np.testing.assert_allclose(masked_token_error(sel, [s], mode="single", budget=budget)[0], whole, rtol=1e-6)
    np.testing.assert_allclose(
        masked_token_error(sel, [s], mode="random", n_draws=5, budget=2 * per_mask)[0],
        masked_token_error(sel, [s], mode="random", n_draws=5)[0],
        rtol=1e-6,
    )
