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
