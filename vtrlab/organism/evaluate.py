"""Held-out evaluation of the organism through plain transformers (processor, chat template,
left-padded batched greedy ``generate``), per family, beside the no-image baseline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vtrlab.data.glyphs import LETTERS
from vtrlab.data.synthetic import FAMILIES, WORD_LENGTH, blank_like, generate
from vtrlab.io import atomic_write_text

EVAL_SEED = 0  # training uses seeds 1 (train) and 2 (validation): seed 0 is held out


def answer(
    model,
    processor,
    images,
    questions: list[str],
    batch_size: int = 64,
    max_new_tokens: int = 6,
    device=None,
    progress: bool = False,
) -> list[str]:
    """Greedy answers of the organism, exactly as a plain-transformers user would get them."""
    from vtrlab.organism.processor import user_message

    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    device = device or next(model.parameters()).device
    processor.tokenizer.padding_side = "left"
    out: list[str] = []
    for a in tqdm(range(0, len(images), batch_size), desc="answer", disable=not progress):
        qs = questions[a : a + batch_size]
        texts = [processor.apply_chat_template(user_message(q), add_generation_prompt=True) for q in qs]
        batch = processor(images=list(images[a : a + batch_size]), text=texts, return_tensors="pt", padding=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[:, batch["input_ids"].shape[1] :]
        out += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return out


def chance(family: str) -> float:
    from vtrlab.data.synthetic import ANSWERS, OPTIONS_PER_QUESTION

    choices = ANSWERS[family]
    if not choices:
        return 1.0 / len(LETTERS) ** WORD_LENGTH
    return 1.0 / OPTIONS_PER_QUESTION.get(family, len(choices))


def evaluate(
    model,
    processor,
    n: int = 500,
    seed: int = EVAL_SEED,
    families=FAMILIES,
    device=None,
    batch_size: int = 64,
    blank: bool = True,
    progress: bool = True,
) -> dict:
    """Exact-match accuracy of greedy answers on n held-out samples per family (+ blank pictures)."""
    fams = {}
    for fam in families:
        samples = generate(n, seed, family=fam)
        qs = [s.question for s in samples]
        pred = answer(model, processor, [s.image for s in samples], qs, batch_size, device=device, progress=progress)
        acc = sum(p == s.answer for p, s in zip(pred, samples)) / max(1, n)
        row = {"n": n, "accuracy": round(acc, 4), "chance": round(chance(fam), 6)}
        if blank:
            pred0 = answer(model, processor, [blank_like(s) for s in samples], qs, batch_size, device=device)
            row["no_image_accuracy"] = round(sum(p == s.answer for p, s in zip(pred0, samples)) / max(1, n), 4)
        row["examples"] = [
            {"question": s.question, "answer": s.answer, "predicted": p} for s, p in list(zip(samples, pred))[:3]
        ]
        fams[fam] = row
    import transformers

    return {
        "seed": seed,
        "n_per_family": n,
        "metric": "greedy exact match",
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "transformers_version": transformers.__version__,
        "families": fams,
    }


def eval_to_json(result: dict) -> str:
    return json.dumps(result, indent=1) + "\n"


def load_bundle(path: str | os.PathLike, device: str = "cpu"):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no organism bundle at {path} (expected config.json, model.safetensors, ...)")
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).to(device).eval()
    return model, processor


def evaluate_bundle(
    path: str | os.PathLike,
    n: int = 500,
    seed: int = EVAL_SEED,
    device: str = "cpu",
    families=FAMILIES,
    batch_size: int = 64,
    out_json: str | os.PathLike | None = None,
) -> dict:
    """Evaluate a saved bundle; optionally write the result JSON atomically."""
    model, processor = load_bundle(path, device)
    result = evaluate(model, processor, n=n, seed=seed, families=families, device=device, batch_size=batch_size)
    if out_json is not None:
        atomic_write_text(out_json, eval_to_json(result))
    return result
