"""Tiny and full-size LLaVA-1.5 models (random weights, offline), and the llava-family layout proof."""

from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from vtrlab.models.base import KIND_IMAGE

from .._common import LLAVA_CHAT_TEMPLATE, image_processor
from ..registry import register_full_size, register_proof, register_tiny
from ..tokenizer import byte_tokenizer


def llava_processor(image_size: int, patch: int, *, do_pad: bool = False, strategy: str = "default", n_cls: int = 1):
    tok = byte_tokenizer(["<image>"], image_token="<image>")
    ip = image_processor(
        "LlavaImageProcessor",
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_pad=do_pad,
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=n_cls,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def clip_llama_config(config_cls, tok, *, vision: dict, text: dict, **extra):
    """A LLaVA-family config of the released shape: a CLIP tower (quick_gelu) whose layer -2 feeds the
    projector ("default" strategy: [CLS] dropped) and a Llama LM with ``tok``'s special tokens.
    ``vision`` / ``text`` hold the sizes (``text`` may set ``vocab_size``; default: the tokenizer's)."""
    return config_cls(
        vision_config=CLIPVisionConfig(hidden_act="quick_gelu", **vision),
        text_config=LlamaConfig(
            **{"vocab_size": len(tok), "max_position_embeddings": 4096, **text},
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **extra,
    )


def build_tiny_llava(
    seed: int = 0, *, do_pad: bool = False, strategy: str = "default", image_size: int = 32, patch: int = 8
):
    """LLaVA-1.5 in miniature: CLIP 32px/8px patches (4x4 grid + [CLS]), 2-layer Llama."""
    processor = llava_processor(image_size, patch, do_pad=do_pad, strategy=strategy)
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=image_size,
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
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor


@register_tiny("llava")
def tiny_llava(seed: int):
    return build_tiny_llava(seed)


# the released LLaVA-1.5 / NeXT 7B shapes: CLIP ViT-L/14-336 and Vicuna-7B (Llama-2)
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
VICUNA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    rms_norm_eps=1e-5,
)


@register_full_size("llava-1.5-7b")
def full_llava_15_7b(dtype: torch.dtype, device: str):
    """llava-hf/llava-1.5-7b-hf shapes: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2), random weights."""
    processor = llava_processor(336, 14)
    config = clip_llama_config(LlavaConfig, processor.tokenizer, vision=CLIP_L_336, text=VICUNA_7B)
    return build_full(LlavaForConditionalGeneration, config, dtype, device), processor


def build_full(cls, config, dtype: torch.dtype, device: str):
    """Instantiate directly on ``device`` in ``dtype`` with random init (no CPU copy, no download)."""
    config._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def llava_family_proof(vlm, batch):
    """Projector output is (crops, features per crop, hidden) in vision-encoder order; the layout's
    vision table names the (crop, vpos) behind each LM token, so the expected row is
    crop * features_per_crop + vpos - dropped leading tokens."""
    adapter, model = vlm.adapter, vlm.model
    drop = adapter.features_drop_cls(model)
    expected = []
    for lay in batch.layouts:
        vis = lay.vision_table()
        n_vis = vis.groupby("crop").size()
        if n_vis.nunique() != 1:
            raise AssertionError("llava-family crops must all have the same number of vision tokens")
        per_crop = int(n_vis.iloc[0]) - drop
        patches = vis[(vis["kind"] == "patch") & (vis["row"] >= 0)]
        key = {
            (int(r.image), int(r.tile), int(r.row), int(r.col)): (int(r.crop), int(r.vpos))
            for r in patches.itertuples()
        }
        sel = lay.kind == KIND_IMAGE
        rows = []
        for j, t, r, c in zip(lay.image[sel], lay.tile[sel], lay.row[sel], lay.col[sel]):
            crop, vpos = key.get((int(j), int(t), int(r), int(c)), (-1, -1))
            rows.append(-1 if crop < 0 else crop * per_crop + vpos - drop)
        expected.append(np.asarray(rows, dtype=int))
    return adapter.projector(model), expected


register_proof("llava")(llava_family_proof)
