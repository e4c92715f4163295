"""Tiny, offline Gemma 3: SigLIP 32 px / 4 px patches (8x8), pooled 2x2 -> 16 tokens per image."""

from __future__ import annotations

import pandas as pd
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

from .._identities import expected_rows
from .._processors import build_processor, image_processor_class
from ..registry import register_proof, register_tiny
from ..tokenizer import byte_tokenizer

# The checkpoints' template, less the system-prompt folding: images then text in a user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
VIEW_PX, PATCH_PX, TOKENS = 32, 4, 16


def gemma3_tokenizer():
    specials = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok = byte_tokenizer(
        specials,
        GEMMA3_CHAT_TEMPLATE,
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        add_bos=False,
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
    )
    for name in ("boi_token", "eoi_token", "image_token"):
        setattr(tok, name + "_id", tok.convert_tokens_to_ids(getattr(tok, name)))
    return tok


@register_tiny("gemma3")
def tiny_gemma3(seed: int = 0):
    tok = gemma3_tokenizer()
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            sliding_window=512,
            layer_types=["sliding_attention", "full_attention"],
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=VIEW_PX,
            patch_size=PATCH_PX,
            vision_use_head=False,
        ),
        mm_tokens_per_image=TOKENS,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    image_processor = image_processor_class("gemma3")(size={"height": VIEW_PX, "width": VIEW_PX})
    processor = build_processor(
        Gemma3Processor,
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=TOKENS,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return model, processor


def _pooled_identities(vlm, batch) -> pd.DataFrame:
    """Projector output rows: one view per image in pixel_values order, pooled grid row-major."""
    side = int(round(vlm.model.config.mm_tokens_per_image**0.5))
    rows = [
        (s, j, 0, r, c)
        for s, ims in enumerate(batch.images)
        for j in range(len(ims))
        for r in range(side)
        for c in range(side)
    ]
    return pd.DataFrame(rows, columns=["sample", "image", "tile", "row", "col"])


@register_proof("gemma3")
def proof_gemma3(vlm, batch):
    return vlm.model.model.multi_modal_projector, expected_rows(_pooled_identities(vlm, batch), batch)
