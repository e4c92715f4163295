"""Bookkeeping of the session-7 benchmark tools: the rounds protocol, the ablation's steps, py-spy summaries."""

from __future__ import annotations

import gc
import math
import time

import pytest
import torch
from benchmark_scripts import load_benchmark


def test_rounds_grow_to_the_minimum_seconds_within_the_bounds():
    cap = load_benchmark("capture")
    assert cap.rounds_for(0.2, 15, min_seconds=20) == 100  # a short forward: more rounds
    assert cap.rounds_for(3.0, 15, min_seconds=20) == 15  # a long one: the minimum count
    assert cap.rounds_for(0.01, 15, min_seconds=20, max_rounds=200) == 200
    assert cap.rounds_for(0.3, 15, min_seconds=0) == 15 and cap.rounds_for(0.0, 7, min_seconds=20) == 7
    assert cap.rounds_for(0.3, 15, min_seconds=20) == math.ceil(20 / 0.3)


def test_measure_interleaved_runs_the_rounds_the_time_asks_for():
    cap = load_benchmark("capture")
    calls = {"sdpa": 0, "probe": 0}

    def case(name):
        def fn():
            calls[name] += 1
            time.sleep(0.004)

        return fn

    cases = {k: case(k) for k in calls}
    res = cap.measure_interleaved(cases, torch.device("cpu"), warmup=1, rounds=3, min_seconds=0)
    assert len(res["sdpa"]["times_s"]) == 3 and calls == {"sdpa": 4, "probe": 4}
    # a round is two 4 ms calls and two collections of a frozen heap (~8-20 ms): 0.3 s of rounds asks for ~15-38 of
    # them (fewer on a loaded host), more than the 2 given
    res = cap.measure_interleaved(cases, torch.device("cpu"), warmup=0, rounds=2, min_seconds=0.3)
    n = len(res["sdpa"]["times_s"])
    assert 3 <= n <= 38 and len(res["probe"]["ratios"]) == n
    assert gc.get_freeze_count() == 0  # the heap is unfrozen again


def test_spy_summary_splits_cases_and_counts_per_call(tmp_path):
    spy = load_benchmark("spy_summary")
    raw = tmp_path / "spy.txt"
    loop = "spy_loop__{} (<string>:3)"
    raw.write_text(
        "\n".join(
            [
                f"main (ablate_capture.py:9);{loop.format('sdpa')};forward (m.py:1);linear (m.py:2) 30",
                f"main (ablate_capture.py:9);{loop.format('sdpa')};forward (m.py:1) 10",
                f"main (ablate_capture.py:9);{loop.format('capture_last')};capture (/x/vtrlab/probes/engine.py:5);"
                "forward (m.py:1);linear (m.py:2) 30",
                f"main (ablate_capture.py:9);{loop.format('capture_last')};capture (/x/vtrlab/probes/engine.py:7) 20",
                "import (<frozen>:1) 99",  # outside any loop: ignored
            ]
        )
        + "\n"
    )
    cases, incl, own, total = spy.parse(raw)
    assert cases == ["sdpa", "capture_last"]
    assert total == {"sdpa": 40, "capture_last": 50}
    assert incl["capture_last"]["capture (vtrlab/probes/engine.py)"] == 50  # lines merged, counted once a stack
    assert incl["sdpa"]["forward (m.py)"] == 40 and own["sdpa"]["linear (m.py)"] == 30
    lines = spy.table(cases, incl, total, rate=1000, calls=10, top=5, what="inclusive")
    assert lines[2] == "| **total** | 4.00 | 5.00 |"  # 40 samples at 1 kHz over 10 calls = 4 ms a call


def test_ablation_steps_are_cumulative_and_restore_the_flush():
    from vtrlab.probes import engine, grouped

    abl = load_benchmark("ablate_capture")
    flush, gather = grouped.LayerGroup.flush, engine._vision_gather
    with pytest.raises(RuntimeError):
        with abl._flushes_dropped():
            assert grouped.LayerGroup.flush is not flush
            raise RuntimeError("inside")
    assert grouped.LayerGroup.flush is flush and engine._vision_gather is gather
    before = grouped.GROUP_MAX_OUT_BYTES
    with abl._group_out_bytes(1234):
        assert grouped.GROUP_MAX_OUT_BYTES == 1234
    assert grouped.GROUP_MAX_OUT_BYTES == before
    assert abl.spy_loop("capture_last").__name__ == "spy_loop__capture_last"
