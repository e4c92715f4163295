"""The organism's architecture: LLaVA = CLIP vision tower (with [CLS]) + projector + Llama LM, and
the micro-CLIP it was pretrained in (the same tower, a small text encoder, two projections)."""

from __future__ import annotations

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

from vtrlab.organism.processor import GRID, IMAGE_SIZE, PATCH_SIZE
from vtrlab.organism.tokenizer import BOS, END, IMAGE, PAD, organism_vocab

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=8, num_attention_heads=6)
CLIP_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
CLIP_PROJECTION = 128
CAPTION_MAX_TOKENS = 96  # text-encoder positions; the longest caption (8 objects) is ~50 tokens


def _ids() -> dict[str, int]:
    vocab = organism_vocab()
    return {t: vocab.index(t) for t in (BOS, END, IMAGE, PAD)}


def vision_config(vision: dict | None = None) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=CLIP_PROJECTION,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        **{**VISION, **(vision or {})},
    )


def build_config(vision: dict | None = None, text: dict | None = None) -> LlavaConfig:
    ids = _ids()
    t = {**TEXT, **(text or {})}
    text_config = LlamaConfig(
        vocab_size=len(organism_vocab()),
        max_position_embeddings=512,
        num_key_value_heads=t["num_attention_heads"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[END],
        pad_token_id=ids[PAD],
        **t,
    )
    return LlavaConfig(
        vision_config=vision_config(vision),
        text_config=text_config,
        image_token_index=ids[IMAGE],
        image_seq_length=GRID * GRID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def build_clip_config(vision: dict | None = None, text: dict | None = None) -> CLIPConfig:
    """The micro-CLIP: the organism's vision tower + a small causal text encoder pooled at <|end|>."""
    ids = _ids()
    text_config = CLIPTextConfig(
        vocab_size=len(organism_vocab()),
        max_position_embeddings=CAPTION_MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=CLIP_PROJECTION,
        layer_norm_eps=1e-5,
        bos_token_id=ids[BOS],
        eos_token_id=ids[END],
        pad_token_id=ids[PAD],
        **{**CLIP_TEXT, **(text or {})},
    )
    return CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config(vision).to_dict(), projection_dim=CLIP_PROJECTION
    )
