"""FitPrune (inference and calibration) against float64 references written from its definition.

Oracle: HF eager ``output_attentions`` of an eager copy of each tiny model. On the 2-layer tiny LMs
the only prunable layer is 0 (a count at the last layer changes nothing), whose attention does not
depend on any earlier pruning, so the references need no masking: inference deletes the d lowest
``Σ_text maxₕA[t, j] · Σ_image maxₕA[i, j] / |I|``; calibration (threshold rule, FLOPs stop, bisection
on alpha) is re-derived here line by line from ``statistical_analysis.py``.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import vtrlab as vl
from vtrlab.reduce.methods import fitprune as FP
from vtrlab.testing import tiny, tiny_families

FAMILIES = tiny_families()


def _images(seed):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)),
    ]


def _eager_layer0(family, batch):
    """(B, L, L) float64 layer-0 attention maxed over heads, eager, the model's own positions."""
    vlm_e = tiny(family, seed=0, attn_implementation="eager")
    dec = vlm_e.adapter.decoder_inputs(vlm_e.model, batch.inputs)
    pos = dec["position_ids"]
    if pos.dim() == 2:
        pos = (batch.inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = vlm_e.model(**dict(batch.inputs), position_ids=pos, output_attentions=True, use_cache=False)
    return out.attentions[0].double().amax(1).numpy()


def _cross_self(att, batch, i):
    lay = batch.layouts[i]
    img = lay.image_positions
    real = np.flatnonzero(batch.inputs["attention_mask"][i].numpy())
    txt = real[real > img.max()]
    cross = att[i][np.ix_(txt, img)].sum(0)
    self_ = att[i][np.ix_(img, img)].sum(0) / len(img)
    return cross, self_, len(txt)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    vlm = tiny(request.param, seed=0)
    batch = vlm.prepare(_images(0), ["what is in the picture ?", "color ?"])
    return vlm, batch


def test_fitprune_inference_matches_eager(setup):
    vlm, batch = setup
    n_min = min(lay.n_image_tokens for lay in batch.layouts)
    d = max(1, n_min // 2)
    keep = [lay.n_image_tokens - d for lay in batch.layouts]
    ds = vl.reduce.apply(vlm, batch, "fitprune", keep=min(keep), scheme=(d, 0))
    assert ds.attrs["positions"] == "kept" and list(ds.stage_layer.values) == [1]
    att = _eager_layer0(vlm.family, batch)
    for i, lay in enumerate(batch.layouts):
        n = lay.n_image_tokens
        cross, self_, _ = _cross_self(att, batch, i)
        score = cross * self_
        n_keep = min(keep)
        ref = np.zeros(n, bool)
        ref[np.argsort(-score, kind="stable")[:n_keep]] = True
        np.testing.assert_allclose(ds.score.values[i, 0, :n], score, rtol=2e-4, atol=1e-7)
        np.testing.assert_array_equal(ds.kept.values[i, 0, :n], ref)
        assert int(ds.budget[i]) == n_keep


def test_scheme_scaling_and_native_budget():
    s = FP.PUBLISHED[60]
    assert len(s) == 32 and FP.native_keep(s, 576) == 576 - sum(s)
    assert FP.scale_scheme(s, sum(s)) == list(s)  # the recipe's own counts at its native budget
    scaled = FP.scale_scheme([3, 1, 0, 4], 16)
    assert sum(scaled) == 16 and scaled[2] == 0 and scaled == [6, 2, 0, 8]
    with pytest.raises(ValueError, match="deletes no token"):
        FP.scale_scheme([0, 0], 3)


def test_fitprune_errors(setup):
    vlm, batch = setup
    with pytest.raises(ValueError, match="published recipes are for 32-layer"):
        vl.reduce.apply(vlm, batch, "fitprune", keep=0.5)
    with pytest.raises(ValueError, match="no published recipe"):
        vl.reduce.apply(vlm, batch, "fitprune", keep=0.5, reduction_ratio=65)
    with pytest.raises(ValueError, match="need 2, one per LM layer"):
        vl.reduce.apply(vlm, batch, "fitprune", keep=0.5, scheme=(1, 2, 3))
    with pytest.raises(ValueError, match="accepted: a float in"):
        FP.calibrate(vlm, batch, reduction_ratio=60)


def _ref_bottom(values, total, alpha):
    order = np.argsort(values, kind="stable")
    s = values.sum()
    for i in range(len(order)):
        if s - values[order[:i]].sum() < total - total * alpha:
            return set(order[: max(i - 1, 0)].tolist())
    return set(order[: len(order) - 1].tolist())


def _ref_calibrate(vlm, batch, ratio):
    """statistical_analysis.py for a 2-layer LM: only layer 0 prunes; its attention is the unpruned one."""
    att = _eager_layer0(vlm.family, batch)
    cfg = vlm.model.config.get_text_config()
    D, F, N = cfg.hidden_size, cfg.intermediate_size, 2
    layer = lambda t: (t * D * D * 3 + t * t * D + t * D * t + t * D * D) + D * F * t * 3  # noqa: E731
    V = [lay.n_image_tokens for lay in batch.layouts]
    origin = np.mean([layer(v) * N for v in V])
    stats = []
    for i in range(len(batch)):
        cross, self_, nt = _cross_self(att, batch, i)
        stats.append((cross / nt, self_))

    def fit(alpha):
        used, scheme, left = 0.0, [0, 0], list(V)
        for li in range(N):
            forecast = 0.0
            for t in left:
                used += t * D**2 * 3 + t**2 * D * 2
                forecast += t * D**2 + 3 * F * D * t + layer(t) * (N - 1 - li)
            if (used + forecast) / len(V) <= origin * (1 - ratio):
                return True, [x // len(V) for x in scheme]
            for s, (focus, self_) in enumerate(stats):
                if li == 0:
                    both = _ref_bottom(focus, focus.sum(), alpha) & _ref_bottom(self_, self_.sum(), alpha)
                    scheme[0] += len(both)
                    left[s] -= len(both)
                used += left[s] * D**2 + 3 * F * D * left[s]
        return False, [x // len(V) for x in scheme]

    lo, hi = 0.0, 1.0
    while hi - lo > 0.01 + 1e-6:
        mid = (lo + hi) / 2
        reached, scheme = fit(mid)
        hi, lo = (mid, lo) if reached else (hi, mid)
    return tuple(scheme), mid, reached


@pytest.mark.parametrize("family", ["llava", "gemma3"])
@pytest.mark.parametrize("ratio", [0.2, 0.45])
def test_calibrate_matches_reference(family, ratio):
    vlm = tiny(family, seed=0)
    batch = vlm.prepare(_images(1), ["what is in the picture ?", "color ?"])
    scheme, info = FP.calibrate(vlm, batch, ratio, return_info=True)
    ref, alpha, reached = _ref_calibrate(vlm, batch, ratio)
    assert scheme == ref
    assert info["alpha"] == pytest.approx(alpha) and info["reached"] == reached
    assert len(info["trace"]) == 7  # bisection of [0, 1] to 0.01


ORG_LAYERS = (1, 3, 5)  # stage layers K = l + 1 for FitPrune layers l = 0, 2, 4


def _masked_eager(vlm, eager, red, blocked_per_stage):
    """Eager forward of the full sequence where, from ORG_LAYERS[j] on, blocked_per_stage[j] (cumulative
    per sample) are hidden as keys from every query (positions unchanged: FitPrune keeps them)."""
    layers = vlm.adapter.lm_layers(eager)
    real = red.attention_mask.bool()
    handles = []

    def make(j):
        def hook(_m, args, kwargs):
            B, L = args[0].shape[:2]
            blocked = torch.zeros(B, L, dtype=torch.bool)
            for i, cols in enumerate(blocked_per_stage[j]):
                blocked[i, cols] = True
            allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & (real & ~blocked)[:, None, None, :]
            allowed = allowed | torch.eye(L, dtype=torch.bool)[None, None]
            mask = torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
            return args, dict(kwargs, attention_mask=mask)

        return hook

    n = len(blocked_per_stage)
    for j in range(n):
        end = ORG_LAYERS[j + 1] if j + 1 < n else len(layers)
        for li in range(ORG_LAYERS[j], end):
            handles.append(layers[li].register_forward_pre_hook(make(j), with_kwargs=True))
    try:
        with torch.no_grad():
            return eager(
                inputs_embeds=red.inputs_embeds,
                attention_mask=red.attention_mask,
                position_ids=red.position_ids,
                use_cache=False,
                output_attentions=True,
            )
    finally:
        for h in handles:
            h.remove()


def test_fitprune_multistage_on_organism_matches_eager():
    import copy

    from vtrlab.data.synthetic import make_sample
    from vtrlab.reduce import logits
    from vtrlab.reduce.keep import reduced_decoder_inputs

    vlm = vl.load("organism")
    samples = [make_sample(0, i, fam) for i, fam in enumerate(["color", "count"])]
    batch = vlm.prepare([s.image for s in samples], [s.question for s in samples])
    eager = copy.deepcopy(vlm.model)
    eager.set_attn_implementation("eager")
    n_layers = len(vlm.lm_layers)
    scheme = [0] * n_layers
    scheme[0], scheme[2], scheme[4] = 3, 1, 2
    n_img = [lay.n_image_tokens for lay in batch.layouts]
    assert len(set(n_img)) == 1
    keep = FP.native_keep(scheme, n_img[0])  # the recipe's own counts: 3, 1, 2 deleted
    ds = vl.reduce.apply(vlm, batch, "fitprune", keep=keep, scheme=tuple(scheme))
    assert list(ds.stage_layer.values) == list(ORG_LAYERS)
    red = reduced_decoder_inputs(vlm, batch, None)
    src = red.source_positions.numpy()
    alive = [np.ones(n, bool) for n in n_img]
    blocked: list[list[np.ndarray]] = []
    for j, (k, d) in enumerate(zip(ORG_LAYERS, (3, 1, 2))):
        att = _masked_eager(vlm, eager, red, blocked).attentions[k - 1].double().amax(1).numpy()
        stage_blocked = []
        for i, lay in enumerate(batch.layouts):
            cols = np.searchsorted(src[i], lay.image_positions)
            real = np.flatnonzero(red.attention_mask[i].numpy())
            txt = real[real > cols.max()]
            a = np.flatnonzero(alive[i])
            cross = att[i][np.ix_(txt, cols[a])].sum(0)
            self_ = att[i][np.ix_(cols[a], cols[a])].sum(0) / len(a)
            score = cross * self_
            np.testing.assert_allclose(ds.score.values[i, j, a], score, rtol=2e-4, atol=1e-9)
            new_alive = np.zeros(n_img[i], bool)
            new_alive[a[np.argsort(-score, kind="stable")[: len(a) - d]]] = True
            np.testing.assert_array_equal(ds.kept.values[i, j, : n_img[i]], new_alive)
            alive[i] = new_alive
            stage_blocked.append(cols[~new_alive])
        blocked.append(stage_blocked)
    ref = _masked_eager(vlm, eager, red, blocked).logits.float()
    got = logits(vlm, batch, keep=keep, method="fitprune", scheme=tuple(scheme))
    assert torch.equal(got.last.argmax(-1), ref[:, -1].argmax(-1))
    torch.testing.assert_close(got.last.float(), ref[:, -1], rtol=1e-4, atol=1e-4)
