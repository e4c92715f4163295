"""Notebook 01 on real data: ground truth from a photo's boxes; a sample without ground truth is not scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vtrlab.data.photos import photos_manifest
from vtrlab.runner.params import read_parameters
from vtrlab.runner.run import prepare_job, run_job

REPO = Path(__file__).resolve().parents[2]
NB01 = REPO / "notebooks" / "01_attention_per_layer.ipynb"
SMOKE = {"n_samples": 2, "batch_size": 2, "n_examples": 1, "n_layers_shown": 2, "layers": "0,1", "device": "cpu"}


def _run(tmp_path, **params):
    spec = read_parameters(NB01)
    result = run_job(prepare_job(NB01, {**SMOKE, **params}, spec=spec), tmp_path)
    assert result.status == "ok", result.line()
    run = Path(result.run_dir).resolve()  # absolute, or relative to the cwd
    return run, json.loads((run / "metrics.json").read_text())


@pytest.mark.notebooks
@pytest.mark.xdist_group("notebooks")
def test_notebook01_on_real_pictures_scores_only_samples_with_ground_truth(tmp_path):
    """One photo with boxes, one picture without ground truth: only the first is scored (one run,
    to keep the suite fast; a run on data without any ground truth prints the one-line skip)."""
    rows = [json.loads(line) for line in photos_manifest().read_text().splitlines()[:1]]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    rows.append({"id": "noise", "image": str(tmp_path / "noise.png"), "question": "What is shown?"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, metrics = _run(tmp_path / "root", data=str(tmp_path / "m.jsonl"),
                        prompt_template="{question} Answer with a single word.")
    assert metrics["data"]["kind"] == "jsonl" and metrics["data"]["n_samples"] == 2
    assert metrics["data"]["prompt_template"] == "{question} Answer with a single word."
    gt = pd.read_csv(run / "tables" / "lm_attention_vs_relevance.csv")
    assert set(gt["sample"]) == {0} and set(gt["layer"]) == {0, 1}
    assert gt["auroc"].between(0, 1).all()
    assert any(k.startswith("lm_best_auroc/") for k in metrics)
