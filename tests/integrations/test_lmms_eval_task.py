"""`vtrlab export-task` and read_results: no lmms-eval needed (the task folder is plain files)."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from vtrlab.cli import app
from vtrlab.data.sources import load_data
from vtrlab.integrations import lmms_eval_task_utils as task_utils
from vtrlab.integrations.lmms_eval_task import EvaluationFailed, export_task, read_results


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def _read_yaml(path):
    return yaml.load(path.read_text(), Loader=_Loader)


def test_export_organism_task_holds_the_notebooks_samples(tmp_path):
    out = tmp_path / "task"
    path = export_task(out, "organism", n_samples=6, seed=3, prompt_template="{question} One word.")
    assert path == out / "vtrlab_organism.yaml"
    assert sorted(p.name for p in out.iterdir()) == [
        "utils.py",
        "vtrlab_organism.parquet",
        "vtrlab_organism.yaml",
        "vtrlab_task.json",
    ]
    cfg = _read_yaml(path)
    assert cfg["task"] == "vtrlab_organism" and cfg["output_type"] == "generate_until"
    assert cfg["dataset_path"] == "parquet"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(out / "vtrlab_organism.parquet")
    assert cfg["generation_kwargs"] == {"max_new_tokens": 16, "temperature": 0, "do_sample": False, "num_beams": 1}
    assert cfg["process_results"] == ("function", "utils.process_results")
    assert cfg["metric_list"] == [{"metric": "accuracy", "aggregation": "mean", "higher_is_better": True}]

    table = pq.read_table(out / "vtrlab_organism.parquet")
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    rows = table.to_pylist()
    want = load_data("organism", n_samples=6, seed=3)
    assert len(rows) == 6
    for row, rec in zip(rows, want):
        assert row["id"] == rec.id and row["question"] == rec.question and row["group"] == rec.group
        assert row["prompt"] == f"{rec.question} One word."
        assert tuple(row["answers"]) == rec.answers
        pic = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert np.array_equal(np.asarray(pic.convert("RGB")), np.asarray(rec.image))  # lossless
    meta = json.loads((out / "vtrlab_task.json").read_text())
    assert meta["metric"] == "exact" and meta["n_samples"] == 6
    assert meta["data"]["content_sha256"] == want.identity["content_sha256"]
    assert (out / "utils.py").read_text() == task_utils.__loader__.get_source(task_utils.__name__)


def test_exported_utils_score_with_the_notebooks_normalisation(tmp_path):
    out = tmp_path / "t"
    export_task(out, "organism", n_samples=2, metric="exact")
    ns: dict = {"__file__": str(out / "utils.py"), "__name__": "exported_utils"}
    exec(compile((out / "utils.py").read_text(), str(out / "utils.py"), "exec"), ns)
    doc = pq.read_table(out / "vtrlab_organism.parquet").to_pylist()[0]
    answer = doc["answers"][0]
    assert ns["process_results"](doc, [f"  The {answer.upper()}."]) == {"accuracy": 1.0}
    assert ns["process_results"](doc, ["certainly not " + answer]) == {"accuracy": 0.0}
    (visual,) = ns["doc_to_visual"](doc)  # bytes left undecoded are decoded
    assert visual.mode == "RGB"
    assert ns["doc_to_text"](doc) == doc["question"] and ns["doc_to_target"](doc) == answer


def test_export_from_a_manifest_and_refusals(tmp_path):
    rows = []
    for i in range(3):
        Image.new("RGB", (20, 10), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"{i}.png", "question": "Which color?", "answers": ["red", "dark red"]})
    manifest = tmp_path / "my-set.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = export_task(tmp_path / "task", manifest, metric="exact")
    assert path.name == "vtrlab_my_set.yaml"
    got = pq.read_table(path.with_suffix(".parquet")).to_pylist()
    assert [r["answers"] for r in got] == [["red", "dark red"]] * 3 and [r["group"] for r in got] == ["all"] * 3

    # re-export replaces its own folder; anything else is refused
    export_task(tmp_path / "task", manifest, name="again")
    assert sorted(p.name for p in (tmp_path / "task").iterdir())[:2] == ["again.parquet", "again.yaml"]
    with pytest.raises(FileExistsError, match="not a task folder"):
        export_task(tmp_path, manifest)
    with pytest.raises(ValueError, match="task name"):
        export_task(tmp_path / "x", manifest, name="1bad-name")
    with pytest.raises(ValueError, match="metric='bleu'; accepted: exact, vqa"):
        export_task(tmp_path / "x", manifest, metric="bleu")
    no_answers = tmp_path / "noans.jsonl"
    no_answers.write_text(json.dumps({"id": "a", "image": "0.png", "question": "q?"}) + "\n")
    with pytest.raises(ValueError, match="no answers"):
        export_task(tmp_path / "x", no_answers)
    assert not (tmp_path / "x").exists()


def test_cli_export_task(tmp_path):
    res = CliRunner().invoke(app, ["export-task", str(tmp_path / "t"), "--n-samples", "3", "--family", "color"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith("vtrlab_organism.yaml")
    assert {r["group"] for r in pq.read_table(tmp_path / "t" / "vtrlab_organism.parquet").to_pylist()} == {"color"}
    bad = CliRunner().invoke(app, ["export-task", str(tmp_path / "u"), "--metric", "f1"])
    assert bad.exit_code == 2 and "metric='f1'; accepted: exact, vqa" in bad.output


def test_read_results_reads_and_detects_failures(tmp_path):
    with pytest.raises(EvaluationFailed, match="no \\*_results.json"):
        read_results(tmp_path / "missing")
    run = tmp_path / "out" / "organism"
    run.mkdir(parents=True)
    doc = {
        "results": {"t": {"alias": "t", "accuracy,none": 0.75, "accuracy_stderr,none": 0.1}},
        "n-samples": {"t": {"original": 20, "effective": 20}},
    }
    (run / "20260101_000000_results.json").write_text(json.dumps(doc))
    assert read_results(tmp_path / "out", "t") == {"t": {"accuracy": 0.75, "n_samples": 20}}
    with pytest.raises(EvaluationFailed, match="task 'other' has no 'accuracy'"):
        read_results(tmp_path / "out", ["t", "other"])
    with pytest.raises(EvaluationFailed, match="no \\*_results.json"):
        read_results(tmp_path / "out", since=time.time() + 60)  # an old file is not this run's
    doc["results"]["t"]["accuracy,none"] = "N/A"
    os.utime(run / "20260101_000000_results.json", (0, 0))
    (run / "20260101_000001_results.json").write_text(json.dumps(doc))
    with pytest.raises(EvaluationFailed, match="has no 'accuracy'"):
        read_results(tmp_path / "out", "t")


def test_export_from_a_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    pics = [Image.new("RGB", (12, 8), (0, 40 * i, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {"image": pics, "question": ["How many?"] * 4, "answer": ["two", "3", "1", "0"], "family": list("aabb")},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "family": datasets.Value("string"),
            }
        ),
    )
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hf"))
    path = export_task(
        tmp_path / "task",
        tmp_path / "hf",
        name="hf_counts",
        split="validation",
        family="b",
        prompt_template="{question} Answer with a number.",
    )
    rows = pq.read_table(path.with_suffix(".parquet")).to_pylist()
    assert [r["answers"] for r in rows] == [["1"], ["0"]] and {r["group"] for r in rows} == {"b"}
    assert rows[0]["prompt"] == "How many? Answer with a number."
    got = np.asarray(Image.open(io.BytesIO(rows[1]["image"]["bytes"])).convert("RGB"))
    assert np.array_equal(got, np.asarray(pics[3]))
