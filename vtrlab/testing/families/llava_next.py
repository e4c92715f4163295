"""Tiny and full-size LLaVA-NeXT models (random weights, offline)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)

from .._common import LLAVA_CHAT_TEMPLATE, image_processor
from ..registry import register_full_size, register_proof, register_tiny
from ..tokenizer import byte_tokenizer
from .llava import CLIP_L_336, VICUNA_7B, build_full, clip_llama_config, llava_family_proof


def next_processor(side: int, patch: int, pinpoints: list[list[int]]):
    tok = byte_tokenizer(["<image>"], image_token="<image>")
    ip = image_processor(
        "LlavaNextImageProcessor",
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_tiny_next(seed: int = 0, side: int = 32, patch: int = 8):
    """LLaVA-NeXT in miniature: 32px crops of 4x4 patches, the released 1x2/2x1/2x2/1x3/3x1 grids."""
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [side, 3 * side], [3 * side, side]]
    processor = next_processor(side, patch, pinpoints)
    tok = processor.tokenizer
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=side,
            patch_size=patch,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=4096,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_grid_pinpoints=pinpoints,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return model, processor


@register_tiny("llava_next")
def tiny_next(seed: int):
    return build_tiny_next(seed)


@register_full_size("llava-next-7b")
def full_next_7b(dtype: torch.dtype, device: str):
    """llava-hf/llava-v1.6-vicuna-7b-hf shapes: CLIP ViT-L/14-336 + Vicuna-7B, anyres up to 672x672."""
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    processor = next_processor(336, 14, pinpoints)
    config = clip_llama_config(
        LlavaNextConfig, processor.tokenizer, vision=CLIP_L_336, text=VICUNA_7B, image_grid_pinpoints=pinpoints
    )
    return build_full(LlavaNextForConditionalGeneration, config, dtype, device), processor


register_proof("llava_next")(llava_family_proof)
