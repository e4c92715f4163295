"""benchmarks/grid_7b.py bookkeeping (no notebook runs): --skip parsing, merging calls, the rendered header."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def grid():
    return load_benchmark("grid_7b")


def test_skip_by_name_or_number_and_bad_items_named(grid):
    models = grid.GPU_MODELS
    got = grid.parse_skip("llava-next-7b:03, llava-1.5-7b:04_reduction_methods", models)
    assert got == {
        ("full_size:llava-next-7b", "03_reconstruction_selector"),
        ("full_size:llava-1.5-7b", "04_reduction_methods"),
    }
    assert grid.parse_skip("", models) == set()
    with pytest.raises(ValueError, match=r"llava-9b:01.*accepted: MODEL:NOTEBOOK"):
        grid.parse_skip("llava-9b:01", models)
    with pytest.raises(ValueError, match=r"llava-next-7b:07"):
        grid.parse_skip("llava-next-7b:07", models)


def _run(phase, model, nb, n, status="ok", seconds=10.0):
    return {
        "phase": phase,
        "model": model,
        "notebook": nb,
        "status": status,
        "seconds": seconds,
        "n_samples": n,
        "samples_per_s": round(n / seconds, 3),
        "peak_gpu_allocated_gib": 20.0 + n,
        "peak_cpu_rss_gib": 3.0,
        "slowest_cells": [[5, 1.0]],
        "error": None,
        "parameters": {"n_samples": n, "batch_size": 2},
    }


def _report(commit, wall, runs, not_run=()):
    env = {"gpu": "H200", "torch": "2.11", "transformers": "5.17", "commit": commit}
    return {
        "environment": env,
        "workers": 2,
        "budget_s": 400.0,
        "runs": runs,
        "not_run": list(not_run),
        "grid_wall_s": wall,
        "grid_peak_gpu_memory_gib": 100.0,
    }


def test_merged_calls_name_each_commit_and_wall_time(grid):
    m = "full_size:llava-next-7b"
    first = _report(
        "aaaaaaaaaaaa1111",
        None,  # an older file without a wall time
        [_run("grid", m, "01_attention_per_layer", 8)],
        not_run=[f"{m} 04_reduction_methods", f"{m} 01_attention_per_layer n_samples=2"],
    )
    second = _report(
        "bbbbbbbbbbbb2222",
        123.4,
        [
            _run("grid", m, "04_reduction_methods", 1),
            _run("memory", m, "01_attention_per_layer", 2),
            _run("memory", m, "01_attention_per_layer", 8),
        ],
    )
    merged = grid.merge([first, second])
    assert merged["not_run"] == []  # both were run by the second call (the memory run by its n_samples)
    text = grid.markdown(merged)
    assert "commits aaaaaaaaaaaa, bbbbbbbbbbbb" in text
    assert "not recorded + 123.4 s (2 device calls)" in text and "None" not in text
    rows = [line for line in text.splitlines() if line.startswith(f"| {m} |")]
    assert len(rows) == 2 and rows[0].endswith(" aaaaaaaaaaaa |") and rows[1].endswith(" bbbbbbbbbbbb |")
    assert "Peak memory at 8 samples / at 2: " in text
    single = grid.markdown(grid.merge([second]))
    assert "commit bbbbbbbbbbbb;" in single and "123.4 s (budget 400.0 s)" in single
