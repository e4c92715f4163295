"""Answers on real data: task instructions added to each question (``prompt_template``), and the
answer scoring the notebooks use (re-exported from :mod:`vtrlab.metrics.answers`, its one home).
"""

from __future__ import annotations

import string

from vtrlab.metrics.answers import METRICS, accuracy, answer_accuracy, normalize_answer

__all__ = ["METRICS", "accuracy", "answer_accuracy", "format_prompt", "normalize_answer"]


def format_prompt(question: str, template: str = "{question}") -> str:
    """The question with task instructions, e.g. ``"{question} Answer with a single word."``.

    The template must contain ``{question}`` once and no other field; the model's own chat
    template is applied afterwards by ``vlm.prepare``.
    """
    if not isinstance(template, str):
        raise TypeError(f"prompt_template={template!r} is not a string")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"prompt_template={template!r} is not a valid template ({e})") from None
    if fields != ["question"]:
        raise ValueError(
            f"prompt_template={template!r} must contain the field {{question}} exactly once and no "
            f"other field (found: {fields}); write literal braces as {{{{ and }}}}"
        )
    return template.format(question=question)
