"""Bookkeeping of the session-8 benchmark tools: capture's timeline (parts of a call) and the CUDA-call timer."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_scripts import load_benchmark


def test_parts_of_a_call_add_up_to_the_call():
    tl = load_benchmark("timeline_capture")
    stamps = {"forward": [1.0, 4.0], "build": [4.5, 5.5], "wait": [5.0, 5.25]}
    parts = tl.parts_of(stamps, 0.5, 6.0)
    assert parts == {"setup": 0.5, "forward": 3.0, "after": 0.5, "build": 0.5, "wait": 0.25, "rest": 0.75}
    assert sum(parts.values()) == pytest.approx(6.0 - 0.5)
    plain = tl.parts_of({"forward": [1.0, 4.0]}, 0.5, 4.25)  # a plain forward: no builder
    assert plain == {"setup": 0.5, "forward": 3.0, "rest": 0.25}
    no_wait = tl.parts_of({"forward": [1.0, 2.0], "build": [2.5, 3.0]}, 0.0, 3.5)  # on CPU the builder never waits
    assert no_wait["wait"] == 0.0 and sum(no_wait.values()) == pytest.approx(3.5)


def test_stamps_keep_first_entry_and_last_exit_and_restore_what_they_wrap():
    tl = load_benchmark("timeline_capture")

    class Owner:
        @staticmethod
        def f(x):
            if x < 0:
                raise ValueError(x)
            return x

    original = Owner.__dict__["f"]
    stamps = tl.Stamps()
    stamps.wrap(Owner, "f", "f")
    assert Owner.f(1) == 1 and Owner.f(2) == 2
    first = list(stamps.t["f"])
    with pytest.raises(ValueError):
        Owner.f(-1)  # stamped also when it raises
    assert stamps.t["f"][0] == first[0] and stamps.t["f"][1] >= first[1]
    stamps.restore()
    assert Owner.__dict__["f"] is original


def test_timeline_runs_on_a_tiny_model_and_leaves_nothing_patched(tmp_path):
    from vtrlab.probes import attention, engine, grouped

    tl = load_benchmark("timeline_capture")
    before = (engine._build, grouped.LayerGroup.add, attention._hold, engine.FLUSH_AT_LAST_LAYER)
    out = tmp_path / "t.json"
    assert tl.main(["--tiny", "--rounds", "2", "--warmup", "1", "--effects", "--out", str(out)]) == 0
    assert (engine._build, grouped.LayerGroup.add, attention._hold, engine.FLUSH_AT_LAST_LAYER) == before
    report = json.loads(out.read_text())
    res = report["results"]
    assert {"sdpa", "capture_last", "capture_question", "capture_last_vision", "held", "switched"} <= set(res)
    for name, r in res.items():
        assert len(r["calls"]) == 2
        for call in r["calls"]:
            parts = sum(v for k, v in call.items() if k not in ("total", "gc", "gc_collections", *tl.ALLOCATOR_COUNTS))
            assert parts == pytest.approx(call["total"], rel=1e-6, abs=1e-9), name
        if name.startswith("capture"):
            assert {"after", "build", "wait"} <= set(r["calls"][0])
        else:
            assert "build" not in r["calls"][0]


def test_floor_phases_and_compare_on_a_tiny_model(tmp_path):
    """Session 10's cases: the floor (its rows checked against capture's before timing), the forward's phases
    (they add up to the forward), capture through another importable copy of vtrlab (here vtrlab itself), and
    the collector's work inside each timed call; the model's configs and the floor's state are put back."""
    import gc

    from vtrlab import testing

    tl = load_benchmark("timeline_capture")
    out = tmp_path / "t.json"
    threshold = gc.get_threshold()
    gc.set_threshold(5)  # (collections inside every timed call, to see them counted)
    try:
        args = ["--tiny", "--rounds", "2", "--warmup", "1", "--floor", "--phases", "--compare", "vtrlab"]
        assert tl.main([*args, "--out", str(out)]) == 0
    finally:
        gc.set_threshold(*threshold)
    res = json.loads(out.read_text())["results"]
    assert {"floor_passthrough", "floor_last", "floor_last_vision", "vtrlab:capture_last_vision"} <= set(res)
    for name, r in res.items():
        for call in r["calls"]:
            phases = sum(call[k] for k in tl.PHASES)
            assert phases == pytest.approx(call["forward"], rel=1e-6, abs=1e-9), name
            assert 0 <= call["gc"] <= call["total"]
        if name != "sdpa":
            assert {f"{k}_added_ms" for k in tl.PHASES} <= set(r)
    assert res["capture_last_vision"]["gc_collections_per_call"] > 0
    assert tl._FloorState.held is None
    vlm = testing.tiny("llava")  # the cached tiny model the run used
    cfg = vlm.model.config
    assert {cfg._attn_implementation, cfg.text_config._attn_implementation} == {"sdpa"}


def test_the_floor_refuses_rows_that_are_not_captures(monkeypatch):
    """The floor measures capture's device work only if its rows are capture's: a floor computing other rows
    is refused before any timing."""
    tl = load_benchmark("timeline_capture")
    from vtrlab import testing

    vlm = testing.tiny("llava")
    import numpy as np

    batch = vlm.prepare([np.zeros((40, 40, 3), np.uint8)], ["What color is the car?"])
    real = tl._floor_sdpa

    def other_keys(module, query, key, *args, **kwargs):  # holds another key than the one attended to
        out = real(module, query, key.flip(-2).contiguous(), *args, **kwargs)
        return out

    monkeypatch.setattr(tl, "_floor_sdpa", other_keys)
    with pytest.raises(RuntimeError, match="differ from capture's"):
        tl.floor_cases(vlm, batch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_calls_needs_a_gpu_and_says_so(capsys):
    cc = load_benchmark("cuda_calls")
    with pytest.raises(SystemExit):
        cc.main(["--out", "/dev/null"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
