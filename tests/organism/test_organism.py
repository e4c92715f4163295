"""The organism: tokenizer, processor, architecture, the training fast path against HF's own
forward, and the bundled trained model against its card (data/models/organism/eval.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vtrlab.data.synthetic import FAMILIES, generate, make_sample
from vtrlab.organism.processor import user_message

BUNDLE = Path(__file__).resolve().parents[2] / "data" / "models" / "organism"


@pytest.fixture(scope="module")
def random_organism():
    from vtrlab.organism.build import build_random

    return build_random(0)


def test_tokenizer_covers_every_question_and_answer(random_organism):
    _, proc = random_organism
    tok = proc.tokenizer
    for s in generate(60, seed=5):
        ids = tok(f"{s.question} {s.answer}", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (s.question, s.answer)
        assert tok.decode(tok(s.answer, add_special_tokens=False)["input_ids"]) == s.answer
    # reading answers are spelled with continuation pieces and decode without spaces
    assert tok.convert_ids_to_tokens(tok("qxz", add_special_tokens=False)["input_ids"]) == ["q", "##x", "##z"]


def test_architecture_matches_the_brief(random_organism):
    model, _ = random_organism
    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    assert type(model.model.vision_tower).__name__.startswith("CLIPVision")
    assert cfg.vision_feature_select_strategy == "default"  # CLIP has a [CLS] that LLaVA drops
    assert (v.image_size // v.patch_size) ** 2 == 256 and cfg.image_seq_length == 256
    assert v.num_hidden_layers >= 4 and t.num_hidden_layers >= 6 and t.num_attention_heads >= 4
    n = sum(p.numel() for p in model.parameters())
    assert n * 4 < 50e6


def test_prompt_layout_and_image_tokens(random_organism):
    _, proc = random_organism
    s = make_sample(0, 0, "color")
    text = proc.apply_chat_template(user_message(s.question), add_generation_prompt=True)
    assert text == f"<s><|user|> {s.question} <image><|end|><|assistant|>"
    batch = proc(images=[s.image], text=[text], return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 256
    assert tuple(batch["pixel_values"].shape) == (1, 3, 128, 128)
    with pytest.raises(Exception, match="unknown role"):
        proc.apply_chat_template([{"role": "robot", "content": "hi"}])


def test_training_fast_path_equals_hf_forward(random_organism):
    """Oracle: the training step's own token ids, pixels and logits equal what the processor and
    LlavaForConditionalGeneration.forward produce."""
    from vtrlab.organism.dataset import build_set
    from vtrlab.organism.train import answer_logits, pixel_values, tower_features

    model, proc = random_organism
    data = build_set(1, seed=9, processor=proc)
    samples = [make_sample(9, 0, f) for f in FAMILIES]
    texts = [
        proc.apply_chat_template(
            user_message(s.question) + [{"role": "assistant", "content": [{"type": "text", "text": s.answer}]}]
        )
        for s in samples
    ]
    proc.tokenizer.padding_side = "right"
    try:
        ref = proc(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    finally:
        proc.tokenizer.padding_side = "left"
    length = ref["input_ids"].shape[1]
    assert torch.equal(ref["input_ids"], data.input_ids[:, :length])
    assert torch.allclose(ref["pixel_values"], pixel_values(data.pixels, proc), atol=1e-6)
    with torch.no_grad():
        hf = model(**ref).logits
        feats = tower_features(model, ref["pixel_values"])
        logits, target, sel = answer_logits(model, feats, data.input_ids, data.attention_mask, data.labels)
    assert torch.allclose(logits, hf[:, :-1][sel[:, : length - 1]], atol=1e-4)
    assert torch.equal(target, data.input_ids[:, 1:][sel])


def test_patch_targets_follow_the_object_map():
    from vtrlab.data.synthetic import COLOR_NAMES, SHAPES
    from vtrlab.organism.dataset import patch_targets

    s = make_sample(2, 1, "count")
    t = patch_targets(s)
    for o in s.objects:
        cx, cy = int(o.center[0] // 8), int(o.center[1] // 8)
        k = cy * 16 + cx
        assert t["shape"][k] == SHAPES.index(o.shape) + 1 and t["color"][k] == COLOR_NAMES.index(o.color) + 1
        assert t["centre"][k] == SHAPES.index(o.shape) + 1
        assert np.allclose(t["obj_xy"][k], (o.center[0] / 128, o.center[1] / 128))
    assert ((t["shape"] > 0) == t["on_object"]).all()
    assert np.allclose(t["own_rc"][17], (1 / 15, 1 / 15))


@pytest.mark.parametrize("index", range(6))
def test_referent_targets_mark_the_two_named_shapes(index):
    """Recomputed from the rendering: role 1 / 2 are exactly the patches owned by the shape the
    question names first / second, and their union lies inside the relevance mask."""
    from vtrlab.data.synthetic import SHAPES
    from vtrlab.organism.dataset import MIN_PIXELS, referent_targets

    s = make_sample(7, index, "relation")
    t = referent_targets(s)
    assert t["ref_on"]
    a, b = [w for w in s.question.split() if w in SHAPES]
    for role, name in ((1, a), (2, b)):
        obj = next(o for o in s.objects if o.shape == name)
        own = (s.object_map == obj.index).reshape(16, 8, 16, 8).sum(axis=(1, 3)).ravel()
        assert (t["ref_role"] == role).sum() > 0
        assert (own[t["ref_role"] == role] >= MIN_PIXELS).all()
        assert np.allclose(t["ref_xy"][2 * role - 2 : 2 * role], (obj.center[0] / 128, obj.center[1] / 128))
    assert s.relevance.ravel()[t["ref_role"] > 0].all()
    other = referent_targets(make_sample(7, index, "color"))
    assert not other["ref_on"] and not other["ref_role"].any()


def test_referent_loss_reads_the_hf_hidden_states(random_organism):
    """Oracle: the hidden states the referent heads read equal LlavaForConditionalGeneration's
    output_hidden_states; the last prompt token is the one before the answer."""
    from vtrlab.organism.dataset import build_set
    from vtrlab.organism.train import ReferentHeads, TrainConfig, answer_forward, pixel_values, tower_features

    model, proc = random_organism
    data = build_set(1, seed=3, processor=proc)
    pix = pixel_values(data.pixels, proc)
    with torch.no_grad():
        feats = tower_features(model, pix)
        _, _, sel, hidden = answer_forward(
            model, feats, data.input_ids, data.attention_mask, data.labels, layers=(2, 4)
        )
        hf = model(
            input_ids=data.input_ids,
            attention_mask=data.attention_mask.long(),
            pixel_values=pix,
            output_hidden_states=True,
        ).hidden_states
    for k in (2, 4):
        assert torch.allclose(hidden[k], hf[k], atol=1e-5)
    last = sel.float().argmax(1)
    first_answer = (data.labels != -100).float().argmax(1)
    assert torch.equal(last + 1, first_answer)
    cfg = TrainConfig(ref_weight=1.0)
    loss, parts = ReferentHeads(model.config.text_config.hidden_size).loss(
        hidden, data.input_ids == model.config.image_token_id, last, data.targets, cfg, metrics=True
    )
    assert loss.item() > 0 and {"ref_xy", "ref_role"} <= set(parts)


def test_train_smoke_and_bundle_roundtrip(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtrlab.organism.train import train_organism

    out = tmp_path / "org"
    rec = train_organism(
        out,
        device="cpu",
        n_train_per_family=2,
        n_val_per_family=1,
        tower_steps=1,
        tower_rounds=1,
        frozen_steps=1,
        joint_steps=1,
        batch_size=2,
        eval_n=0,
        workers=1,
        log_every=1,
        eval_every=1000,
    )
    assert rec["steps"] == {"tower": [1], "frozen": 1, "joint": 1}
    LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    with pytest.raises(ValueError, match="unknown training option 'lr'"):
        train_organism(out, lr=1.0)


# --- the bundled, trained organism ---------------------------------------------------------


@pytest.fixture(scope="module")
def bundle():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(min(2, torch.get_num_threads()))
    proc = AutoProcessor.from_pretrained(BUNDLE, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(BUNDLE, local_files_only=True).eval()
    return model, proc


def test_bundle_reaches_its_card(bundle):
    """>= 90% of the card's held-out accuracy on the first 16 held-out samples of each family."""
    from vtrlab.organism.evaluate import evaluate

    card = json.loads((BUNDLE / "eval.json").read_text())
    res = evaluate(*bundle, n=16, seed=card["seed"], batch_size=16, blank=False, progress=False)
    for fam in FAMILIES:
        assert res["families"][fam]["accuracy"] >= 0.9 * card["families"][fam]["accuracy"], (fam, res["families"][fam])


def test_bundle_batched_left_padding_equals_one_by_one(bundle):
    from vtrlab.organism.evaluate import answer

    model, proc = bundle
    ss = [make_sample(0, 3, f) for f in ("count", "relation", "reading")]
    images, qs = [s.image for s in ss], [s.question for s in ss]
    batched = answer(model, proc, images, qs, batch_size=8)
    single = [answer(model, proc, [im], [q])[0] for im, q in zip(images, qs)]
    assert batched == single
    assert proc.tokenizer.padding_side == "left"


def test_card_is_rendered_from_its_records():
    """The model card's numbers come from eval.json and the training records beside it:
    the committed README is exactly what ``python -m vtrlab.organism.card`` renders."""
    from vtrlab.organism.card import render

    assert (BUNDLE / "README.md").read_text() == render(BUNDLE)
