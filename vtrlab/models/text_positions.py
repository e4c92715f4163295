"""Where the user's prompt text sits in a processed sequence.

The processor only expands image placeholders, so the templated text tokenized on its own
differs from the processed ids exactly at the placeholders. Walking both sequences together
maps each prompt token to its processed position, and checks every other token on the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def prompt_char_span(text: str, prompt: str) -> tuple[int, int]:
    """Character span of ``prompt`` in the templated ``text`` (last occurrence: the user turn)."""
    for cand in (prompt, prompt.strip()):
        if cand:
            at = text.rfind(cand)
            if at >= 0:
                return at, at + len(cand)
    if not prompt.strip():
        return len(text), len(text)
    raise ValueError(f"prompt {prompt!r} does not occur verbatim in the templated text {text!r}")


def prompt_token_positions(
    tokenizer: Any,
    text: str,
    prompt: str,
    processed_ids: Sequence[int],
    image_token_id: int,
    expansions: Sequence[int],
) -> np.ndarray:
    """Indices into ``processed_ids`` (one sample, padding removed) of the prompt's tokens.

    ``expansions[j]`` is how many tokens the j-th image placeholder became.
    """
    a, b = prompt_char_span(text, prompt)
    enc = tokenizer(text, return_offsets_mapping=True)
    raw = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    processed = np.asarray(processed_ids)
    out = []
    p = 0  # position in processed
    j = 0  # image placeholder counter
    for k, tid in enumerate(raw):
        if tid == image_token_id:
            if j >= len(expansions):
                raise RuntimeError(f"more image placeholders in {text!r} than images ({len(expansions)})")
            run = processed[p : p + expansions[j]]
            if len(run) != expansions[j] or (run != image_token_id).any():
                raise RuntimeError(f"image placeholder {j} did not expand to {expansions[j]} image tokens")
            p += expansions[j]
            j += 1
            continue
        if p >= len(processed) or processed[p] != tid:
            raise RuntimeError(
                f"templated text and processor output disagree at token {k} ({tid} vs "
                f"{processed[p] if p < len(processed) else 'end'})"
            )
        s, e = offsets[k]
        if e > a and s < b and e > s:
            out.append(p)
        p += 1
    if p != len(processed):
        raise RuntimeError(f"processor output has {len(processed) - p} tokens the templated text does not explain")
    return np.asarray(out, dtype=int)
