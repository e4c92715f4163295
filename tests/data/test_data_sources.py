"""load_data: every kind of source becomes the same Records; subsampling, identity, clear errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from vtrlab.data.manifest import read_manifest
from vtrlab.data.sources import export_organism, load_data


def _png(path, color, size=(40, 30)):
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def rows(tmp_path):
    (tmp_path / "img").mkdir()
    out = []
    for i in range(6):
        _png(tmp_path / "img" / f"{i}.png", (40 * i, 10, 10))
        out.append(
            {
                "id": f"s{i}",
                "image": f"img/{i}.png",
                "question": f"what is {i}?",
                "answers": [str(i), f"number {i}"],
                "boxes": [[1, 2, 10 + i, 20]],
                "group": "ab"[i % 2],
            }
        )
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _same(a, b):
    assert [r.id for r in a] == [r.id for r in b]
    for x, y in zip(a, b):
        assert (x.question, x.answers, x.group) == (y.question, y.answers, y.group)
        assert np.array_equal(x.boxes, y.boxes)
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))


def test_jsonl_json_and_parquet_give_the_same_records(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = load_data(_write_jsonl(tmp_path / "m.jsonl", rows))
    (tmp_path / "m.json").write_text(json.dumps({"data": rows}))
    b = load_data(tmp_path / "m.json")
    # parquet with encoded image bytes instead of paths
    tab = [dict(r, image=(tmp_path / r["image"]).read_bytes()) for r in rows]
    pq.write_table(pa.Table.from_pylist(tab), tmp_path / "m.parquet")
    c = load_data(tmp_path / "m.parquet")
    _same(a, b)
    _same(a, c)
    assert a.has_ground_truth and a.has_answers and a[2].answer == "2"
    assert a.identity["content_sha256"] == b.identity["content_sha256"] == c.identity["content_sha256"]
    assert a.identity["kind"] == "jsonl" and c.identity["kind"] == "parquet"


def test_subsample_is_reproducible_and_seeded(tmp_path, rows):
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    a, b = load_data(path, n_samples=3, seed=1), load_data(path, n_samples=3, seed=1)
    c = load_data(path, n_samples=3, seed=2)
    assert [r.id for r in a] == [r.id for r in b] and len(a) == 3
    assert [r.id for r in a] != [r.id for r in c]
    assert a.identity["content_sha256"] == b.identity["content_sha256"] != c.identity["content_sha256"]
    assert [r.id for r in load_data(path, n_samples=100)] == [f"s{i}" for i in range(6)]
    assert {r.group for r in load_data(path, family="b")} == {"b"}


def test_identity_changes_with_content(tmp_path, rows):
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    before = load_data(path).identity
    _png(tmp_path / "img" / "3.png", (1, 2, 3))
    after = load_data(path).identity
    assert before["source_sha256"] == after["source_sha256"]  # the manifest did not change...
    assert before["content_sha256"] != after["content_sha256"]  # ...a picture did


def test_column_mapping_vqa_answers_and_normalised_boxes(tmp_path):
    _png(tmp_path / "a.png", "red", size=(100, 50))
    row = {
        "picture": "a.png",
        "q": "colour?",
        "gt": [{"answer": "red"}, {"answer": "Red"}],
        "bbox": [0.1, 0.2, 0.5, 0.6],
        "seg": None,
    }
    d = load_data(
        _write_jsonl(tmp_path / "m.jsonl", [row]),
        image_column="picture",
        question_column="q",
        answer_column="gt",
        boxes_column="bbox",
        mask_column="seg",
        box_format="xyxy_norm",
    )
    r = d[0]
    assert r.answers == ("red", "Red") and r.question == "colour?"
    np.testing.assert_allclose(r.pixel_boxes(), [[10, 10, 50, 30]])


def test_masks_from_files(tmp_path):
    _png(tmp_path / "a.png", "red", size=(8, 6))
    m = np.zeros((6, 8), dtype=bool)
    m[1:3, 2:5] = True
    Image.fromarray(m).save(tmp_path / "a_mask.png")
    d = load_data(_write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "question": "q", "mask": "a_mask.png"}]))
    assert np.array_equal(d[0].pixel_mask, m.astype(float))


def test_image_folder_needs_a_question(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.jpg", "blue")
    with pytest.raises(ValueError, match="question="):
        load_data(tmp_path)
    d = load_data(tmp_path, question="what is it?", n_samples=2, seed=0)
    assert len(d) == 2 and all(r.question == "what is it?" for r in d) and not d.has_ground_truth


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (20, 10), (30 * i, 0, 0)) for i in range(5)]
    buf = []
    for im in imgs:
        b = io.BytesIO()
        im.save(b, format="PNG")
        buf.append({"bytes": b.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict(
        {
            "img": buf,
            "question": [f"q{i}" for i in range(5)],
            "answers": [[f"a{i}"] for i in range(5)],
            "boxes": [[[0, 0, 5, 5]]] * 5,
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.Sequence(datasets.Value("string")),
                "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            }
        ),
    )
    datasets.DatasetDict({"val": ds}).save_to_disk(str(tmp_path / "hf"))
    d = load_data(tmp_path / "hf", image_column="img", n_samples=3, seed=0)
    assert len(d) == 3 and d.identity["kind"] == "hf_dataset" and d.has_ground_truth
    for r in d:
        i = int(r.id)
        assert r.question == f"q{i}" and r.answers == (f"a{i}",)
        assert np.array_equal(np.asarray(r.image), np.asarray(imgs[i]))
    with pytest.raises(ValueError, match="split='test'"):
        load_data(tmp_path / "hf", image_column="img", split="test")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data="nope/missing.jsonl"), "does not exist"),
        (dict(data="organism", n_samples=0), "n_samples=0"),
        (dict(data="organism", n_samples=2.5), "n_samples=2.5"),
        (dict(data="organism", seed=-1), "seed=-1"),
        (dict(data="organism", box_format="yxyx"), "box_format='yxyx'"),
        (dict(data="photos", family="nonsense"), "family='nonsense'"),
        (dict(data=3), "data=3"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        load_data(**kwargs)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"question": "q"}', "'image' key"),
        ('{"image": "missing.png", "question": "q"}', "does not exist"),
        ('{"image": "a.png", "question": "q", "boxes": [1, 2, 3]}', "not a box"),
        ('{"image": "a.png", "question": "q", "boxes": [5, 5, 1, 1]}', None),
        ('{"image": "a.png", "question": "q", "answers": [true]}', "not a string"),
        ('{"image": "skimage:lena", "question": "q"}', "skimage:lena"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_manifest_lines_are_named(tmp_path, line, match):
    _png(tmp_path / "a.png", "red")
    (tmp_path / "m.jsonl").write_text(line + "\n")
    if match is None:  # a flipped box is refused when its pixels are asked for
        rec = read_manifest(tmp_path / "m.jsonl")[0]
        with pytest.raises(ValueError, match=r"x1 < x0"):
            rec.pixel_boxes()
        return
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        read_manifest(tmp_path / "m.jsonl")


def test_exported_organism_manifest_equals_organism_data(tmp_path):
    org = load_data("organism", n_samples=10, seed=4, family=["color", "count"])
    path = export_organism(tmp_path / "org", n_samples=10, seed=4, family=["color", "count"])
    exp = load_data(path)
    assert [r.id for r in exp] == [r.id for r in org]
    for a, b in zip(org, exp):
        assert (a.question, a.answers, a.group) == (b.question, b.answers, b.group)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(a.pixel_mask, b.pixel_mask)
        assert np.array_equal(a.meta["object_mask"], b.object_mask)  # the objectness controls' map travels too
    assert exp.has_ground_truth and org.has_ground_truth
    assert exp.identity["content_sha256"] == org.identity["content_sha256"]  # same pixels, masks and text


def test_photos_set_loads_with_boxes_inside_each_picture():
    d = load_data("photos")
    assert len(d) >= 20 and d.has_ground_truth and d.has_answers
    assert len({r.image_source for r in d}) >= 8
    for r in d:
        w, h = r.image_size()
        b = r.pixel_boxes()
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all(), r.id
        assert ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) > 0).all(), r.id


def test_with_prompt_wraps_questions_and_joins_the_identity():
    d = load_data("photos", n_samples=3)
    t = d.with_prompt("{question} Answer with a single word.")
    assert [r.question for r in t] == [r.question + " Answer with a single word." for r in d]
    assert t.identity["prompt_template"] == "{question} Answer with a single word."
    assert d.with_prompt("{question}") is d
    with pytest.raises(ValueError, match="exactly once"):
        d.with_prompt("Answer:")


def test_relative_paths_start_at_root(tmp_path, rows, monkeypatch):
    _write_jsonl(tmp_path / "m.jsonl", rows)
    monkeypatch.chdir("/")
    assert len(load_data("m.jsonl", root=tmp_path)) == 6
    with pytest.raises(FileNotFoundError, match="m.jsonl"):
        load_data("m.jsonl")


def test_per_group_draws_n_samples_of_each_group(tmp_path, rows):
    from vtrlab.data.synthetic import generate

    d = load_data(_write_jsonl(tmp_path / "m.jsonl", rows), n_samples=2, seed=0, per_group=True)
    assert [r.group for r in d].count("a") == 2 and [r.group for r in d].count("b") == 2
    org = load_data("organism", n_samples=2, seed=5, per_group=True, family=["count", "reading"])
    want = generate(2, 5, family="count") + generate(2, 5, family="reading")
    assert [r.question for r in org] == [s.question for s in want]
    assert [r.id for r in org.spread(3)] == [org[0].id, org[2].id, org[1].id]


def test_exported_per_group_manifest_equals_per_group_organism_data(tmp_path):
    """Notebooks 00, 03 and 04 draw n_samples of each family (per_group): a --per-group export, loaded the same way,
    gives those samples in the same order (same ids, pixels, masks, object masks, identity hash)."""
    org = load_data("organism", n_samples=3, seed=7, per_group=True, family=["count", "reading", "color"])
    path = export_organism(tmp_path / "org", n_samples=3, seed=7, family=["count", "reading", "color"], per_group=True)
    exp = load_data(path, n_samples=3, seed=7, per_group=True)
    assert [r.id for r in exp] == [r.id for r in org] and [r.group for r in org] == ["count"] * 3 + ["reading"] * 3 + [
        "color"
    ] * 3
    for a, b in zip(org, exp):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(a.pixel_mask, b.pixel_mask) and np.array_equal(a.meta["object_mask"], b.object_mask)
    assert exp.identity["content_sha256"] == org.identity["content_sha256"]
    with pytest.raises(TypeError, match=r"per_group='yes'; accepted: True or False"):
        export_organism(tmp_path / "bad", n_samples=1, per_group="yes")
