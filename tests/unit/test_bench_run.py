"""benchmarks/run.py bookkeeping (no measuring): README tables between markers, per-shape JSONs merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run():
    return load_benchmark("run")


def test_render_replaces_only_between_markers(run):
    text = (
        "intro\n<!-- bench:capture -->\nold table\n<!-- /bench:capture -->\nafter\n"
        "<!-- bench:reduce -->\nkeep\n<!-- /bench:reduce -->\n"
    )
    new = run.render(text, {"capture": "| new |"}, "DIR")
    assert "old table" not in new and "| new |" in new and "keep" in new
    assert new.startswith("intro\n<!-- bench:capture -->\n") and "after\n" in new
    assert run.render(new, {"capture": "| new |"}, "DIR") == new  # idempotent


def test_merge_and_tables_from_partial_runs(run, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"device": "X", "shapes": [{"shape": "s1"}]}))
    b.write_text(json.dumps({"device": "X", "shapes": [{"shape": "s2"}]}))
    merged = run._merge([a, tmp_path / "missing.json", b])
    assert [s["shape"] for s in merged["shapes"]] == ["s1", "s2"]
    assert run._merge([tmp_path / "missing.json"]) is None
    (tmp_path / "organism.json").write_text(
        json.dumps(
            {
                "batch": 8,
                "seq_len": 268,
                "threads": 2,
                "repeats": 3,
                "warmup": 1,
                "median_s": 0.25,
                "min_s": 0.2,
                "max_s": 0.3,
                "target_s": 0.5,
                "cpu": "x86_64",
                "load_average": [1.0, 1.0, 1.0],
            }
        )
    )
    found = run.tables(tmp_path)
    assert set(found) == {"organism"} and "0.250 s" in found["organism"]


def test_bad_arguments_are_refused(run, capsys):
    with pytest.raises(SystemExit):
        run.main(["--out", "x", "--smoke", "--only", "capture,nope"])
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--smoke"])
