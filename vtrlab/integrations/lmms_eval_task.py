"""lmms-eval task folders from vtrlab data, and the results of an lmms-eval run read back.

``export_task(out, data, ...)`` loads ``data`` with :func:`vtrlab.data.sources.load_data` (the
organism's families, ``photos``, a JSONL/JSON/parquet manifest, an image folder, a saved HF
dataset — the notebooks' loader, same subsampling) and writes, whole or not at all::

    OUT/<name>.yaml       task: generate_until, greedy, max_new_tokens, metric "accuracy" (mean)
    OUT/<name>.parquet    id, image (embedded PNG, HF Image feature), question, prompt, answers, group
    OUT/utils.py          doc_to_visual / doc_to_text / process_results (vtrlab's answer accuracy)
    OUT/vtrlab_task.json  metric, prompt template, data identity, vtrlab version

``prompt`` is the question with ``prompt_template`` applied (:func:`vtrlab.data.answers.format_prompt`)
and the answer is scored by :func:`vtrlab.data.answers.answer_accuracy` (``exact`` or ``vqa``): the
normalisation the notebooks use. The YAML names the parquet by its absolute path (lmms-eval reads
data files relative to its working directory): export again after moving the folder.

``read_results(output_path)`` finds the ``*_results.json`` an lmms-eval run wrote and returns
``{task: {metric: value}}``; it raises :class:`EvaluationFailed` when there is none, or a task has
no metric value — lmms-eval itself exits 0 when an evaluation fails.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_CONFIG = "vtrlab_task.json"
UTILS_SOURCE = Path(__file__).with_name("lmms_eval_task_utils.py")
METRIC_NAME = "accuracy"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# the HF features of the parquet ("Sequence" is read by every datasets version lmms-eval accepts)
_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "question": {"dtype": "string", "_type": "Value"},
    "prompt": {"dtype": "string", "_type": "Value"},
    "answers": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
    "group": {"dtype": "string", "_type": "Value"},
}


class EvaluationFailed(RuntimeError):
    """An lmms-eval run left no result for a task (it exits 0 in that case)."""


def default_task_name(data: str | os.PathLike) -> str:
    stem = "organism" if str(data) == "organism" else Path(str(data)).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "data"
    return f"vtrlab_{stem}"


def _yaml(name: str, parquet: Path, max_new_tokens: int, meta: dict) -> str:
    import yaml

    plain = {
        "task": name,
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": str(parquet)}},
        "test_split": "test",
        "output_type": "generate_until",
        "generation_kwargs": {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False, "num_beams": 1},
        "metric_list": [{"metric": METRIC_NAME, "aggregation": "mean", "higher_is_better": True}],
        "metadata": meta,
    }
    functions = "".join(
        f"{k}: !function utils.{k}\n" for k in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results")
    )
    return (
        f"# lmms-eval task written by `vtrlab export-task`; re-export rather than edit.\n"
        f"{yaml.safe_dump(plain, sort_keys=False)}{functions}"
    )


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(records, prompts: list[str], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("question", pa.string()),
            ("prompt", pa.string()),
            ("answers", pa.list_(pa.string())),
            ("group", pa.string()),
        ]
    )
    columns: dict[str, list] = {k: [] for k in schema.names}
    for r, p in zip(records, prompts):
        columns["id"].append(str(r.id))
        columns["image"].append({"bytes": _png(r.image), "path": None})
        columns["question"].append(r.question)
        columns["prompt"].append(p)
        columns["answers"].append(list(r.answers))
        columns["group"].append(r.group if r.group is not None else "all")
    table = pa.table(columns, schema=schema)
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": _FEATURES}}).encode()})
    pq.write_table(table, path)


def export_task(
    out: str | os.PathLike,
    data: str | os.PathLike = "organism",
    *,
    name: str | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    family: str | Sequence[str] | None = None,
    prompt_template: str = "{question}",
    metric: str = "exact",
    max_new_tokens: int = 16,
    **load_kw: Any,
) -> Path:
    """Write an lmms-eval task folder ``out`` (see the module docstring); returns its YAML path.

    ``data``, ``n_samples``, ``seed``, ``family`` and ``load_kw`` (column names, ``question``,
    ``split``, ``box_format``) are :func:`vtrlab.data.sources.load_data`'s. ``out`` is replaced whole
    when it is a task folder this function wrote; any other existing path is refused.
    """
    from vtrlab import __version__
    from vtrlab.data.answers import METRICS, format_prompt
    from vtrlab.data.sources import load_data
    from vtrlab.io import atomic_dir

    name = name or default_task_name(data)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"task name {name!r}; accepted: a letter then letters, digits or _ (e.g. vtrlab_organism)")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; accepted: {', '.join(METRICS)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; accepted: an integer >= 1")
    out = Path(out).expanduser().absolute()
    if out.exists() and not (out.is_dir() and (out / TASK_CONFIG).is_file()):
        raise FileExistsError(
            f"{str(out)!r} exists and is not a task folder written by vtrlab export-task; give a new path"
        )
    loaded = load_data(data, n_samples=n_samples, seed=seed, family=family, **load_kw)
    if not len(loaded):
        raise ValueError(f"data={str(data)!r} gave no samples")
    missing = [r.id for r in loaded if not r.answers]
    if missing:
        raise ValueError(
            f"data={str(data)!r}: {len(missing)} samples have no answers (first: {missing[0]!r}); an "
            "evaluation task needs answers (answer_column= names the column holding them)"
        )
    without_question = [r.id for r in loaded if not r.question]
    if without_question:
        raise ValueError(f"data={str(data)!r}: sample {without_question[0]!r} has no question; give question=")
    prompts = [format_prompt(r.question, prompt_template) for r in loaded]
    config = {
        "task": name,
        "metric": metric,
        "prompt_template": prompt_template,
        "max_new_tokens": max_new_tokens,
        "n_samples": len(loaded),
        "data": loaded.identity,
        "vtrlab_version": __version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta = {
        "version": 1.0,
        "vtrlab_version": __version__,
        "metric": metric,
        "content_sha256": loaded.identity.get("content_sha256"),
    }

    with atomic_dir(out) as tmp:  # the folder appears whole, or the old one stays
        _write_parquet(loaded.records, prompts, tmp / f"{name}.parquet")
        (tmp / f"{name}.yaml").write_text(_yaml(name, out / f"{name}.parquet", max_new_tokens, meta))
        shutil.copyfile(UTILS_SOURCE, tmp / "utils.py")
        (tmp / TASK_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out / f"{name}.yaml"


def read_results(
    output_path: str | os.PathLike,
    tasks: Sequence[str] | str | None = None,
    since: float | None = None,
    metric: str = METRIC_NAME,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value, "n_samples": n}}`` from the newest ``*_results.json`` under ``output_path``.

    Raises :class:`EvaluationFailed` when no results file (newer than ``since``, a ``time.time()``)
    exists, or one of ``tasks`` (default: every task in the file) has no ``metric``.
    """
    root = Path(output_path)
    found = sorted(root.rglob("*_results.json"), key=lambda p: p.stat().st_mtime) if root.exists() else []
    if since is not None:
        found = [p for p in found if p.stat().st_mtime >= since]
    if not found:
        raise EvaluationFailed(
            f"lmms-eval wrote no *_results.json under {str(root)!r}: the evaluation failed "
            "(lmms-eval exits 0 then; its log says why, --verbosity DEBUG raises the error)"
        )
    path = found[-1]
    doc = json.loads(path.read_text())
    results = doc.get("results") or {}
    wanted = [tasks] if isinstance(tasks, str) else list(tasks) if tasks is not None else list(results)
    if not wanted:
        raise EvaluationFailed(f"{path} holds no task results")
    out: dict[str, dict[str, float]] = {}
    for task in wanted:
        values = results.get(task) or {}
        key = next((k for k in values if k == metric or k.startswith(metric + ",")), None)
        if key is None or values[key] is None or values[key] == "N/A":
            raise EvaluationFailed(f"{path}: task {task!r} has no {metric!r} (got {sorted(values) or 'nothing'})")
        n = (doc.get("n-samples") or {}).get(task, {})
        out[task] = {metric: float(values[key]), "n_samples": n.get("effective", n.get("original"))}
    return out


__all__ = ["METRIC_NAME", "EvaluationFailed", "default_task_name", "export_task", "read_results"]
