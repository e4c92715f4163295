"""Build the organism (random init) and save model + processor as one plain-transformers folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

from vtrlab.io import atomic_dir
from vtrlab.organism.config import build_config
from vtrlab.organism.processor import build_processor

CLIP_DIR = "clip"  # the micro-CLIP (tower + text encoder) inside a bundle


def build_random(seed: int = 0, image_first: bool = True) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-init organism and its processor (deterministic for a seed)."""
    config = build_config()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    tc = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=tc.bos_token_id,
        eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    )
    return model, build_processor(image_first)


def save_organism(
    model,
    processor,
    out: str | os.PathLike,
    extra_files: dict[str, str] | None = None,
    max_shard_size: str = "15MB",
    clip=None,
) -> Path:
    """Write model + processor (+ extra text files, + the micro-CLIP and its tokenizer in ``clip/``)
    to ``out`` atomically (temp dir, then rename)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        if clip is not None:
            clip.save_pretrained(tmp / CLIP_DIR, max_shard_size=max_shard_size)
            processor.tokenizer.save_pretrained(tmp / CLIP_DIR)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def save_random(out: str | os.PathLike = "/tmp/vtrlab-organism-random", seed: int = 0) -> Path:
    model, processor = build_random(seed)
    return save_organism(model, processor, out)
