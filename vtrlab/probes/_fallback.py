"""A tiny LLaVA built directly from configs, for tests and `benchmarks/capture.py --tiny`.

Used only where ``vtrlab.testing`` (the adapters' helpers) is not available yet; the
layout is derived from where ``image_token_id`` sits in ``input_ids`` (never a fixed offset).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from vtrlab.models.base import KIND_IMAGE, Batch, FamilyAdapter, ImageLayout
from vtrlab.models.vlm import VLM


class TinyLlavaAdapter(FamilyAdapter):
    family = "llava"
    model_types = ("llava",)

    def lm_layers(self, model):
        return model.model.language_model.layers

    def vision_layers(self, model):
        return model.model.vision_tower.encoder.layers

    def projector(self, model):
        return model.model.multi_modal_projector

    def has_cls(self, model):
        return True


def tiny_llava(seed: int = 0, image_size: int = 32, patch: int = 8, layers: int = 3, heads: int = 4,
               kv_heads: int = 2, hidden: int = 64, vision_layers: int = 2, dtype=torch.float32,
               attn_implementation: str = "sdpa"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=127, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    return VLM(model=model, processor=None, adapter=TinyLlavaAdapter(), name="tiny-llava")


def tiny_llava_batch(vlm: VLM, n: int = 2, seed: int = 0, padding: str = "left", text_before: int = 3,
                     question_lengths=(5, 3)) -> Batch:
    """Token sequences ``<bos> t.. <image>*P q.. <eos>`` with different question lengths, padded."""
    cfg = vlm.model.config
    vc = cfg.vision_config
    side = vc.image_size // vc.patch_size
    n_img = side * side
    g = torch.Generator().manual_seed(seed)
    seqs, qspans = [], []
    for i in range(n):
        qlen = question_lengths[i % len(question_lengths)]
        pre = torch.randint(1, 100, (text_before,), generator=g).tolist()
        q = torch.randint(1, 100, (qlen,), generator=g).tolist()
        seqs.append(pre + [cfg.image_token_id] * n_img + q + [2])
        qspans.append((len(pre) + n_img, len(pre) + n_img + qlen))
    N = max(len(s) for s in seqs)
    ids = torch.zeros((n, N), dtype=torch.long)
    mask = torch.zeros((n, N), dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        off = N - len(s) if padding == "left" else 0
        ids[i, off:off + len(s)] = torch.tensor(s)
        mask[i, off:off + len(s)] = 1
        offsets.append(off)
    pixel_values = torch.randn((n, 3, vc.image_size, vc.image_size), generator=g).to(vlm.dtype)
    layouts = []
    for i in range(n):
        pos = np.flatnonzero(ids[i].numpy() == cfg.image_token_id)
        k = np.arange(len(pos))
        row, col = k // side, k % side
        px = vc.patch_size
        vis = pd.DataFrame({"crop": i, "vpos": np.arange(n_img + 1),
                            "kind": ["cls"] + ["patch"] * n_img, "image": 0, "tile": 0,
                            "row": np.r_[-1, row], "col": np.r_[-1, col],
                            "x0": np.r_[np.nan, col * px], "y0": np.r_[np.nan, row * px],
                            "x1": np.r_[np.nan, (col + 1) * px], "y1": np.r_[np.nan, (row + 1) * px]})
        layouts.append(ImageLayout(
            positions=pos, kind=np.array([KIND_IMAGE] * len(pos)), image=np.zeros(len(pos), int),
            tile=np.zeros(len(pos), int), row=row, col=col, x0=(col * px).astype(float), y0=(row * px).astype(float),
            x1=((col + 1) * px).astype(float), y1=((row + 1) * px).astype(float), seq_len=N,
            valid_positions=np.flatnonzero(mask[i].numpy()),
            question_positions=np.arange(*qspans[i]) + offsets[i],
            image_sizes=[(vc.image_size, vc.image_size)], grid_shapes={(0, 0): (side, side)}, vision=vis))
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}
    return Batch(inputs=inputs, layouts=layouts, images=[[None] for _ in range(n)], prompts=[""] * n).to(vlm.device)
