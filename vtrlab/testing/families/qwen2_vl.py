"""Tiny, offline Qwen2-VL / Qwen2.5-VL models and processors; the full-size Qwen2.5-VL-7B shape.

Tiny models keep the real packing: patch 14, 2x2 merge, temporal patch 2, mRoPE sections, and
(for 2.5) window attention with one full-attention block, so layouts are exercised as in the
checkpoints. Processor pixel bounds are small so that test images give a handful of tokens.
"""

from __future__ import annotations

import pandas as pd
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from .._identities import expected_rows
from .._processors import build_processor, image_processor_class, video_processor
from ..registry import register_full_size, register_proof, register_tiny
from ..tokenizer import byte_tokenizer

# The real Qwen2-VL chat template, less tool calls and video (it opens with the default system turn).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def qwen_tokenizer():
    return byte_tokenizer(
        QWEN_SPECIAL,
        QWEN_CHAT_TEMPLATE,
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        add_bos=False,
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
    )


def _tiny_configs(tok, v25: bool) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=tok.pad_token_id,
    )
    if v25:
        # window 56 px = 2x2 merge units per window, so small images hold several windows.
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    else:
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
    return dict(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _tiny(seed: int, v25: bool):
    tok = qwen_tokenizer()
    cfg_cls, model_cls, proc_cls = (
        (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
        if v25
        else (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
    )
    config = cfg_cls(**_tiny_configs(tok, v25))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # 56x56 .. 112x112 processed pixels: 4..16 patches a side before the merge.
    image_processor = image_processor_class("qwen2_vl")(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = build_processor(
        proc_cls,
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor("qwen2_vl"),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


@register_tiny("qwen2_vl")
def tiny_qwen2_vl(seed: int = 0):
    return _tiny(seed, v25=False)


@register_tiny("qwen2_5_vl")
def tiny_qwen2_5_vl(seed: int = 0):
    return _tiny(seed, v25=True)


def _merged_identities(vlm, batch) -> pd.DataFrame:
    """One row per merged vision feature in processor order: images in batch order, each image's
    merged grid (grid_h/merge, grid_w/merge) row-major, as ``image_grid_thw`` describes it."""
    merge = vlm.model.config.vision_config.spatial_merge_size
    grid = batch.inputs["image_grid_thw"].cpu().tolist()
    rows, g = [], 0
    for s, ims in enumerate(batch.images):
        for j in range(len(ims)):
            _, h, w = grid[g]
            rows += [(s, j, 0, r, c) for r in range(h // merge) for c in range(w // merge)]
            g += 1
    return pd.DataFrame(rows, columns=["sample", "image", "tile", "row", "col"])


@register_proof("qwen2_vl")
def proof_qwen2_vl(vlm, batch):
    return vlm.model.model.visual.merger, expected_rows(_merged_identities(vlm, batch), batch)


@register_proof("qwen2_5_vl")
def proof_qwen2_5_vl(vlm, batch):
    # The merger output is in window order; the vision tower's pooler_output is back in processor order.
    return vlm.model.model.visual, expected_rows(_merged_identities(vlm, batch), batch)


@register_full_size("qwen2.5-vl-7b")
def full_qwen2_5_vl_7b(dtype=torch.bfloat16, device="meta"):
    """Qwen2.5-VL-7B-Instruct shapes (config.json of the hub checkpoint), random weights."""
    tok = qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=151643,
            eos_token_id=151645,
            sliding_window=32768,
            max_window_layers=28,
            use_sliding_window=False,
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            hidden_act="silu",
            tokens_per_second=2,
        ),
        # special-token ids of the stand-in tokenizer (the checkpoint's are 151652..151656)
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    # The tiny byte tokenizer stands in for the real one: token ids of real prompts are not the
    # checkpoint's, which random weights make irrelevant; the vocabulary size is the checkpoint's.
    image_processor = image_processor_class("qwen2_vl")()
    processor = build_processor(
        Qwen2_5_VLProcessor,
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor("qwen2_vl"),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor
