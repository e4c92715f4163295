"""Notebook 03's experiments on real records: ground truth from pixel boxes for a model whose grid is not
the organism's, samples without ground truth left out, any accepted answer counts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vtrlab.analysis import experiments_reconstruction as exp
from vtrlab.data.groundtruth import relevant_tokens
from vtrlab.data.manifest import Record
from vtrlab.recon.selector import Selector
from vtrlab.testing import tiny


class _OracleSelector:
    """Scores each image token by its ground truth (1 relevant, 0 not): the kept set is known in advance."""

    topk_mask = staticmethod(Selector.topk_mask)

    def __init__(self, records):
        self.records = {r.question: r for r in records}

    def token_scores(self, vlm, batch):
        out = []
        for lay, prompt in zip(batch.layouts, batch.prompts):
            rel = relevant_tokens(lay, self.records[prompt])
            out.append(np.zeros(lay.n_image_tokens) if rel is None else rel.astype(float))
        return out


@pytest.fixture(scope="module")
def setup():
    vlm = tiny("llava_next")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (90, 140, 3), dtype=np.uint8))
    records = [
        Record(
            id="a",
            image_source=img,
            question="what is in the box?",
            answers=("x", "two"),
            boxes=[[10, 10, 60, 50]],
            group="scene",
        ),
        Record(id="b", image_source=img, question="what is here?", answers=("y",), group="scene"),
    ]
    return vlm, records


def test_relevance_agreement_uses_pixel_boxes_and_skips_records_without_ground_truth(setup):
    vlm, records = setup
    agree = exp.relevance_agreement(vlm, _OracleSelector(records), records, budgets=[1.0], batch_size=2)
    assert set(agree["sample"]) == {0}  # record b has no ground truth
    auroc = agree[agree["metric"] == "auroc"]["value"]
    assert auroc.tolist() == [1.0]  # the oracle ranks every box token first
    recall = agree[(agree["metric"] == "recall") & (agree["method"] == "selector")]["value"]
    assert recall.tolist() == [1.0]


def test_context_diagnostic_leaves_out_records_without_ground_truth(setup):
    vlm, records = setup
    diag = exp.context_diagnostic(vlm, _OracleSelector(records), records, ratio=0.5, batch_size=2, max_new_tokens=1)
    assert len(diag) == 6  # one sample (a) x six plans
    rel = relevant_tokens(vlm.prepare([records[0].image], [records[0].question]).layouts[0], records[0])
    kept = diag.set_index("plan")["kept"]
    assert kept["relevant only"] == rel.sum()


def test_answers_accept_any_listed_answer_after_vqa_normalisation():
    rec = Record(id="a", image_source=np.zeros((4, 4, 3), np.uint8), question="q", answers=("x", "two"))
    assert exp._correct("The 2.", rec) and exp._correct("x", rec) and not exp._correct("y", rec)


# Notebooks 02 and 04's experiments on records (reduction sweep, flow): ground truth through the layout,
# accuracy against any accepted answer, samples without ground truth kept out of what needs it.


def test_reduction_sweep_reads_relevance_through_the_layout_and_accepts_any_answer(setup):
    from vtrlab.analysis.reduction_sweep import reduction_sweep
    from vtrlab.reduce import answer

    vlm, records = setup
    batch = vlm.prepare([r.image for r in records], [r.question for r in records])
    preds = answer(vlm, batch, max_new_tokens=6)  # the unreduced model's own answers
    recs = [
        Record(
            id=r.id,
            image_source=r.image_source,
            question=r.question,
            answers=("zzz-not-it", p),
            boxes=r.boxes,
            group=r.group,
        )
        for r, p in zip(records, preds)
    ]
    answers, tokens = reduction_sweep(vlm, recs, ["random"], [0.5], seeds=[0], batch_size=2, progress=False)
    full = answers[answers["method"] == "full"].sort_values("sample")
    assert full["correct"].tolist() == [True, True]  # the prediction is the second accepted answer
    assert full["answer"].tolist() == ["zzz-not-it"] * 2  # the first one is the gold answer (log-prob)
    for i, lay in enumerate(batch.layouts):
        t = tokens[tokens["sample"] == i].sort_values("token")
        truth = relevant_tokens(lay, recs[i])
        assert t["has_truth"].all() == (truth is not None)
        expected = np.zeros(lay.n_image_tokens, bool) if truth is None else truth
        assert np.array_equal(t["relevant"].to_numpy(bool), expected)
    assert tokens[tokens["sample"] == 0]["relevant"].any()  # the box reaches some tokens (not a vacuous check)


def test_reduction_sweep_oracle_needs_ground_truth_on_every_sample(setup):
    from vtrlab.analysis.reduction_sweep import reduction_sweep

    vlm, records = setup
    with pytest.raises(ValueError, match=r"'oracle' needs ground truth.*\[1\]"):
        reduction_sweep(vlm, records, ["oracle"], [0.5], batch_size=2, progress=False)
    no_answer = Record(id="c", image_source=records[0].image_source, question="q?")
    with pytest.raises(ValueError, match=r"samples \[0\] have no answer"):
        reduction_sweep(vlm, [no_answer], ["random"], [0.5], progress=False)


def test_run_flow_cuts_patch_edges_only_where_ground_truth_allows(setup):
    from vtrlab.analysis import flow as fl
    from vtrlab.analysis.flow_experiments import run_flow

    vlm, records = setup
    frames = run_flow(vlm, records, window=2, batch_size=2, signals=("attention",))
    sweep, tokens = frames["sweep"], frames["tokens"]
    patch = sweep[sweep["edge"].isin(["relevant→last", "irrelevant→last"])]
    assert set(patch["sample"]) == {0} and set(sweep[sweep["edge"] == "image→last"]["sample"]) == {0, 1}
    assert tokens.groupby("sample")["has_truth"].first().tolist() == [True, False]
    lay = vlm.prepare([records[0].image], [records[0].question]).layouts[0]
    t0 = tokens[(tokens["sample"] == 0) & (tokens["layer"] == 0)]
    assert np.array_equal(t0["relevant"].to_numpy(bool), relevant_tokens(lay, records[0]))
    per = fl.token_scores_vs_truth(tokens)
    assert set(per["sample"]) == {0} and per["objectness_auroc"].isna().all()  # no object map: controls NaN
    assert fl.headline(fl.sweep_summary(sweep, by_family=False), None)  # data without ground truth: sweeps only
