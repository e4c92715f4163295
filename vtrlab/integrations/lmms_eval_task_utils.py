"""Task functions of an lmms-eval task written by ``vtrlab export-task``.

This file is copied verbatim as ``utils.py`` into every exported task folder; its settings (the
answer metric) are read from ``vtrlab_task.json`` beside it. The answer is scored by
:func:`vtrlab.data.answers.answer_accuracy` — the notebooks' VQA normalisation, one
implementation — so the task needs vtrlab installed wherever lmms-eval runs it.
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

CONFIG = "vtrlab_task.json"


@lru_cache(maxsize=1)
def _config() -> dict:
    path = Path(__file__).with_name(CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this utils.py belongs in a folder written by vtrlab export-task")
    return json.loads(path.read_text())


def doc_to_visual(doc: dict) -> list:
    """The sample's picture as RGB (an embedded image; decoded here when datasets left it as bytes)."""
    from PIL import Image

    img = doc["image"]
    if isinstance(img, dict):
        img = Image.open(io.BytesIO(img["bytes"]))
    return [img.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question with the export's prompt template applied (``vtrlab.data.answers.format_prompt``)."""
    return doc["prompt"]


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0]


def process_results(doc: dict, results: list) -> dict:
    """``accuracy``: the notebooks' answer accuracy of the model's answer against the accepted answers."""
    from vtrlab.data.answers import answer_accuracy

    prediction = results[0]
    prediction = getattr(prediction, "text", prediction)  # GenerationResult or str
    return {"accuracy": answer_accuracy(prediction, list(doc["answers"]), _config()["metric"])}
