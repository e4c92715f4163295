"""How LLaVA-like are the organism's insides? The measurements of issue 10's realism table.

Measured on a trained bundle with plain transformers (eager attention, one sample at a time, no
padding), on held-out samples (data seed 0), and written to ``realism.json`` beside the bundle;
the model card renders its table from that record. Quantities:

- per LM layer, the share of the last prompt row's attention (the token that predicts the answer)
  on the first token (<s>), the rest of the system prompt, the image tokens, the question words and
  the template tail (<|end|><|assistant|>, the row itself included); the shares sum to 1;
- per LM layer, the Spearman correlation of that row's attention over the image tokens with their
  raster index (positive: later, lower tokens get more);
- per LM layer, the share of the question words' attention that goes to the image tokens;
- in the vision tower (last layer), how concentrated [CLS]'s attention over the patches is (share of
  its top 1% / top 10% of patches), and per layer the patch tokens whose hidden-state norm exceeds
  ``HIGH_NORM`` times the median of their picture, and the share of [CLS] attention they take;
- whether image tokens' hidden states depend on the question: the largest relative change of any
  image token's hidden state, over all LM layers, when the question of a sample is replaced by
  another family's question (with the image first and causal attention, it must be 0).

Usage: ``vtrlab organism realism [BUNDLE] [--n 120]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from vtrlab.data.synthetic import FAMILIES, generate
from vtrlab.io import atomic_write_text

HIGH_NORM = 5.0  # a "high-norm" token: norm > HIGH_NORM x the median norm of its picture (Darcet et al.)
SEED = 0  # held-out data


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    rx -= rx.mean()
    ry -= ry.mean()
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def token_roles(input_ids: list[int], tokenizer, image_token_id: int) -> dict[str, np.ndarray]:
    """Positions of the prompt's parts: first (<s>), system (after <s>, up to the image), image,
    question (after the image, up to <|end|>), tail (<|end|><|assistant|>)."""
    ids = np.asarray(input_ids)
    img = np.nonzero(ids == image_token_id)[0]
    if len(img) == 0:
        raise ValueError("the prompt holds no image token")
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    after = np.arange(img[-1] + 1, len(ids))
    q_end = after[ids[after] == end_id][0]
    pos = np.arange(len(ids))
    return {
        "first": pos[:1],
        "system": pos[1 : img[0]],
        "image": img,
        "question": pos[img[-1] + 1 : q_end],
        "tail": pos[q_end:],
    }


def _load(path, device="cpu"):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").to(device).eval()
    return model, processor


@torch.no_grad()
def measure(model, processor, n: int = 120, seed: int = SEED) -> dict:
    """The realism record of one model (see the module docstring); ``n`` samples, families cycled."""
    from vtrlab.organism.processor import user_message

    samples = generate(n, seed)
    image_id = model.config.image_token_id
    n_layers = model.config.text_config.num_hidden_layers
    n_vis = model.config.vision_config.num_hidden_layers
    roles = ("first", "system", "image", "question", "tail")
    share = {r: np.zeros((n, n_layers)) for r in roles}
    spear = np.zeros((n, n_layers))
    q2img = np.zeros((n, n_layers))
    cls_top1, cls_top10 = np.zeros(n), np.zeros(n)
    hn_count = np.zeros((n, n_vis))
    hn_cls = np.full((n, n_vis), np.nan)
    norm_ratio = np.zeros((n, n_vis))
    dep = np.zeros(n)
    for i, s in enumerate(samples):
        text = processor.apply_chat_template(user_message(s.question), add_generation_prompt=True)
        inputs = processor(images=[s.image], text=[text], return_tensors="pt")
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        ids = inputs["input_ids"][0].tolist()
        pos = token_roles(ids, processor.tokenizer, image_id)
        img = pos["image"]
        for layer, att in enumerate(out.attentions):  # (1, heads, L, L)
            a = att[0].float().mean(0).numpy()  # mean over heads
            last = a[-1]
            for r in roles:
                share[r][i, layer] = last[pos[r]].sum()
            spear[i, layer] = _spearman(last[img], np.arange(len(img)))
            q = a[pos["question"]]
            q2img[i, layer] = (q[:, img].sum(1) / q.sum(1)).mean()
        # the tower: [CLS] attention (last layer) and high-norm tokens (every layer's output)
        vis = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        cls = vis.attentions[-1][0].float().mean(0)[0, 1:].numpy()  # [CLS] row over the patches
        cls = cls / cls.sum()
        srt = np.sort(cls)[::-1]
        cls_top1[i] = srt[: max(1, len(srt) // 100)].sum()
        cls_top10[i] = srt[: max(1, len(srt) // 10)].sum()
        for layer in range(n_vis):
            h = vis.hidden_states[layer + 1][0, 1:].float()  # patches after layer `layer`
            norms = h.norm(dim=-1).numpy()
            med = np.median(norms)
            high = norms > HIGH_NORM * med
            hn_count[i, layer] = high.sum()
            norm_ratio[i, layer] = norms.max() / med
            if layer < len(vis.attentions) and high.any():
                c = vis.attentions[layer][0].float().mean(0)[0, 1:].numpy()
                hn_cls[i, layer] = c[high].sum() / c.sum()
        # the same picture with another family's question: image tokens' states must not change
        other = next(t for t in generate(len(FAMILIES), seed + 1) if t.family != s.family)
        text2 = processor.apply_chat_template(user_message(other.question), add_generation_prompt=True)
        out2 = model(**processor(images=[s.image], text=[text2], return_tensors="pt"), output_hidden_states=True)
        ids2 = processor(images=[s.image], text=[text2], return_tensors="pt")["input_ids"][0].tolist()
        img2 = token_roles(ids2, processor.tokenizer, image_id)["image"]
        worst = 0.0
        for h1, h2 in zip(out.hidden_states, out2.hidden_states):
            a, b = h1[0, img].float(), h2[0, img2].float()
            worst = max(worst, float(((a - b).norm(dim=-1) / a.norm(dim=-1).clamp(min=1e-12)).max()))
        dep[i] = worst

    def mean(x):
        return [round(float(v), 4) for v in np.nanmean(x, axis=0)]

    return {
        "n_samples": n,
        "seed": seed,
        "families": list(FAMILIES),
        "high_norm_factor": HIGH_NORM,
        "lm_layers": n_layers,
        "vision_layers": n_vis,
        "last_row_share": {r: mean(share[r]) for r in roles},
        "last_row_spearman_raster": mean(spear),
        "question_to_image_share": mean(q2img),
        "cls_attention_top1pct": round(float(cls_top1.mean()), 4),
        "cls_attention_top10pct": round(float(cls_top10.mean()), 4),
        "cls_attention_uniform_top1pct": round(max(1, 256 // 100) / 256, 4),
        "high_norm_tokens_per_image": mean(hn_count),
        "max_norm_over_median": mean(norm_ratio),
        "max_norm_over_median_max": [round(float(v), 3) for v in norm_ratio.max(0)],
        "high_norm_cls_share": [None if np.isnan(v) else round(float(v), 4) for v in np.nanmean(hn_cls, axis=0)]
        if np.isfinite(hn_cls).any()
        else [None] * n_vis,
        "image_state_question_dependence_max": float(f"{dep.max():.3g}"),
    }


def write_realism(path: str | os.PathLike = "data/models/organism", n: int = 120, device: str = "cpu") -> Path:
    """Measure a bundle and write ``realism.json`` beside it (atomically)."""
    path = Path(path)
    model, processor = _load(path, device)
    rec = measure(model, processor, n=n)
    rec["command"] = f"vtrlab organism realism {path} --n {n}"
    return atomic_write_text(path / "realism.json", json.dumps(rec, indent=1) + "\n")
