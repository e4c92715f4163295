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
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(home),
        HF_DATASETS_CACHE=str(home / "datasets"),
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # nothing may be reached
        env[proxy] = "http://127.0.0.1:9"
    env["NO_PROXY"] = env["no_proxy"] = ""
    return env


def _run_lmms_eval(root: Path) -> dict:
    """One lmms-eval CLI process evaluating the three runs and a failing one (a --config list)."""
    task_dir = root / "task"
    export_task(task_dir, "organism", n_samples=N_SAMPLES, seed=SEED)
    configs = []
    for name, (args, _) in list(RUNS.items()) + [("failing", (FAILING, {}))]:
        model_args = ",".join(a for a in ("pretrained=organism,device=cpu", args) if a)
        configs.append(
            {
                "model": "vtrlab",
                "model_args": model_args,
                "tasks": TASK,
                "include_path": str(task_dir),
                "batch_size": str(BATCH),
                "output_path": str(root / "out" / name),
                "log_samples": True,
            }
        )
    config = root / "runs.yaml"
    config.write_text(yaml.safe_dump(configs))
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "eval", "--config", str(config)],
        cwd=root,
        env=_offline_env(root / "hf"),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
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
    return {
        int(r["doc_id"]): r["filtered_resps"][0] if isinstance(r["filtered_resps"], list) else r["filtered_resps"]
        for r in rows
    }


@pytest.mark.slow
def test_lmms_eval_cli_end_to_end(tmp_path):
    """One test (one lmms-eval process, whatever the xdist scheduling): per run, the accuracy in
    results.json equals vl.answer's on the same samples and batches, answer by answer; the failing
    run exits 0 (lmms-eval) and is detected by read_results, with vtrlab's message in the log."""
    run = _run_lmms_eval(tmp_path)
    data = load_data("organism", n_samples=N_SAMPLES, seed=SEED)
    answers = {}
    for name, (_, method_kw) in RUNS.items():
        out = run["root"] / "out" / name
        try:
            got = read_results(out, TASK, since=run["started"])
        except EvaluationFailed:
            pytest.fail(f"lmms-eval run {name!r} failed:\n{run['log'][-6000:]}")
        want = _reference(method_kw)
        accuracy = float(np.mean([answer_accuracy(a, r.answers) for a, r in zip(want, data)]))
        assert got[TASK]["n_samples"] == N_SAMPLES, name
        assert got[TASK]["accuracy"] == pytest.approx(accuracy, abs=1e-12), name
        logged = _logged_answers(out)
        answers[name] = [logged[i] for i in range(N_SAMPLES)]
        assert answers[name] == want, name  # answer by answer, not only the mean
    # the method really reaches the model: keep-all, random and FastV answers are not all the same
    assert answers["all"] != answers["random"] or answers["all"] != answers["fastv"]

    # lmms-eval 0.7.3 exits 0 when an evaluation fails: the failure is read from results.json
    assert run["proc"].returncode == 0, run["log"][-3000:]
    with pytest.raises(EvaluationFailed, match="no \\*_results.json"):
        read_results(run["root"] / "out" / "failing", TASK, since=run["started"])
    assert "unknown reduction method 'no_such_method'; accepted:" in run["log"]  # vtrlab's own message


# -- the model class without the CLI (fast) -------------------------------------------------------------------
def _refuse_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(vl, "load", boom)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "no_such", "keep": 0.25}, "unknown reduction method 'no_such'; accepted: "),
        ({"method": "fastv", "keep": 0.25, "layr": 2}, "method 'fastv' has no parameter 'layr'; accepted: layer"),
        ({"method": "fastv", "keep": 0.25, "layer": "two"}, "parameter layer='two' has type str; expected int"),
        ({"method": "random"}, "method='random' needs a budget keep="),
        ({"keep": 0.25}, "keep=0.25 is a budget; give method="),
        ({"layer": 2}, "model_args \\['layer'\\] are not vtrlab model arguments"),
        ({"batch_size": "auto"}, "batch_size='auto'; accepted: an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens=0; accepted: an integer >= 1"),
    ],
)
def test_bad_model_args_fail_before_the_model_loads(monkeypatch, kwargs, message):
    from vtrlab.integrations.lmms_eval import VtrlabModel

    _refuse_load(monkeypatch)
    with pytest.raises((ValueError, TypeError), match=message):
        VtrlabModel(pretrained="organism", **kwargs)


def test_model_args_as_lmms_eval_parses_them(monkeypatch):
    """lmms-eval turns "-1" into -1.0 and "2" into 2: integer parameters get their int back."""
    from lmms_eval.utils import simple_parse_args_string

    from vtrlab.integrations.lmms_eval import VtrlabModel, _coerce_param

    args = simple_parse_args_string("pretrained=organism,method=fastv,keep=0.25,layer=-1")
    assert args["layer"] == -1.0 and _coerce_param(2, args["layer"]) == -1
    assert _coerce_param("mean", 3) == "3" and _coerce_param(0.5, 1) == 1 and _coerce_param(True, 1) == 1
    _refuse_load(monkeypatch)
    with pytest.raises(AssertionError, match="loaded before"):  # the arguments passed: it went on to load
        VtrlabModel(**args)


def test_budget_refused_by_the_preflight_with_vtrlabs_message():
    from vtrlab.integrations.lmms_eval import VtrlabModel

    with pytest.raises(ValueError, match="keep=1.5 as a ratio; accepted: a float in \\(0, 1\\]"):
        VtrlabModel(pretrained="organism", device="cpu", method="random", keep=1.5)


def test_requests_are_single_user_turns():
    from PIL import Image

    from vtrlab.integrations.lmms_eval import VtrlabModel, _messages_to_sample, _truncate

    pic = Image.new("RGB", (8, 8))
    msgs = [{"role": "user", "content": [{"type": "image", "url": pic}, {"type": "text", "text": "What color?"}]}]
    images, text = _messages_to_sample(msgs, 7)
    assert images == [pic] and text == "What color?"
    two_turns = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + msgs
    with pytest.raises(NotImplementedError, match="doc 7: messages with roles \\['system', 'user'\\]"):
        _messages_to_sample(two_turns, 7)
    video = [{"role": "user", "content": [{"type": "video", "url": "a.mp4"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(NotImplementedError, match="doc 3: video input"):
        _messages_to_sample(video, 3)
    assert _truncate("red\n\nmore", ["\n\n"]) == "red" and _truncate("red", None) == "red"
    model = object.__new__(VtrlabModel)
    with pytest.raises(NotImplementedError, match="generate_until only"):
        model.loglikelihood([])
    model.max_new_tokens = 16
    with pytest.raises(ValueError, match="vtrlab answers greedily"):
        model._generation({"temperature": 0.7})
    assert model._generation({"until": ["\n\n"]}) == {"max_new_tokens": 16}
