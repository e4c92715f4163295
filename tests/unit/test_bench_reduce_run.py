"""benchmarks/run.py's parallel shapes (one GPU and one slice of cores each) and benchmarks/reduce.py's table
(no measuring: dummy children and a synthetic report)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from benchmark_scripts import load_benchmark as _load


@pytest.fixture(scope="module")
def run():
    return _load("run")


def test_core_slices_are_disjoint_and_equal(run):
    assert run.core_slices(2, list(range(7))) == [[0, 1, 2], [3, 4, 5]]
    assert run.core_slices(1, [4, 5]) == [[4, 5]]
    with pytest.raises(ValueError, match="cannot split 1 cores into 2 slices"):
        run.core_slices(2, [0])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="2 cores")
def test_parallel_children_get_their_own_gpu_and_cores(run, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code = (
        "import json, os, sys; e = os.environ; json.dump({'gpu': e['CUDA_VISIBLE_DEVICES'], "
        "'omp': e['OMP_NUM_THREADS'], 'cores': sorted(os.sched_getaffinity(0))}, open(sys.argv[1], 'w'))"
    )
    jobs = [(f"s{j}", [sys.executable, "-c", code, str(tmp_path / f"s{j}.json")]) for j in range(2)]
    jobs.append(("slow", [sys.executable, "-c", "import time; time.sleep(30)"]))
    with pytest.raises(ValueError, match="3 jobs for 2 GPUs"):
        run._run_children_parallel(jobs, 5, tmp_path, 2)
    done = run._run_children_parallel(jobs[:2], 20, tmp_path, 2)
    assert {k: v[0] for k, v in done.items()} == {"s0": "ok", "s1": "ok"}
    got = [json.loads((tmp_path / f"s{j}.json").read_text()) for j in range(2)]
    assert [g["gpu"] for g in got] == ["0", "1"]
    assert not set(got[0]["cores"]) & set(got[1]["cores"])
    assert all(int(g["omp"]) == len(g["cores"]) for g in got)
    assert "----- s1 (parallel) -----" in (tmp_path / "run.log").read_text()
    done = run._run_children_parallel([jobs[2]], 0.5, tmp_path, 2)
    assert done["slow"][0].startswith("timed out")


def test_reduce_children_are_told_their_box(run):
    assert run._child_budget("reduce", 400) == ["--time-budget", "385"]
    assert run._child_budget("capture", 400) == []


def test_reduce_table_rows(tmp_path):
    red = _load("reduce")
    cell = {
        "method": "visionzip",
        "budget": 0.25,
        "ttft": {"median_s": 0.04, "peak_extra_bytes": 2**30},
        "ttft_speedup": 1.0,
        "prefill": {"median_s": 0.02},
        "prefill_speedup": 1.5,
        "scoring": {"median_s": 0.0021},
        "signals": {"median_s": -0.0004},
        "scoring_what": "selection",
        "scoring_vs_forward": 0.0526,
        "decode_s_per_token": 0.02,
    }
    row = {
        "shape": "s",
        "n_image_tokens": 576,
        "n_tokens": 600,
        "vision_s": 0.01,
        "results": {
            "visionzip@0.250": cell,
            "hired@0.111": {"not_applicable": "no anyres", "method": "hired", "budget": 0.111},
            "tome@0.111": {"skipped": "time budget spent", "method": "tome", "budget": 0.111},
        },
    }
    rep = {"device": "X", "torch": "t", "transformers": "tr", "repeats": 7, "warmup": 2, "new_tokens": 3}
    text = red.markdown({**rep, "shapes": [row]})
    assert "| s | visionzip | 144 | 0.0400 | 1.00 | 0.0200 | 1.50 | 2.1 | -0.4 | 0.053 | 20.00 | 1.000 |" in text
    assert "| s | hired | — | — | — | — | — | — | — | — | — | — | n/a: no anyres |" in text
    assert "skipped: time budget spent" in text and "not applicable: hired" in text
    assert red.summarise(row)["measured"] == 1
