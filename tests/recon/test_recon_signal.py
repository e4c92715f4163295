"""Selector on real (tiny) VLMs, and reconstruction error as a labeled per-token, per-layer signal."""

import numpy as np
import pytest
import torch
from PIL import Image

from vtrlab.models.base import ImageLayout
from vtrlab.models.labels import token_dataset
from vtrlab.recon import (
    Selector,
    SelectorConfig,
    layer_error,
    token_error,
    token_features,
    vision_features,
)
from vtrlab.recon.ridge import ridge_fit, ridge_predict, ridge_token_error
from vtrlab.testing import tiny, tiny_families


def _layout(side, offset=3):
    n = side * side
    r, c = np.divmod(np.arange(n), side)
    return ImageLayout(
        positions=np.arange(n) + offset,
        kind=np.array(["image"] * n, dtype=object),
        image=np.zeros(n, int),
        tile=np.zeros(n, int),
        row=r,
        col=c,
        x0=c * 8.0,
        y0=r * 8.0,
        x1=c * 8.0 + 8,
        y1=r * 8.0 + 8,
        seq_len=n + offset + 2,
        valid_positions=np.arange(n + offset + 2),
        question_positions=np.array([n + offset]),
    )


def test_ridge_fit_matches_float64_least_squares_and_shrinks():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 3))
    assert np.allclose(ridge_fit(x, y, 0.0), np.linalg.lstsq(x, y, rcond=None)[0], atol=1e-10)
    lam = 0.3 * np.trace(x.T @ x) / 5
    assert np.allclose(ridge_fit(x, y, 0.3), np.linalg.solve(x.T @ x + lam * np.eye(5), x.T @ y), atol=1e-10)


@pytest.mark.parametrize("n, d", [(30, 70), (70, 30), (25, 25)])
def test_ridge_predict_equals_the_float64_primal_solution_with_fewer_rows_than_columns(n, d):
    """The (n, n) dual form used when n < d predicts what the (d, d) primal system predicts."""
    rng = np.random.default_rng(n * d)
    x, y, x_new = rng.normal(size=(n, d)), rng.normal(size=(n, 4)), rng.normal(size=(9, d))
    for alpha in (1e-3, 0.1, 2.0):
        lam = alpha * np.trace(x.T @ x) / d
        want = x_new @ np.linalg.solve(x.T @ x + lam * np.eye(d), x.T @ y)
        np.testing.assert_allclose(ridge_predict(x, y, x_new, alpha), want, rtol=1e-8, atol=1e-10)


def test_ridge_error_is_zero_for_redundant_tokens_and_one_for_independent_tokens():
    rng = np.random.default_rng(1)
    lays = [_layout(6) for _ in range(40)]  # enough samples per fold to identify the 12-dim linear map
    redundant = [np.tile(rng.normal(size=(1, 5)), (36, 1)) for _ in lays]  # every token = the sample's vector
    independent = [rng.normal(size=(36, 5)) for _ in lays]
    e_red = np.concatenate(ridge_token_error(redundant, lays, keep_ratio=0.5, n_draws=3, alpha=1e-6))
    e_ind = np.concatenate(ridge_token_error(independent, lays, keep_ratio=0.5, n_draws=3, alpha=1e-2))
    assert np.nanmax(e_red) < 1e-6
    assert 0.8 < np.nanmean(e_ind) < 1.3
    with pytest.raises(ValueError, match="keep_ratio=1.0"):
        ridge_token_error(independent, lays, keep_ratio=1.0)


def test_token_dataset_shape_and_coords():
    lays = [_layout(3), _layout(2, offset=5)]
    ds = token_dataset(
        {
            "vision_error": ("vision_layer", {0: [np.arange(9.0), np.arange(4.0)]}),
            "lm_error": ("layer", {1: [np.ones(9), np.ones(4)], 3: [np.zeros(9), np.zeros(4)]}),
        },
        lays,
    )
    assert ds["lm_error"].dims == ("sample", "layer", "token") and ds["lm_error"].shape == (2, 2, 9)
    assert ds["vision_error"].dims == ("sample", "vision_layer", "token")
    assert ds.layer.values.tolist() == [1, 3] and ds.vision_layer.values.tolist() == [0]
    assert ds["vision_error"].sel(sample=1, vision_layer=0).values[:4].tolist() == [0, 1, 2, 3]
    assert np.isnan(ds["lm_error"].sel(sample=1).values[:, 4:]).all()
    assert ds.position.values[1, :4].tolist() == [5, 6, 7, 8] and ds.position.values[1, 4] == -1
    assert ds.row.values[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.x1.values[1, :2].tolist() == [8.0, 16.0] and np.isnan(ds.x0.values[1, 4])
    with pytest.raises(ValueError, match="has shape \\(3,\\); sample 0 has 9 image tokens"):
        token_dataset({"lm_error": ("layer", {0: [np.ones(3), np.ones(4)]})}, lays)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm_batch(request):
    vlm = tiny(request.param, seed=0)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]
    return vlm, vlm.prepare(imgs, ["what ?", "what color is it ?"])


@pytest.mark.parametrize("family", tiny_families())
def test_every_lm_image_token_is_covered_by_its_patches(family):
    """Patches map to LM tokens by pixel box: 1:1 (LLaVA), 4:1 (Qwen merge, Idefics3 shuffle, Gemma3 pool)."""
    vlm = tiny(family, seed=0)
    rng = np.random.default_rng(0)
    imgs = [
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)),
    ]
    batch = vlm.prepare(imgs, ["a ?", "what is it ?"])
    (feats,) = vision_features(vlm, batch).values()
    for s, lay in zip(feats, batch.layouts):
        cover = np.bincount(s.token[s.token >= 0], minlength=lay.n_image_tokens)
        assert s.n_tokens == lay.n_image_tokens and (cover > 0).all()
        assert len(np.unique(cover)) == 1  # every token covers the same number of patches
        mapped = lay.vision_table()[lambda t: t["kind"] == "patch"].iloc[s.token >= 0]
        img = lay.kind == "image"
        cx = (mapped["x0"].to_numpy() + mapped["x1"].to_numpy()) / 2
        tok = s.token[s.token >= 0]
        assert np.all((lay.x0[img][tok] <= cx) & (cx < lay.x1[img][tok]))


def test_vision_features_are_the_patch_tokens_of_the_projector_layer(vlm_batch):
    vlm, batch = vlm_batch
    layer = vlm.adapter.vision_feature_layer(vlm.model) % len(vlm.vision_layers)
    feats = vision_features(vlm, batch)[layer]
    for s, lay in zip(feats, batch.layouts):
        patches = (lay.vision_table()["kind"] == "patch").sum()
        assert s.features.shape[0] == patches  # [CLS] excluded
        assert (s.token >= 0).all() and set(s.token) == set(range(lay.n_image_tokens))  # every patch -> an LM token
    if vlm.family == "llava":  # oracle: the vision tower's own hidden states, [CLS] dropped, 1:1 with LM tokens
        with torch.no_grad():
            hs = vlm.model.model.vision_tower(batch.inputs["pixel_values"], output_hidden_states=True).hidden_states
        n_cls = 1 if vlm.has_cls else 0
        for i, s in enumerate(feats):
            assert torch.allclose(s.features, hs[layer + 1][i, n_cls:], atol=1e-6)
            assert np.array_equal(s.token, np.arange(len(s.token)))


def test_select_keeps_exact_budget_per_sample(vlm_batch):
    vlm, batch = vlm_batch
    layer = vlm.adapter.vision_feature_layer(vlm.model) % len(vlm.vision_layers)
    c = vision_features(vlm, batch)[layer][0].features.shape[1]
    torch.manual_seed(0)
    sel = Selector(
        SelectorConfig(feature_dim=c, d_model=16, n_heads=2, selector_layers=1, reconstructor_layers=1)
    ).eval()
    scores = sel.token_scores(vlm, batch)
    for r in (0.1, 0.5, 1.0):
        keep = sel.select(vlm, batch, ratio=r)
        for k, s, lay in zip(keep, scores, batch.layouts):
            assert k.dtype == bool and k.shape == (lay.n_image_tokens,)
            assert k.sum() == int(round(r * lay.n_image_tokens))
            if 0 < k.sum() < len(k):
                assert s[k].min() >= s[~k].max()
    assert all(k.all() for k in sel.select(vlm, batch, ratio=1.0))
    err = token_error(vlm, batch, selector=sel, mode="single")
    assert err["recon_error"].dims == ("sample", "token") and int(err.vision_layer) == layer
    assert np.isfinite(err["recon_error"].sel(sample=0).values[: batch.layouts[0].n_image_tokens]).all()
    assert err.row.dims == ("sample", "token")
    with pytest.raises(TypeError, match="selector must be"):
        token_error(vlm, batch, selector="organism")


def test_token_features_and_layer_error(vlm_batch):
    vlm, batch = vlm_batch
    feats = token_features(vlm, batch, vision_layers="all", layers=[0])
    assert list(feats) == [("vision", i) for i in range(len(vlm.vision_layers))] + [("lm", 0)]
    with torch.no_grad():
        hs = vlm.model(**dict(batch.inputs), output_hidden_states=True).hidden_states
    for i, lay in enumerate(batch.layouts):  # oracle: HF hidden_states[1] is the output of LM layer 0
        assert np.allclose(feats[("lm", 0)][i], hs[1][i, lay.image_positions].double().numpy(), atol=1e-6)
    ds = layer_error(vlm, batch, layers=[0], vision_layers=[0], keep_ratio=0.5, n_draws=2, progress=False)
    assert ds["lm_error"].dims == ("sample", "layer", "token") and ds.layer.values.tolist() == [0]
    assert ds["vision_error"].dims == ("sample", "vision_layer", "token") and ds.vision_layer.values.tolist() == [0]
    assert np.isfinite(np.nanmean(ds["lm_error"].values)) and np.isfinite(np.nanmean(ds["vision_error"].values))
    # the same ridge on the same features gives the same values (one rule, labelled with int layers)
    direct = ridge_token_error(feats[("lm", 0)], batch.layouts, keep_ratio=0.5, n_draws=2)
    for i, lay in enumerate(batch.layouts):
        assert np.allclose(
            ds["lm_error"].sel(sample=i, layer=0).values[: lay.n_image_tokens], direct[i], equal_nan=True
        )
    assert "vision_error" not in layer_error(vlm, batch, layers=[0], vision_layers=None, n_draws=1, progress=False)
    with pytest.raises(ValueError, match="layers: 99 is not an index"):
        token_features(vlm, batch, vision_layers=None, layers=[99])
