"""Tiny, offline Idefics3 and SmolVLM models and processors.

Crops are 32 px with 4 px patches (8x8 patches, pixel shuffle 2 -> 4x4 = 16 tokens per view);
the longest edge is resized to 96 px, so images split into up to 3x3 crops plus the global view.
"""

from __future__ import annotations

import pandas as pd
import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)

from .._identities import expected_rows
from .._processors import build_processor, image_processor_class, video_processor
from ..registry import register_proof, register_tiny
from ..tokenizer import byte_tokenizer

# The checkpoints' chat template (Idefics3-8B-Llama3 / SmolVLM-Instruct):
# "User:<image>text<end_of_utterance>\nAssistant:"
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_CHAT_TEMPLATE = IDEFICS3_CHAT_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>")

CROP_PX, PATCH_PX, SHUFFLE, LONGEST_EDGE = 32, 4, 2, 96
IMAGE_SEQ_LEN = (CROP_PX // PATCH_PX // SHUFFLE) ** 2


def _tokenizer(smol: bool):
    row_col = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    begin = "<|im_start|>" if smol else "<|begin_of_text|>"
    specials = [begin, "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *row_col]
    return byte_tokenizer(
        specials,
        SMOLVLM_CHAT_TEMPLATE if smol else IDEFICS3_CHAT_TEMPLATE,
        bos=None,
        eos="<end_of_utterance>",
        pad="<pad>",
        add_bos=False,
        image_token="<image>",
        fake_image_token="<fake_token_around_image>",
        global_image_token="<global-img>",
        end_of_utterance_token="<end_of_utterance>",
    )


def _tiny(seed: int, smol: bool):
    tok = _tokenizer(smol)
    cfg_cls, model_cls = (
        (SmolVLMConfig, SmolVLMForConditionalGeneration) if smol else (Idefics3Config, Idefics3ForConditionalGeneration)
    )
    config = cfg_cls(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=CROP_PX,
            patch_size=PATCH_PX,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
        ),
        scale_factor=SHUFFLE,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    image_processor = image_processor_class("smolvlm" if smol else "idefics3")(
        size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": CROP_PX}
    )
    if smol:
        processor = build_processor(
            SmolVLMProcessor,
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video_processor("smolvlm"),
            image_seq_len=IMAGE_SEQ_LEN,
            chat_template=SMOLVLM_CHAT_TEMPLATE,
        )
    else:
        processor = build_processor(
            Idefics3Processor,
            image_processor=image_processor,
            tokenizer=tok,
            image_seq_len=IMAGE_SEQ_LEN,
            chat_template=IDEFICS3_CHAT_TEMPLATE,
        )
    return model, processor


@register_tiny("idefics3")
def tiny_idefics3(seed: int = 0):
    return _tiny(seed, smol=False)


@register_tiny("smolvlm")
def tiny_smolvlm(seed: int = 0):
    return _tiny(seed, smol=True)


def _connector_identities(vlm, batch) -> pd.DataFrame:
    """One row per connector output row: views of the vision batch in pixel_values order (padding
    views dropped), each view's shuffled grid row-major. Per image the processor emits its crops
    in raster order (tiles 1..) and the global view (tile 0) last; the crop grid comes from the
    image processor's own row/col info."""
    proc = vlm.processor
    cfg = vlm.model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor
    info = proc.image_processor(batch.images, return_row_col_info=True)
    rows = []
    for s, ims in enumerate(batch.images):
        for j in range(len(ims)):
            n = info["rows"][s][j] * info["cols"][s][j]
            for tile in [*range(1, n + 1), 0]:
                rows += [(s, j, tile, r, c) for r in range(side) for c in range(side)]
    return pd.DataFrame(rows, columns=["sample", "image", "tile", "row", "col"])


@register_proof("idefics3")
def proof_idefics3(vlm, batch):
    return vlm.model.model.connector, expected_rows(_connector_identities(vlm, batch), batch)


@register_proof("smolvlm")
def proof_smolvlm(vlm, batch):
    return vlm.model.model.connector, expected_rows(_connector_identities(vlm, batch), batch)
