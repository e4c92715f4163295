"""Shared pieces of the tiny test models: image processors without torchvision, chat templates."""

from __future__ import annotations

import importlib.util

import transformers

# LLaVA-1.5 style: every image first, then the text; "USER: ... ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'].upper() + ': ' }}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] + ' ' }}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# ChatML style as in LLaVA-NeXT (Qwen/Mistral-based) and OneVision checkpoints.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def image_processor(name: str, **kwargs):
    """``transformers.<name>`` (torchvision backend) when torchvision is installed, else its PIL twin."""
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        name = name + "Pil"
    return getattr(transformers, name)(**kwargs)
