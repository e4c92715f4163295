"""Findings (notebook 05): the verdict rules on synthetic numbers (both outcomes), each claim's statistic against
a hand computation, the bootstrap, the table and the README markers. No model runs here: a fake model and a
cache filled with synthetic per-sample computations stand in for the forwards."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vtrlab.analysis import findings as F
from vtrlab.metrics import controls

N = 40
L = 8


def fake_vlm(has_cls=True, n_layers=L):
    image = np.arange(5, 21)
    layout = SimpleNamespace(image_positions=image, question_positions=np.arange(22, 26))
    return SimpleNamespace(
        lm_layers=[None] * n_layers,
        vision_layers=[None] * 3,
        has_cls=has_cls,
        prepare=lambda images, prompts: SimpleNamespace(layouts=[layout] * len(images)),
    )


def fake_samples(n=N, families=("color",)):
    return [
        SimpleNamespace(seed=0, index=i, family=families[i % len(families)], question=f"q{i}", answer="a", image=None)
        for i in range(n)
    ]


def cache_with(vlm, samples, **entries):
    cache = F.FindingsCache().bind(vlm, samples)
    for k, v in entries.items():
        cache.get(k.replace("__", "/"), lambda v=v: v)
    return cache


def capture_rows(rng, share_shallow, share_deep, n=N, tokens=16, lm=None, norm_scale=1.0):
    rows = []
    for i in range(n):
        share = np.r_[np.full(2, share_shallow), np.full(L - 2, share_deep)] + rng.normal(0, 0.01, L)
        rows.append(
            {
                "lm": rng.random((L, tokens)) if lm is None else lm(rng),
                "image_share": share,
                "first": np.full(L, 0.01),
                "n_visible": 30,
                "n_image": tokens,
                "relevant": np.arange(tokens) < 3,
                "cls": rng.random((3, tokens)),
                "norm": 1 + norm_scale * rng.random((3, tokens)),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ verdict rule
@pytest.mark.parametrize(
    "low, high, thr, direction, expected",
    [
        (0.6, 0.9, 0.5, ">", "replicated"),
        (0.1, 0.4, 0.5, ">", "refuted"),
        (0.1, 0.5, 0.5, ">", "refuted"),  # touching the threshold is not above it
        (0.4, 0.6, 0.5, ">", "inconclusive"),
        (0.1, 0.4, 0.5, "<", "replicated"),
        (0.6, 0.9, 0.5, "<", "refuted"),
        (0.5, 0.9, 0.5, "<", "refuted"),
        (0.4, 0.6, 0.5, "<", "inconclusive"),
        (np.nan, 0.9, 0.5, ">", "inconclusive"),
    ],
)
def test_verdict_rule(low, high, thr, direction, expected):
    assert F.verdict_of(low, high, thr, direction) == expected


def test_verdict_rule_refuses_bad_input():
    with pytest.raises(ValueError, match="direction="):
        F.verdict_of(0.1, 0.2, 0.0, ">=")
    with pytest.raises(ValueError, match="low > high"):
        F.verdict_of(0.3, 0.2, 0.0, ">")
    with pytest.raises(ValueError, match="verdicts"):
        F.combine(["replicated", "maybe"])


def test_combine():
    assert F.combine(["replicated", "replicated"]) == "replicated"
    assert F.combine(["replicated", "inconclusive"]) == "inconclusive"
    assert F.combine(["replicated", "refuted", "inconclusive"]) == "refuted"
    assert F.combine(["refuted", "not applicable here"]) == "not applicable here"


def test_boot_equals_bootstrap_ci_and_drops_rare_undefined_resamples():
    x = np.random.default_rng(3).normal(size=25)
    assert F.boot(lambda i: x[i].mean(), x.size, 500, 7) == pytest.approx(controls.bootstrap_ci(x, 500, seed=7))
    # a statistic undefined in every resample holding index 0 twice or more: far more than 5% -> NaN interval
    v, lo, hi = F.boot(lambda i: np.nan if (i == 0).sum() > 1 else 1.0, 10, 200)
    assert v == 1.0 and np.isnan(lo) and np.isnan(hi)
    # undefined only when every index is 0 (never in practice): the interval comes from the rest
    v, lo, hi = F.boot(lambda i: np.nan if (i == 0).all() else x[i].mean(), x.size, 200)
    assert np.isfinite(lo) and lo <= v <= hi


# ------------------------------------------------------------------------------------------------ claims
def test_fastv_statistic_and_both_verdicts():
    vlm, samples, rng = fake_vlm(), fake_samples(), np.random.default_rng(0)
    collapse = capture_rows(rng, 0.8, 0.1)
    rec = F.fastv(vlm, samples, cache=cache_with(vlm, samples, capture=collapse), n_boot=200)
    share = np.stack([r["image_share"] for r in collapse])
    assert rec["value"] == pytest.approx(share[:, 2:].mean() / share[:, :2].mean())  # hand computation
    assert rec["verdict"] == "replicated"
    steady = capture_rows(rng, 0.8, 0.85)
    assert F.fastv(vlm, samples, cache=cache_with(vlm, samples, capture=steady), n_boot=200)["verdict"] == "refuted"
    assert F.fastv(fake_vlm(n_layers=2), samples)["verdict"] == "not applicable here"


def test_gsearch_statistic_and_both_verdicts():
    vlm, samples, rng = fake_vlm(), fake_samples(), np.random.default_rng(1)

    def agreeing(rng):  # layers >= 1 share one ranking (plus noise); layer 0 is unrelated
        base = rng.random(16)
        m = base + rng.normal(0, 0.05, (L, 16))
        m[0] = rng.random(16)
        return m

    rows = capture_rows(rng, 0.5, 0.5, lm=agreeing)
    rec = F.gsearch(vlm, samples, cache=cache_with(vlm, samples, capture=rows), n_boot=200)
    hand = np.mean(
        [
            np.mean([stats.spearmanr(r["lm"][a], r["lm"][b])[0] for a in range(1, L) for b in range(a + 1, L)])
            for r in rows
        ]
    )
    assert rec["value"] == pytest.approx(hand)
    assert rec["verdict"] == "replicated"
    rows = capture_rows(rng, 0.5, 0.5)  # independent random rankings per layer
    assert F.gsearch(vlm, samples, cache=cache_with(vlm, samples, capture=rows), n_boot=200)["verdict"] == "refuted"


def test_darcet_not_applicable_without_high_norm_tokens_and_lift_with_them():
    vlm, samples, rng = fake_vlm(), fake_samples(), np.random.default_rng(2)
    rows = capture_rows(rng, 0.5, 0.5)
    rec = F.darcet(vlm, samples, cache=cache_with(vlm, samples, capture=rows), n_boot=200)
    assert rec["verdict"] == "not applicable here" and "largest ratio" in rec["why"]
    for r in rows:  # token 0 is high-norm after layer 0 and takes most of [CLS]'s attention at layer 1
        r["norm"][0, 0] = 50.0
        r["cls"][1] = 0.01
        r["cls"][1, 0] = 1.0
    rec = F.darcet(vlm, samples, cache=cache_with(vlm, samples, capture=rows), n_boot=200)
    hand = np.mean([(r["cls"][1, 0] / r["cls"][1].sum()) / (1 / 16) for r in rows])
    assert rec["value"] == pytest.approx(hand) and rec["verdict"] == "replicated"
    for r in rows:  # the high-norm token gets less than its share
        r["cls"][1] = 1.0
        r["cls"][1, 0] = 0.01
    assert F.darcet(vlm, samples, cache=cache_with(vlm, samples, capture=rows), n_boot=200)["verdict"] == "refuted"
    assert F.darcet(fake_vlm(has_cls=False), samples)["verdict"] == "not applicable here"


def test_kaduri_ratio_by_hand_and_both_verdicts():
    vlm, samples = fake_vlm(), fake_samples()
    acc = np.zeros((N, 3))
    acc[:, 0] = 1  # plain always right
    acc[:36, 1] = 1  # image->last cut: 90% right
    acc[:4, 2] = 1  # blind: 10% right
    rec = F.kaduri(vlm, samples, cache=cache_with(vlm, samples, kaduri=acc), n_boot=200)
    assert rec["value"] == pytest.approx((0.9 - 0.1) / (1.0 - 0.1))
    assert rec["verdict"] == "replicated"
    acc[:, 1] = acc[:, 2]  # the cut answer is the blind one
    assert F.kaduri(vlm, samples, cache=cache_with(vlm, samples, kaduri=acc), n_boot=200)["verdict"] == "refuted"
    acc[:, 0] = acc[:, 2]  # the image does not matter at all
    assert F.kaduri(vlm, samples, cache=cache_with(vlm, samples, kaduri=acc))["verdict"] == "not applicable here"


def test_zhang_order_by_hand_and_both_verdicts():
    vlm, samples = fake_vlm(), fake_samples()
    mids = np.array([0.5, 2.5, 4.5, 6.5])
    eff = np.zeros((2, 4, N))
    eff[0, 0], eff[1, 2] = 0.6, 0.5  # image->question in layers 0-1, question->last in layers 4-5
    eff[0, 1] = 0.2
    rec = F.zhang(vlm, samples, cache=cache_with(vlm, samples, knockout_sweep__2=(eff, mids)), n_boot=200)
    hand = 4.5 - (0.6 * 0.5 + 0.2 * 2.5) / 0.8
    assert rec["value"] == pytest.approx(hand) and rec["verdict"] == "replicated"
    rev = eff[::-1].copy()
    assert (
        F.zhang(vlm, samples, cache=cache_with(vlm, samples, knockout_sweep__2=(rev, mids)), n_boot=200)["verdict"]
        == "refuted"
    )


def test_neo_parts_by_hand():
    vlm, samples = fake_vlm(), fake_samples()
    full, obj, rnd = np.ones(N), np.zeros(N), np.ones(N)
    obj[:5] = 1
    hit = np.zeros((N, L))
    hit[:, 5:] = 1
    au = np.full(N, 0.9)
    cache = cache_with(
        vlm,
        samples,
        answers__full=full,
        answers__drop_relevant=obj,
        **{"answers__drop_matched_random__0": rnd, "logit_lens__5": (hit, au)},
    )
    rec = F.neo(vlm, samples, cache=cache, n_boot=200)
    assert [p["value"] for p in rec["parts"]] == pytest.approx([1 - 5 / N, 1.0, 0.9])
    assert rec["verdict"] == "replicated"
    cache = cache_with(
        vlm,
        samples,
        answers__full=full,
        answers__drop_relevant=rnd,
        **{"answers__drop_matched_random__0": rnd, "logit_lens__5": (hit * 0, au * 0 + 0.3)},
    )
    assert F.neo(vlm, samples, cache=cache, n_boot=200)["verdict"] == "refuted"


def sweep_cache(vlm, samples, acc: dict, kept: dict | None = None, budgets=(0.3, 0.5)):
    """A reduction sweep of per-method accuracy vectors acc[(method, seed, budget)] -> (n,) 0/1 (full: budget 1)."""
    rows, toks = [], []
    for (m, seed, b), v in acc.items():
        for i, c in enumerate(v):
            rows.append(
                {"sample": i, "family": samples[i].family, "method": m, "seed": seed, "budget": b, "correct": bool(c)}
            )
            if m != "full" and kept is not None:
                k = kept[(m, seed, b)][i]
                toks.append(
                    pd.DataFrame(
                        {
                            "sample": i,
                            "family": samples[i].family,
                            "method": m,
                            "seed": seed,
                            "budget": b,
                            "token": np.arange(k.size),
                            "kept": k,
                        }
                    )
                )
    have = {(m, b) for (m, _, b) in acc if m != "full"}
    entry = {
        "answers": [pd.DataFrame(rows)],
        "tokens": [pd.concat(toks, ignore_index=True) if toks else pd.DataFrame(columns=["method", "budget"])],
        "have": have,
    }
    return cache_with(vlm, samples, sweep=entry)


def test_wen_share_below_random_by_hand_and_both_verdicts():
    vlm = fake_vlm()
    fams = ("color", "reading")
    samples = fake_samples(families=fams)
    is_read = np.array([s.family == "reading" for s in samples])
    ones = np.ones(N)
    acc = {("full", -1, 1.0): ones, ("random", 0, 0.5): ones * 0.0 + ~is_read, ("random", 1, 0.5): ones * 0 + ~is_read}
    for k, m in enumerate(("a", "b", "c")):  # a, b below random on every sample group; c above
        acc[(m, -1, 0.5)] = np.where(is_read, 0, 1 if m == "c" else np.arange(N) % 4 == 0)
    cache = sweep_cache(vlm, samples, acc)
    rec = F.wen(vlm, samples, cache=cache, methods=["random", "a", "b", "c"], budgets=[0.5], n_boot=200)
    a = rec["parts"][0]
    assert a["value"] == pytest.approx(2 / 3) and a["verdict"] == "replicated"
    drop_read = 1.0 - 0.0  # every method and random fail on reading
    drop_color = 1 - np.mean([acc[(m, -1, 0.5)][~is_read].mean() for m in "abc"] + [1.0])
    assert rec["parts"][1]["value"] == pytest.approx(drop_read - drop_color)
    assert rec["verdict"] == "replicated"
    acc[("a", -1, 0.5)] = acc[("b", -1, 0.5)] = acc[("c", -1, 0.5)] = ones.copy()
    rec = F.wen(
        vlm, samples, cache=sweep_cache(vlm, samples, acc), methods=["random", "a", "b", "c"], budgets=[0.5], n_boot=200
    )
    assert rec["parts"][0]["value"] == 0.0 and rec["verdict"] == "refuted"


def test_when_less_both_parts_and_verdicts():
    vlm = fake_vlm()
    samples = fake_samples(families=("color", "reading"))
    is_read = np.array([s.family == "reading" for s in samples])
    ones = np.ones(N)
    acc = {("full", -1, 1.0): ones}
    for b in (0.3, 0.5):
        acc[("selector", -1, b)] = ones.copy()
        acc[("random", 0, b)] = np.where(is_read, 0.0, 1.0)
        acc[("random", 1, b)] = np.where(is_read, 0.0, 1.0)
    rec = F.when_less(
        vlm,
        samples,
        cache=sweep_cache(vlm, samples, acc),
        methods=["random", "selector"],
        budgets=[0.3, 0.5],
        n_boot=200,
    )
    assert [p["value"] for p in rec["parts"]] == pytest.approx([1.0, 0.0])
    assert rec["verdict"] == "replicated"
    for s in (0, 1):
        acc[("random", s, 0.3)] = np.where(is_read, 0.0, (np.arange(N) // 2) % 2)  # scenes at 30%: half wrong
    rec = F.when_less(
        vlm,
        samples,
        cache=sweep_cache(vlm, samples, acc),
        methods=["random", "selector"],
        budgets=[0.3, 0.5],
        n_boot=200,
    )
    assert rec["parts"][1]["value"] == pytest.approx(0.5) and rec["verdict"] == "refuted"
    with pytest.raises(ValueError, match="<= 0.5"):
        F.when_less(vlm, samples, reading_budgets=[0.7])


def test_haurum_spearman_by_hand():
    vlm = fake_vlm()
    samples = fake_samples()
    rng = np.random.default_rng(5)
    T = 20
    best = np.zeros((N, T), bool)
    best[:, :6] = True
    acc, kept = {("full", -1, 1.0): np.ones(N)}, {}
    for k, m in enumerate(("m0", "m1", "m2", "m3", "m4")):  # m_k shares 6 - k tokens with the best
        kp = np.zeros((N, T), bool)
        kp[:, k : k + 6] = True
        kept[(m, -1, 0.5)] = kp
        acc[(m, -1, 0.5)] = (rng.random(N) < 0.9 - 0.15 * k).astype(float)
    kept[("m0", -1, 0.5)] = best
    acc[("m0", -1, 0.5)] = np.ones(N)
    rec = F.haurum(
        vlm,
        samples,
        cache=sweep_cache(vlm, samples, acc, kept, budgets=(0.5,)),
        methods=["m0", "m1", "m2", "m3", "m4"],
        budgets=[0.5],
        n_boot=200,
    )
    jac = [(6 - k) / (6 + k) for k in range(1, 5)]
    hand = stats.spearmanr(jac, [acc[(f"m{k}", -1, 0.5)].mean() for k in range(1, 5)])[0]
    assert rec["value"] == pytest.approx(hand)
    pts = rec["data"]["points"]["0.5"]
    assert pts["best"] == "m0" and pts["jaccard"] == pytest.approx(jac)


def test_cache_refuses_another_model_or_samples():
    vlm, samples = fake_vlm(), fake_samples()
    cache = F.FindingsCache().bind(vlm, samples)
    with pytest.raises(ValueError, match="another model or other samples"):
        cache.bind(vlm, samples[:-1])
    with pytest.raises(ValueError, match="another model or other samples"):
        cache.bind(fake_vlm(), samples)


def test_run_all_refuses_unknown_claims():
    with pytest.raises(ValueError, match="not known; accepted"):
        F.run_all(fake_vlm(), fake_samples(), claims=["fastv", "nope"])


# ------------------------------------------------------------------------------------------------ table, README
def records():
    vlm, samples, rng = fake_vlm(), fake_samples(), np.random.default_rng(0)
    cache = cache_with(vlm, samples, capture=capture_rows(rng, 0.8, 0.1))
    return [F.fastv(vlm, samples, cache=cache, n_boot=100), F.darcet(vlm, samples, cache=cache, n_boot=100)]


def test_records_are_json_and_table_states_their_numbers():
    recs = records()
    json.dumps(recs, allow_nan=False)
    for r in recs:
        assert set(r) >= {"claim", "source", "measure", "value", "ci", "n", "verdict", "why"}
        assert r["verdict"] in F.VERDICTS
    table = F.markdown_table(recs)
    assert table.count("\n") == 2 + len(recs)
    assert f"{recs[0]['value']:.3f} [{recs[0]['ci'][0]:.3f}, {recs[0]['ci'][1]:.3f}]" in table
    assert "**not applicable here**" in table


def test_render_between_markers_and_load(tmp_path):
    text = f"intro\n{F.START}\nold table\n{F.END}\noutro\n"
    out = F.render_between_markers(text, "| new |\n", header="head")
    assert out == f"intro\n{F.START}\nhead\n\n| new |\n{F.END}\noutro\n"
    assert F.render_between_markers(out, "| new |\n", header="head") == out  # idempotent
    with pytest.raises(ValueError, match="exactly one"):
        F.render_between_markers("no markers", "x")
    with pytest.raises(ValueError, match="exactly one"):
        F.render_between_markers(f"{F.END}{F.START}", "x")
    path = tmp_path / "findings.json"
    path.write_text(json.dumps({"records": records(), "provenance": {"model": "organism"}}))
    assert F.load_findings(tmp_path)["records"][0]["claim"] == "fastv"
    path.write_text(json.dumps({"records": [{"claim": "x", "verdict": "probably"}]}))
    with pytest.raises(ValueError, match="verdict 'probably'"):
        F.load_findings(path)
    with pytest.raises(FileNotFoundError, match="no findings.json"):
        F.load_findings(tmp_path / "nowhere")


def test_cli_renders_readme_from_the_run_behind_the_figures(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vtrlab.cli import app

    root = tmp_path / "proj"
    run = root / "runs" / "05_findings" / "abc"
    run.mkdir(parents=True)
    (root / "figures" / "05_findings").mkdir(parents=True)
    (root / "figures" / "05_findings" / "fastv.png").write_bytes(b"png")
    (root / "figures" / "MANIFEST.json").write_text(
        json.dumps({"figures/05_findings/fastv.png": {"run_dir": "runs/05_findings/abc"}})
    )
    recs = records()
    (run / "findings.json").write_text(json.dumps({"records": recs, "provenance": {"model": "organism"}}))
    (run / "run.json").write_text(json.dumps({"git_commit": "0123456789abcdef", "git_dirty": True, "hash": "abc"}))
    (root / "README.md").write_text(f"# x\n{F.START}\n{F.END}\nend\n")
    monkeypatch.setenv("VTRLAB_ROOT", str(root))
    out = CliRunner().invoke(app, ["findings", "--check"])
    assert out.exit_code == 1 and "differs" in out.output
    out = CliRunner().invoke(app, ["findings"])
    assert out.exit_code == 0, out.output
    text = (root / "README.md").read_text()
    assert F.markdown_table(recs) in text and "model `organism`" in text and text.endswith(f"{F.END}\nend\n")
    assert "commit 0123456789 (with uncommitted changes)" in text  # the runner's record of the run
    copy = json.loads((root / "figures" / "05_findings" / "findings.json").read_text())
    assert copy["records"] == recs and copy["provenance"]["git_commit"] == "0123456789abcdef"
    out = CliRunner().invoke(app, ["findings", "--check"])
    assert out.exit_code == 0 and "up to date" in out.output
    (root / "README.md").write_text("no markers\n")
    out = CliRunner().invoke(app, ["findings"])
    assert out.exit_code == 2 and "exactly one" in out.output
