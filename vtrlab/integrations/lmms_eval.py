"""lmms-eval chat model ``vtrlab``: any vtrlab model, any reduction method and budget, through ``vl.answer``.

Usage (after ``pip install vtrlab[lmms]``; the model is found through the ``lmms_eval.models``
entry point, no ``--include_path`` needed for it)::

    lmms-eval --model vtrlab \\
        --model_args pretrained=organism,method=fastv,keep=0.25,layer=2 \\
        --tasks vtrlab_organism --include_path TASK_DIR --batch_size 8 --output_path OUT

``model_args``:

* ``pretrained``: what :func:`vtrlab.load` takes (``organism``, a local folder, a hub id);
  ``device`` (``auto``, ``cpu``, ``cuda:0``), ``dtype`` (``auto``, ``bfloat16``, ...), ``device_map``
  (``auto`` spreads a large model over the visible GPUs) go to :func:`vtrlab.load`;
* ``method``: a name of :func:`vtrlab.reduce.names` (absent: every image token is kept);
  ``keep``: the budget — a ratio in (0, 1] (``keep=0.25``) or a number of image tokens
  (``keep=64``); any other key is a parameter of the method (``layer=2`` for FastV);
* ``max_new_tokens`` (default 16) applies when the task's ``generation_kwargs`` give none.

Every request is answered greedily by :func:`vtrlab.answer` (the notebooks' code path), in
batches of ``--batch_size`` requests taken in document order, so a run gives the answers
``vl.answer(vlm, vlm.prepare(images, prompts), method=..., keep=...)`` gives on the same batches.
An unknown method, parameter or budget, or a method that does not apply to the model's family,
fails in the constructor with vtrlab's own message — before any sample runs: the method is
resolved before the model loads, then one blank picture is answered (one token) as a preflight.

lmms-eval exits 0 when an evaluation fails; read its ``results.json`` with
:func:`vtrlab.integrations.lmms_eval_task.read_results`, which raises in that case.
"""

from __future__ import annotations

import json
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

LOAD_ARGS = ("device", "dtype", "device_map", "attn_implementation", "revision", "trust_remote_code")
IGNORED_ARGS = ("max_batch_size",)  # lmms-eval passes it to every model; vtrlab batches by batch_size


def _coerce_param(default: Any, value: Any) -> Any:
    """lmms-eval parses ``model_args`` values itself ("2" -> 2, "-1" -> -1.0, "mean" -> "mean");
    give back what the method's default type expects where that parse lost it."""
    if isinstance(default, bool):
        return value
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)
    return value


def _batch_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"batch_size={value!r}; accepted: an integer >= 1")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={value!r}; accepted: an integer >= 1 ('auto' is not supported)") from None
    if n < 1 or str(n) != str(value).strip():
        raise ValueError(f"batch_size={value!r}; accepted: an integer >= 1")
    return n


class VtrlabModel(lmms):
    """lmms-eval chat model answering through :func:`vtrlab.answer` (see the module docstring)."""

    is_simple = False

    def __init__(
        self,
        pretrained: str = "organism",
        method: str | None = None,
        keep: float | int | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import vtrlab as vl

        load_kw = {k: kwargs.pop(k) for k in LOAD_ARGS if k in kwargs}
        load_kw = {k: v for k, v in load_kw.items() if v is not None}
        for k in IGNORED_ARGS:
            kwargs.pop(k, None)
        self.batch_size = _batch_size(batch_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}; accepted: an integer >= 1")
        self.max_new_tokens = max_new_tokens
        if isinstance(method, str) and method.lower() in ("", "none"):
            method = None
        self.method_name = method
        self.keep = keep
        if method is None:
            if kwargs:
                raise ValueError(
                    f"model_args {sorted(kwargs)} are not vtrlab model arguments and no method= was "
                    f"given to take them as parameters; accepted: pretrained, method, keep, batch_size, "
                    f"max_new_tokens, {', '.join(LOAD_ARGS)}"
                )
            if keep is not None:
                raise ValueError(f"keep={keep!r} is a budget; give method= (one of {', '.join(vl.reduce.names())})")
            self.method = None
        else:
            cls_defaults = {}
            if method in vl.reduce.names():
                cls_defaults = vl.reduce.get(method).defaults
            params = {k: _coerce_param(cls_defaults[k], v) if k in cls_defaults else v for k, v in kwargs.items()}
            self.method = vl.reduce.get(method, **params)  # unknown method / parameter: vtrlab's error, pre-load
            if keep is None:
                raise ValueError(
                    f"method={method!r} needs a budget keep= (a ratio in (0, 1] or a number of image "
                    "tokens), e.g. keep=0.25"
                )
        self.vlm = vl.load(pretrained, **load_kw)
        self._answer = vl.answer
        self._preflight()

    # -- lmms-eval interface -------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, batched by ``batch_size`` in document order within each (task, split, kwargs)."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            if len(req.args) != 6:
                raise ValueError(
                    f"request {i} has {len(req.args)} arguments; a chat model receives 6 "
                    "(context, doc_to_messages, generation_kwargs, doc_id, task, split)"
                )
            _, _, gen_kwargs, doc_id, task, split = req.args
            key = (task, split, json.dumps(gen_kwargs or {}, sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        out: list[str | None] = [None] * len(requests)
        chunks = []
        for (task, split, _), idx in groups.items():
            idx = sorted(idx, key=lambda i: requests[i].args[3])
            chunks += [(task, split, idx[s : s + self.batch_size]) for s in range(0, len(idx), self.batch_size)]
        for task, split, idx in tqdm(chunks, desc="vtrlab answers", unit="batch", disable=self.rank != 0):
            images, prompts = [], []
            for i in idx:
                _, doc_to_messages, _, doc_id, _, _ = requests[i].args
                ims, text = _messages_to_sample(doc_to_messages(self.task_dict[task][split][doc_id]), doc_id)
                images.append(ims)
                prompts.append(text)
            gen_kwargs = requests[idx[0]].args[2] or {}
            answers = self.answer(images, prompts, **self._generation(gen_kwargs))
            for i, a in zip(idx, answers):
                out[i] = _truncate(a, gen_kwargs.get("until"))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "the vtrlab lmms-eval model implements generate_until only (greedy answers "
            "through vl.answer); this task asks for loglikelihood"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            "the vtrlab lmms-eval model answers single-turn requests only (generate_until); this task is multi-round"
        )

    # -- vtrlab ---------------------------------------------------------------------------------------
    def answer(self, images: list, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Answers for one batch, exactly as the notebooks get them."""
        batch = self.vlm.prepare(images=images, prompts=prompts)
        return self._answer(
            self.vlm, batch, method=self.method, keep=self.keep, max_new_tokens=max_new_tokens or self.max_new_tokens
        )

    def _generation(self, gen_kwargs: dict) -> dict:
        temperature = gen_kwargs.get("temperature", 0) or 0
        if gen_kwargs.get("do_sample") or float(temperature) > 0 or int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            raise ValueError(
                f"generation_kwargs {gen_kwargs} ask for sampling or beam search; vtrlab answers "
                "greedily (temperature 0, do_sample false, num_beams 1)"
            )
        n = gen_kwargs.get("max_new_tokens", self.max_new_tokens)
        return {"max_new_tokens": int(n)}

    def _preflight(self) -> None:
        """Answer one blank picture (one token) with the method and budget: whatever vtrlab refuses
        (budget, layer out of range, family without the method's signal) is refused now."""
        from PIL import Image

        batch = self.vlm.prepare(images=[Image.new("RGB", (224, 224), (128, 128, 128))], prompts=["?"])
        keep = self.keep
        if self.method is not None and isinstance(keep, int) and not isinstance(keep, bool) and keep > 0:
            keep = min(keep, batch.layouts[0].n_image_tokens)  # the real pictures' counts are checked per batch
        self._answer(self.vlm, batch, method=self.method, keep=keep, max_new_tokens=1)


def _messages_to_sample(messages: Any, doc_id: Any) -> tuple[list, str]:
    """(pictures, text) of a single user turn; anything else is refused with the doc id."""
    from lmms_eval.protocol import ChatMessages

    if isinstance(messages, tuple):  # multi-round payload
        raise NotImplementedError(f"doc {doc_id}: multi-round requests are not supported by the vtrlab model")
    msgs = ChatMessages(messages=messages).messages
    if len(msgs) != 1 or msgs[0].role != "user":
        roles = [m.role for m in msgs]
        raise NotImplementedError(
            f"doc {doc_id}: messages with roles {roles}; the vtrlab model answers one user "
            "turn (put a system prompt into the task's prompt)"
        )
    images, texts = [], []
    for c in msgs[0].content:
        if c.type == "image":
            images.append(c.url)
        elif c.type == "text":
            texts.append(c.text)
        else:
            raise NotImplementedError(f"doc {doc_id}: {c.type} input; the vtrlab model takes pictures and text")
    return images, "\n".join(texts)


def _truncate(text: str, until: Any) -> str:
    """Cut at the first stop string of the task, as lmms-eval's own models do."""
    if until is None:
        return text
    for stop in [until] if isinstance(until, str) else list(until):
        if stop:
            text = text.split(stop)[0]
    return text


__all__ = ["VtrlabModel"]
