"""Tiny LLaVA-OneVision model (SigLIP + Qwen2, random weights, offline)."""

from __future__ import annotations

import torch
import transformers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.utils import is_torchvision_available

from .._common import CHATML_TEMPLATE, image_processor
from .._processors import build_processor
from ..registry import register_proof, register_tiny
from ..tokenizer import byte_tokenizer
from .llava import llava_family_proof


def build_tiny_onevision(
    seed: int = 0, side: int = 32, patch: int = 8, max_grid: int = 4, aspect: str = "anyres_max_9"
):
    """OneVision in miniature: 32px SigLIP crops of 4x4 patches, grids up to 4x4 crops (the release: 6x6)."""
    tok = byte_tokenizer(
        ["<image>", "<video>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        image_token="<image>",
        video_token="<video>",
    )
    pinpoints = [[side * i, side * j] for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]
    ip = image_processor(
        "LlavaOnevisionImageProcessor", size={"height": side, "width": side}, image_grid_pinpoints=pinpoints
    )
    # with torchvision the processor insists on its video processor; without it, none can be built
    video = transformers.LlavaOnevisionVideoProcessor() if is_torchvision_available() else None
    processor = build_processor(
        LlavaOnevisionProcessor,
        image_processor=ip,
        tokenizer=tok,
        video_processor=video,
        num_image_tokens=(side // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
        chat_template=CHATML_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=side,
            patch_size=patch,
        ),
        text_config=Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=4096,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_grid_pinpoints=pinpoints,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    return model, processor


@register_tiny("llava_onevision")
def tiny_onevision(seed: int):
    return build_tiny_onevision(seed)


register_proof("llava_onevision")(llava_family_proof)
