"""The organism's architecture: LLaVA = CLIP vision tower (with [CLS]) + projector + Llama LM."""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from vtrlab.organism.processor import GRID, IMAGE_SIZE, PATCH_SIZE
from vtrlab.organism.tokenizer import BOS, END, IMAGE, PAD, organism_vocab

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6)


def build_config(vision: dict | None = None, text: dict | None = None) -> LlavaConfig:
    vocab = organism_vocab()
    ids = {t: vocab.index(t) for t in (BOS, END, IMAGE, PAD)}
    vision_config = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, projection_dim=VISION["hidden_size"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, **{**VISION, **(vision or {})})
    t = {**TEXT, **(text or {})}
    text_config = LlamaConfig(
        vocab_size=len(vocab), max_position_embeddings=512, num_key_value_heads=t["num_attention_heads"],
        rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=ids[BOS], eos_token_id=ids[END], pad_token_id=ids[PAD], **t)
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=ids[IMAGE],
        image_seq_length=GRID * GRID, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=False)
