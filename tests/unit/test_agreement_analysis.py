"""vtrlab.analysis.attention: tidy tables from a capture, checked against plain float64 loops."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from test_agreement import ref_auroc, ref_spearman, ref_topk

from vtrlab.analysis import attention as att

GRID = 3  # 3x3 image tokens


def _fake_capture(seed=0, B=2, L=3, H=2, R=2, text_before=2, text_after=3):
    """A capture-shaped Dataset with random row-stochastic attention and a 3x3 image block."""
    rng = np.random.default_rng(seed)
    N = text_before + GRID * GRID + text_after + 1  # one pad at the front of sample 1
    attn = rng.random((B, L, H, R, N))
    kind = np.full((B, N), "text", dtype=object)
    row = np.full((B, N), -1)
    col = np.full((B, N), -1)
    for b in range(B):
        start = text_before + b  # sample 1 is left-padded by one
        pos = np.arange(start, start + GRID * GRID)
        kind[b, pos] = "image"
        row[b, pos], col[b, pos] = np.divmod(np.arange(GRID * GRID), GRID)
        if b == 1:
            kind[b, 0] = "pad"
            attn[b, ..., 0] = 0.0
    attn /= attn.sum(-1, keepdims=True)
    attn[1, :, :, 1] = np.nan  # sample 1 has a single query row
    qpos = np.array([[N - 2, N - 1], [N - 1, np.nan]])
    vis = rng.random((B, 2, H, GRID * GRID + 1))
    vkind = np.array([["cls"] + ["patch"] * GRID * GRID] * B)
    vr = np.r_[-1, np.divmod(np.arange(GRID * GRID), GRID)[0]]
    vc = np.r_[-1, np.divmod(np.arange(GRID * GRID), GRID)[1]]
    zeros = np.zeros((B, N), int)
    ds = xr.Dataset(
        {
            "lm_attn": (("sample", "layer", "head", "query", "key"), attn),
            "query_position": (("sample", "query"), qpos),
            "key_kind": (("sample", "key"), kind.astype(str)),
            "key_image": (("sample", "key"), np.where(kind == "image", 0, -1)),
            "key_tile": (("sample", "key"), np.where(kind == "image", 0, -1) + zeros),
            "key_row": (("sample", "key"), row),
            "key_col": (("sample", "key"), col),
            "vision_attn": (("sample", "vision_layer", "vision_head", "vision_key"), vis),
            "vision_key_kind": (("sample", "vision_key"), vkind),
            "vision_key_crop": (("sample", "vision_key"), np.repeat(np.arange(B)[:, None], GRID * GRID + 1, 1)),
            "vision_key_vpos": (("sample", "vision_key"), np.tile(np.arange(GRID * GRID + 1), (B, 1))),
            "vision_key_image": (("sample", "vision_key"), np.where(vkind == "patch", 0, -1)),
            "vision_key_tile": (("sample", "vision_key"), np.where(vkind == "patch", 0, -1)),
            "vision_key_row": (("sample", "vision_key"), np.tile(vr, (B, 1))),
            "vision_key_col": (("sample", "vision_key"), np.tile(vc, (B, 1))),
        },
        coords={
            "sample": np.arange(B),
            "layer": np.arange(L),
            "head": np.arange(H),
            "query": np.arange(R),
            "key": np.arange(N),
            "vision_layer": np.arange(2),
            "vision_head": np.arange(H),
        },
    )
    return ds


def _image_keys(ds, b):
    return np.flatnonzero(ds.key_kind.values[b] == "image")


def test_image_share_is_the_sum_over_image_keys():
    ds = _fake_capture()
    df = att.image_attention_share(ds)
    assert len(df) == 3 * 2 * (2 + 1)  # layers x heads x real rows (2 + 1)
    for r in df.itertuples():
        keys = _image_keys(ds, r.sample)
        want = sum(float(ds.lm_attn.values[r.sample, r.layer, r.head, r.query, k]) for k in keys)
        assert r.share == pytest.approx(want, abs=1e-12)
    m = att.share_by_layer_head(df)
    assert m.shape == (3, 2)
    assert m.loc[1, 0] == pytest.approx(df[(df.layer == 1) & (df["head"] == 0)].share.mean())


def test_image_token_scores_mean_over_heads_and_real_rows():
    ds = _fake_capture(seed=1)
    df = att.image_token_scores(ds)
    assert len(df) == 2 * 3 * GRID * GRID
    for r in df.sample(20, random_state=0).itertuples():
        vals = [
            np.mean([ds.lm_attn.values[r.sample, r.layer, h, q, r.position] for h in range(2)])
            for q in range(2)
            if not np.isnan(ds.query_position.values[r.sample, q])
            and r.position <= ds.query_position.values[r.sample, q]
        ]  # rows that can see the token
        assert r.score == pytest.approx(np.mean(vals), abs=1e-12)
        assert (r.row, r.col) == (ds.key_row.values[r.sample, r.position], ds.key_col.values[r.sample, r.position])
    sums = df.groupby(["sample", "layer"]).share.sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0)
    values = att.token_values(df, 1, 2, _image_keys(ds, 1), value="score")
    assert values.tolist() == df[(df["sample"] == 1) & (df.layer == 2)].sort_values("position").score.tolist()
    with pytest.raises(ValueError, match="no score for position"):
        att.token_values(df, 1, 2, [0])


def test_image_token_scores_average_only_rows_that_see_the_token():
    """queries='all' under a causal mask: row q sees keys 0..q. Uniform attention (1/(q+1) on each
    visible key) must give image token k the mean over rows q >= k of 1/(q+1) — the old mean over
    every row also counted the zeros of rows that cannot see k, inflating early tokens."""
    N, image = 8, np.arange(1, 5)
    attn = np.zeros((1, 1, 1, N, N))
    for q in range(N):
        attn[0, 0, 0, q, : q + 1] = 1.0 / (q + 1)
    kind = np.full((1, N), "text", dtype=object)
    kind[0, image] = "image"
    lab = np.full((1, N), -1)
    lab[0, image] = np.arange(len(image))
    ds = xr.Dataset(
        {
            "lm_attn": (("sample", "layer", "head", "query", "key"), attn),
            "query_position": (("sample", "query"), np.arange(N, dtype=float)[None]),
            "key_kind": (("sample", "key"), kind.astype(str)),
            "key_image": (("sample", "key"), np.where(lab >= 0, 0, -1)),
            "key_tile": (("sample", "key"), np.where(lab >= 0, 0, -1)),
            "key_row": (("sample", "key"), np.where(lab >= 0, 0, -1)),
            "key_col": (("sample", "key"), lab),
        },
        coords={"sample": [0], "layer": [0], "head": [0], "query": np.arange(N), "key": np.arange(N)},
    )
    df = att.image_token_scores(ds).sort_values("position")
    want = [np.mean([1.0 / (q + 1) for q in range(k, N)]) for k in image]
    np.testing.assert_allclose(df.score.to_numpy(), want, rtol=1e-12)
    old = [sum(1.0 / (q + 1) for q in range(k, N)) / N for k in image]  # zeros of blind rows counted
    assert not np.allclose(df.score.to_numpy(), old)
    # lift over uniform: every row is uniform over what it sees, so every token's lift is exactly 1
    np.testing.assert_allclose(df.lift.to_numpy(), 1.0, rtol=1e-12)


def test_vision_scores_skip_cls_and_average_heads():
    ds = _fake_capture(seed=2)
    df = att.vision_token_scores(ds)
    assert len(df) == 2 * 2 * GRID * GRID and (df.vpos > 0).all()
    r = df.iloc[5]
    s, lay, vpos = int(r["sample"]), int(r.vision_layer), int(r.vpos)
    assert r.score == pytest.approx(ds.vision_attn.values[s, lay, :, vpos].mean())


@pytest.mark.parametrize("metric", ["spearman", "top_k_iou"])
def test_layer_agreement_matches_reference(metric):
    ds = _fake_capture(seed=3)
    scores = att.image_token_scores(ds)
    table = att.layer_agreement(scores, metric, k=3)
    assert set(table.columns) == {"sample", "layer_a", "layer_b", "metric", "value"}
    for r in table.itertuples():
        a = scores[(scores["sample"] == r.sample) & (scores.layer == r.layer_a)].sort_values("position").score.tolist()
        b = scores[(scores["sample"] == r.sample) & (scores.layer == r.layer_b)].sort_values("position").score.tolist()
        if metric == "spearman":
            want = ref_spearman(a, b)
        else:
            ta, tb = ref_topk(a, 3), ref_topk(b, 3)
            want = len(ta & tb) / len(ta | tb)
        assert r.value == pytest.approx(want, abs=1e-12)
    mat = att.agreement_matrix(table)
    assert mat.shape == (3, 3) and np.allclose(np.diag(mat), 1.0)
    with pytest.raises(ValueError, match="metric='pearson'"):
        att.layer_agreement(scores, "pearson")


def test_position_bias_is_mean_share_per_patch():
    ds = _fake_capture(seed=4)
    scores = att.image_token_scores(ds)
    bias = att.position_bias(scores)
    r = bias[(bias.layer == 1) & (bias.row == 2) & (bias.col == 0)].iloc[0]
    want = scores[(scores.layer == 1) & (scores.row == 2) & (scores.col == 0)].share.mean()
    assert r.mean_share == pytest.approx(want) and r.n == 2


def test_ground_truth_agreement_against_reference_and_perfect_scores():
    ds = _fake_capture(seed=5)
    scores = att.image_token_scores(ds)
    rng = np.random.default_rng(0)
    masks = [rng.random((GRID, GRID)) < 0.4 for _ in range(2)]
    masks[0][0, 0] = masks[1][1, 1] = True
    masks[0][2, 2] = masks[1][0, 0] = False
    gt = att.ground_truth_agreement(scores, masks, ["color", "count"])
    assert list(gt.family.unique()) == ["color", "count"]
    for r in gt.itertuples():
        sub = scores[(scores["sample"] == r.sample) & (scores.layer == r.layer)]
        truth = masks[r.sample][sub.row, sub.col]
        assert r.auroc == pytest.approx(ref_auroc(sub.score.tolist(), truth.tolist()), abs=1e-12)
        sc = sub.score.to_numpy()
        assert r.pointing == pytest.approx(float(truth[sc == sc.max()].mean()))
    # scores equal to the mask: perfect separation
    perfect = scores.copy()
    perfect["score"] = [
        float(masks[s][r, c]) + 1e-3 * i for i, (s, r, c) in enumerate(zip(perfect["sample"], perfect.row, perfect.col))
    ]
    assert (att.ground_truth_agreement(perfect, masks).auroc == 1.0).all()
    # a mask finer than the token grid is refused (never read at its top-left corner)
    with pytest.raises(ValueError, match="does not match"):
        att.ground_truth_agreement(scores, [np.kron(m, np.ones((2, 2), bool)) for m in masks])


def test_tables_from_captures_renumbers_samples():
    a, b = _fake_capture(seed=6), _fake_capture(seed=7)
    t = att.tables_from_captures([(0, a), (2, b)])
    assert sorted(t["image_scores"]["sample"].unique()) == [0, 1, 2, 3]
    assert set(t) == {"share", "image_scores", "vision_scores"}
    assert att.spread_layers(range(10), 4) == [0, 3, 6, 9]


def test_rows_that_cannot_see_the_image_are_named():
    ds = _fake_capture(seed=8)
    share = att.image_attention_share(ds)
    att.check_image_visible(share)  # random attention reaches the image
    blind = share.assign(share=0.0)
    with pytest.raises(ValueError, match="give no attention to image tokens"):
        att.check_image_visible(blind)
