"""The lmms-eval model plugin, end to end through the lmms-eval CLI, offline.

`make test` installs the `lmms` extra and sets VTRLAB_REQUIRE_LMMS=1: there a missing lmms-eval
is a failure, not a skip (CI proves the plugin works).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

if os.environ.get("VTRLAB_REQUIRE_LMMS") != "1":
    pytest.importorskip("lmms_eval", reason="lmms-eval not installed (pip install vtrlab[lmms])")

import vtrlab as vl  # noqa: E402
from vtrlab.data.answers import answer_accuracy  # noqa: E402
from vtrlab.data.sources import load_data  # noqa: E402
from vtrlab.integrations.lmms_eval_task import EvaluationFailed, export_task, read_results  # noqa: E402

N_SAMPLES, SEED, BATCH = 20, 0, 8
TASK = "vtrlab_organism"
# keep-all, a projector-stage baseline and an LM-stage method (FastV prunes inside the LM from layer 2)
RUNS = {
    "all": ("", {}),
    "random": ("method=random,keep=0.25,seed=1", {"method": "random", "keep": 0.25, "seed": 1}),
    "fastv": ("method=fastv,keep=0.25,layer=2", {"method": "fastv", "keep": 0.25, "layer": 2}),
}
FAILING = "method=no_such_method,keep=0.25"


def _offline_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home),
               HF_DATASETS_CACHE=str(home / "datasets"), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # nothing may be reached
        env[proxy] = "http://127.0.0.1:9"
    env["NO_PROXY"] = env["no_proxy"] = ""
    return env


@pytest.fixture(scope="module")
def lmms_run(tmp_path_factory):
    """One lmms-eval CLI process evaluating the three runs and a failing one (a --config list)."""
    root = tmp_path_factory.mktemp("lmms")
    task_dir = root / "task"
    export_task(task_dir, "organism", n_samples=N_SAMPLES, seed=SEED)
    configs = []
    for name, (args, _) in list(RUNS.items()) + [("failing", (FAILING, {}))]:
        configs.append({"model": "vtrlab", "model_args": ",".join(a for a in ("pretrained=organism,device=cpu", args)
                                                                     if a),
                        "tasks": TASK, "include_path": str(task_dir), "batch_size": str(BATCH),
                        "output_path": str(root / "out" / name), "log_samples": True})
    config = root / "runs.yaml"
    config.write_text(yaml.safe_dump(configs))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "eval", "--config", str(config)],
                          cwd=root, env=_offline_env(root / "hf"), capture_output=True, text=True, timeout=900)
    return {"root": root, "proc": proc, "started": started, "log": proc.stdout + proc.stderr}


def _reference(method_kw: dict) -> list[str]:
    """What vl.answer gives on the same samples, in the same batches."""
    vlm = _vlm()
    data = load_data("organism", n_samples=N_SAMPLES, seed=SEED)
    params = dict(method_kw)
    method, keep = params.pop("method", None), params.pop("keep", None)
    answers = []
    for _, records in data.batches(BATCH):
        batch = vlm.prepare(images=[r.image for r in records], prompts=[r.question for r in records])
        answers += vl.answer(vlm, batch, method=method, keep=keep, **params)
    return answers


_VLM = {}


def _vlm():
    if "organism" not in _VLM:
        _VLM["organism"] = vl.load("organism", device="cpu")
    return _VLM["organism"]


def _logged_answers(out: Path) -> dict[int, str]:
    (path,) = out.rglob(f"*_samples_{TASK}.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["doc_id"]): r["filtered_resps"][0] if isinstance(r["filtered_resps"], list) else r["filtered_resps"]
            for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_lmms_eval_accuracy_equals_vl_answer(lmms_run, run):
    out = lmms_run["root"] / "out" / run
    try:
        got = read_results(out, TASK, since=lmms_run["started"])
    except EvaluationFailed:
        pytest.fail(f"lmms-eval run {run!r} failed:\n{lmms_run['log'][-6000:]}")
    want = _reference(RUNS[run][1])
    data = load_data("organism", n_samples=N_SAMPLES, seed=SEED)
    accuracy = float(np.mean([answer_accuracy(a, r.answers) for a, r in zip(want, data)]))
    assert got[TASK]["n_samples"] == N_SAMPLES
    assert got[TASK]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    logged = _logged_answers(out)
    assert [logged[i] for i in range(N_SAMPLES)] == want  # answer by answer, not only the mean


@pytest.mark.slow
def test_budgets_change_the_answers(lmms_run):
    """The method really reaches the model: keep-all, random and FastV answers are not all the same."""
    answers = {run: _logged_answers(lmms_run["root"] / "out" / run) for run in RUNS}
    assert answers["all"] != answers["random"] or answers["all"] != answers["fastv"]


@pytest.mark.slow
def test_failing_evaluation_is_detected(lmms_run):
    # lmms-eval 0.7.3 exits 0 when an evaluation fails: the failure is read from results.json
    assert lmms_run["proc"].returncode == 0, lmms_run["log"][-3000:]
    with pytest.raises(EvaluationFailed, match="no \\*_results.json"):
        read_results(lmms_run["root"] / "out" / "failing", TASK, since=lmms_run["started"])
    assert "unknown reduction method 'no_such_method'; accepted:" in lmms_run["log"]  # vtrlab's own message
