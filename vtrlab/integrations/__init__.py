"""Bridges from vtrlab to the harnesses the field reports its numbers with.

* :mod:`vtrlab.integrations.lmms_eval` — an lmms-eval chat model (``--model vtrlab``) that answers
  through :func:`vtrlab.answer`, so a benchmark number comes from the same code path as the
  notebooks, for any vtrlab model, reduction method and budget. Needs ``pip install vtrlab[lmms]``.
* :mod:`vtrlab.integrations.lmms_eval_task` — ``export_task`` (the ``vtrlab export-task`` command)
  writes an lmms-eval task folder from any dataset vtrlab reads; ``read_results`` reads what a run
  wrote and raises when the evaluation failed (lmms-eval itself exits 0 on failure). Needs no
  lmms-eval.

:func:`lmms_eval_models` is the ``lmms_eval.models`` entry point (declared in pyproject.toml): it
names the model class without importing torch or vtrlab's models.
"""

from __future__ import annotations

MODEL_ID = "vtrlab"
MODEL_CLASS = "vtrlab.integrations.lmms_eval.VtrlabModel"


def lmms_eval_models():
    """The ModelManifest lmms-eval loads from the ``lmms_eval.models`` entry-point group."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, chat_class_path=MODEL_CLASS)]


__all__ = ["MODEL_CLASS", "MODEL_ID", "lmms_eval_models"]
