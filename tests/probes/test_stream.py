"""capture_batches / capture_dataset: streamed batches == capture per batch, the next forward launched before the
last batch is built, bounded memory, a file."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from vtrlab import testing
from vtrlab.models.labels import token_coordinates
from vtrlab.probes import capture, load
from vtrlab.probes import stream as S

PROMPTS = ["What is it?", "What color is the car on the left?", "Count.", "Is there a red square here?", "Why?"]


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return testing.tiny("llava")


def _samples(n=5):
    rng = np.random.default_rng(0)
    return [
        (Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), PROMPTS[i % len(PROMPTS)])
        for i in range(n)
    ]


@pytest.mark.parametrize("queries", ["last", "question"])
def test_streamed_equals_capture_per_batch(vlm, queries, tmp_path):
    samples = _samples()
    out = tmp_path / "cap.nc"
    ds = S.capture_dataset(vlm, samples, batch_size=2, queries=queries, vision=True, out=out, progress=False)
    assert ds.sizes["sample"] == len(samples) and ds.sample_index.values.tolist() == list(range(len(samples)))
    seq_lens = set()
    for start in range(0, len(samples), 2):
        chunk = samples[start : start + 2]
        batch = vlm.prepare([c[0] for c in chunk], [c[1] for c in chunk])
        seq_lens.add(int(batch.inputs["input_ids"].shape[1]))
        ref = capture(vlm, batch, queries=queries, vision=True)
        tok = token_coordinates(batch.layouts)
        for b in range(len(chunk)):
            s = start + b
            pos = tok["position"][1][b]
            pos = pos[pos >= 0]
            n_rows = int(np.isfinite(ref.query_position.values[b]).sum())
            want = ref.lm_attn.values[b][..., :n_rows, :][..., pos]
            got = ds.lm_attn.values[s][..., :n_rows, : len(pos)]
            np.testing.assert_array_equal(got, want)
            assert np.isnan(ds.lm_attn.values[s][..., n_rows:, :]).all()
            assert np.isnan(ds.lm_attn.values[s][..., len(pos) :]).all()
            np.testing.assert_array_equal(ds.token_position.values[s, : len(pos)], pos)
            assert (ds.token_position.values[s, len(pos) :] == -1).all()
            for lab in ("image", "row", "col"):
                np.testing.assert_array_equal(ds[f"token_{lab}"].values[s, : len(pos)], tok[lab][1][b, : len(pos)])
            np.testing.assert_array_equal(ds.query_position.values[s, :n_rows], ref.query_position.values[b, :n_rows])
            v = ref.vision_attn.values[b]
            np.testing.assert_array_equal(ds.vision_attn.values[s][..., : v.shape[-1]], v)
    assert len(seq_lens) > 1  # the batches really had different sequence lengths
    back = load(out)
    np.testing.assert_array_equal(back.lm_attn.values, ds.lm_attn.values)
    np.testing.assert_array_equal(back.token_row.values, ds.token_row.values)


def test_keys_all_pads_to_the_longest_sequence(vlm):
    samples = _samples(3)
    ds = S.capture_dataset(vlm, samples, batch_size=1, keys="all", progress=False)
    for s, (img, prompt) in enumerate(samples):
        ref = capture(vlm, vlm.prepare([img], [prompt]))
        n = ref.sizes["key"]
        np.testing.assert_array_equal(ds.lm_attn.values[s][..., :n], ref.lm_attn.values[0])
        assert np.isnan(ds.lm_attn.values[s][..., n:]).all()
        assert (ds.key_kind.values[s, :n] == ref.key_kind.values[0]).all()
        assert (ds.key_kind.values[s, n:] == "pad").all()


def test_memory_is_bounded_nothing_kept_per_batch(vlm, monkeypatch):
    """At every forward at most one earlier batch's raw capture is still alive (being reduced)."""
    alive: list[weakref.ref] = []
    seen = []
    real = S.launch

    def spy(*args, **kwargs):
        gc.collect()
        seen.append(sum(r() is not None for r in alive))
        build = real(*args, **kwargs)

        def built():
            ds = build()
            alive.append(weakref.ref(ds))
            return ds

        return built

    monkeypatch.setattr(S, "launch", spy)
    out = S.capture_dataset(vlm, _samples(5) * 2, batch_size=1, progress=False)
    gc.collect()
    assert len(seen) == 10 and max(seen) <= 1, seen
    assert all(r() is None for r in alive)
    assert out.sizes["sample"] == 10


def test_samples_as_objects_and_bad_inputs(vlm):
    class Sample:
        def __init__(self, image, question):
            self.image, self.question = image, question

    samples = [Sample(*p) for p in _samples(2)]
    ds = S.capture_dataset(vlm, iter(samples), batch_size=4, progress=False)
    assert ds.sizes["sample"] == 2
    with pytest.raises(ValueError, match="batch_size=0"):
        S.capture_dataset(vlm, samples, batch_size=0)
    with pytest.raises(ValueError, match="keys='some'"):
        S.capture_dataset(vlm, samples, keys="some")
    with pytest.raises(ValueError, match="sample 0"):
        S.capture_dataset(vlm, [42], progress=False)
    with pytest.raises(ValueError, match="empty"):
        S.capture_dataset(vlm, [], progress=False)


def test_capture_batches_equals_capture_and_launches_ahead(vlm, monkeypatch):
    samples = _samples(5)
    events = []
    real = S.launch

    def spy(v, batch, **kwargs):
        n = len([e for e in events if e[0] == "launch"])
        events.append(("launch", n))
        build = real(v, batch, **kwargs)

        def built():
            events.append(("build", n))
            return build()

        return built

    monkeypatch.setattr(S, "launch", spy)
    got = list(S.capture_batches(vlm, iter(samples), batch_size=2, queries="question", progress=False))
    assert [start for start, _, _ in got] == [0, 2, 4]
    # batch i + 1's forward is launched before batch i's Dataset is built
    assert events == [("launch", 0), ("launch", 1), ("build", 0), ("launch", 2), ("build", 1), ("build", 2)]
    for start, batch, ds in got:
        chunk = samples[start : start + 2]
        want = capture(vlm, vlm.prepare([c[0] for c in chunk], [c[1] for c in chunk]), queries="question")
        assert len(batch) == len(chunk)
        assert ds.identical(want)
    with pytest.raises(ValueError, match="batch_size=0"):
        next(S.capture_batches(vlm, samples, batch_size=0))
