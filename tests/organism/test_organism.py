"""The organism: tokenizer, processor, architecture, the training fast paths against HF's own
forwards (LLaVA and CLIP), the resumable recipe, the realism measurements, and the bundled trained
model against its card (data/models/organism/eval.json)."""

from __future__ import annotations

import json
import math
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


def test_tokenizer_covers_every_question_answer_and_caption(random_organism):
    from vtrlab.organism.tokenizer import CAPTION_PROMPT, SYSTEM_PROMPT

    _, proc = random_organism
    tok = proc.tokenizer
    for s in generate(60, seed=5):
        ids = tok(f"{s.question} {s.answer} {s.caption} {SYSTEM_PROMPT} {CAPTION_PROMPT}", add_special_tokens=False)[
            "input_ids"
        ]
        assert tok.unk_token_id not in ids, (s.question, s.answer, s.caption)
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
    assert v.num_hidden_layers >= 4 and t.num_hidden_layers >= 8 and t.num_attention_heads >= 4
    n = sum(p.numel() for p in model.parameters())
    assert n * 4 < 50e6


def test_prompt_is_system_then_image_then_question(random_organism):
    from vtrlab.organism.tokenizer import SYSTEM_PROMPT

    _, proc = random_organism
    s = make_sample(0, 0, "color")
    text = proc.apply_chat_template(user_message(s.question), add_generation_prompt=True)
    assert text == f"<s><|system|> {SYSTEM_PROMPT}<|end|><|user|><image> {s.question}<|end|><|assistant|>"
    own = [{"role": "system", "content": "be brief"}] + user_message(s.question)
    assert proc.apply_chat_template(own).startswith("<s><|system|> be brief<|end|><|user|><image>")
    batch = proc(images=[s.image], text=[text], return_tensors="pt")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 256
    assert tuple(batch["pixel_values"].shape) == (1, 3, 128, 128)
    with pytest.raises(Exception, match="unknown role"):
        proc.apply_chat_template([{"role": "robot", "content": "hi"}])


def _right_padded(proc, texts, images=None):
    proc.tokenizer.padding_side = "right"
    try:
        if images is None:
            return proc.tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        return proc(images=images, text=texts, return_tensors="pt", padding=True)
    finally:
        proc.tokenizer.padding_side = "left"


def test_training_fast_path_equals_hf_forward(random_organism):
    """Oracle: the training steps' own token ids (answer, caption, text sequences), pixels and
    logits equal what the processor and LlavaForConditionalGeneration.forward produce."""
    from vtrlab.organism.dataset import build_set
    from vtrlab.organism.tokenizer import CAPTION_PROMPT
    from vtrlab.organism.train import answer_logits, pixel_values, tower_features

    model, proc = random_organism
    data = build_set(1, seed=9, processor=proc)
    samples = [make_sample(9, 0, f) for f in FAMILIES]
    images = [s.image for s in samples]

    def chat(q, a):
        answer = {"role": "assistant", "content": [{"type": "text", "text": a}]}
        return proc.apply_chat_template(user_message(q) + [answer])

    for kind, texts in (
        ("answer", [chat(s.question, s.answer) for s in samples]),
        ("caption", [chat(CAPTION_PROMPT, s.caption) for s in samples]),
    ):
        ref = _right_padded(proc, texts, images)
        seq = data.seqs[kind]
        length = ref["input_ids"].shape[1]
        assert torch.equal(ref["input_ids"], seq.ids[:, :length]) and not seq.mask[:, length:].any()
        assert torch.allclose(ref["pixel_values"], pixel_values(data.pixels, proc), atol=1e-6)
        with torch.no_grad():
            hf = model(**ref).logits
            feats = tower_features(model, ref["pixel_values"])
            logits, target, sel = answer_logits(model, feats, seq.ids, seq.mask, seq.labels)
        assert torch.allclose(logits, hf[:, :-1][sel[:, : length - 1]], atol=1e-4)
        assert torch.equal(target, seq.ids[:, 1:][sel])
        # labels: exactly the answer (or caption) and <|end|>
        ans = [
            proc.tokenizer(" " + (s.answer if kind == "answer" else s.caption), add_special_tokens=False)["input_ids"]
            for s in samples
        ]
        assert [seq.labels[i][seq.labels[i] != -100].tolist() for i in range(len(samples))] == [
            a + [proc.tokenizer.eos_token_id] for a in ans
        ]
    # text: the chat format with the caption in place of the picture, every token labelled
    conv = [
        [
            {"role": "user", "content": [{"type": "text", "text": f"{s.caption} . {s.question}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": s.answer}]},
        ]
        for s in samples
    ]
    ref = _right_padded(proc, [proc.apply_chat_template(c) for c in conv])
    seq = data.seqs["text"]
    assert torch.equal(ref["input_ids"], seq.ids[:, : ref["input_ids"].shape[1]])
    assert torch.equal(seq.labels[seq.mask], seq.ids[seq.mask]) and (seq.labels[~seq.mask] == -100).all()


def test_clip_loss_equals_hf_clip_forward(random_organism):
    """Oracle: the contrastive logits of the training step equal CLIPModel.forward's logits_per_image
    when the CLIP's vision model holds the LLaVA tower's weights."""
    from transformers import CLIPModel

    from vtrlab.organism.config import build_clip_config
    from vtrlab.organism.dataset import build_set
    from vtrlab.organism.train import clip_loss, pixel_values, tower_forward

    model, proc = random_organism
    torch.manual_seed(0)
    clip = CLIPModel(build_clip_config()).eval()
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    data = build_set(1, seed=4, processor=proc)
    pix = pixel_values(data.pixels, proc)
    s = data.seqs["clip"]
    with torch.no_grad():
        _, pooled = tower_forward(model, pix)
        loss, logits = clip_loss(clip, pooled, s.ids, s.mask)
        ref = clip(input_ids=s.ids, attention_mask=s.mask.long(), pixel_values=pix)
    assert torch.allclose(logits, ref.logits_per_image, atol=1e-4)
    target = torch.arange(len(logits))
    expected = (
        torch.nn.functional.cross_entropy(ref.logits_per_image, target)
        + torch.nn.functional.cross_entropy(ref.logits_per_text, target)
    ) / 2
    assert torch.allclose(loss, expected, atol=1e-4)
    # pooled at <|end|>: the text encoder's eos id is <|end|>, not the BOS-like legacy argmax
    assert clip.config.text_config.eos_token_id == proc.tokenizer.eos_token_id


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


def test_train_checkpoints_resumes_and_saves(tmp_path):
    """A call whose budget is spent checkpoints and reports not finished; --resume continues and
    saves a bundle (LLaVA + micro-CLIP sharing the tower's weights) with its record."""
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    from vtrlab.organism.train import train_organism

    out = tmp_path / "org"
    small = dict(
        device="cpu",
        n_train_per_family=2,
        n_instruct_per_family=1,
        n_val_per_family=1,
        clip_steps=1,
        text_steps=1,
        align_steps=1,
        instruct_steps=2,
        batch_size=2,
        eval_n=1,
        workers=1,
        log_every=1,
        eval_every=1000,
    )
    rec = train_organism(out, max_minutes=0.0, **small)  # budget spent before the first step
    assert rec["finished"] is False and rec["calls"][-1]["stopped_at"] == {"stage": "clip", "step": 0}
    assert (tmp_path / "org.ckpt" / "state.pt").is_file() and not out.exists()
    rec = train_organism(out, resume=True, max_minutes=60.0)
    assert rec["finished"] is True and len(rec["calls"]) == 2 and rec["calls"][1]["resumed"]
    # every call instructs on fresh samples of its own data seed, weight-scaled per family
    assert rec["calls"][1]["instruct_data_seed"] == rec["config"]["instruct_seed"] + 1
    assert rec["calls"][1]["instruct_samples"] == sum(
        round(rec["config"]["family_weights"].get(f, 1.0)) for f in FAMILIES
    )
    assert {k: v["steps_done"] for k, v in rec["stages"].items()} == {"clip": 1, "text": 1, "align": 1, "instruct": 2}
    model = LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    clip = CLIPModel.from_pretrained(out / "clip")
    for k, v in model.model.vision_tower.state_dict().items():
        assert torch.equal(v, clip.vision_model.state_dict()[k]), k
    saved = json.loads((out / "train_record.json").read_text())
    assert saved["finished"] and set(json.loads((out / "eval.json").read_text())["families"]) == set(FAMILIES)
    with pytest.raises(ValueError, match="unknown training option 'lr'"):
        train_organism(out, lr=1.0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_organism(tmp_path / "other", resume=True)


def test_realism_on_random_organism(random_organism):
    """Shares of the last row sum to 1; image states cannot depend on the question (image first,
    causal attention); roles partition the prompt; Spearman equals scipy's."""
    from scipy.stats import spearmanr
    from transformers import LlavaForConditionalGeneration

    from vtrlab.organism.realism import _spearman, measure, token_roles

    model, proc = random_organism
    eager = LlavaForConditionalGeneration._from_config(model.config, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    rec = measure(eager.eval(), proc, n=2)
    total = np.sum([rec["last_row_share"][r] for r in rec["last_row_share"]], axis=0)
    assert np.allclose(total, 1.0, atol=1e-4)
    assert rec["image_state_question_dependence_max"] < 1e-4
    text = proc.apply_chat_template(user_message("what color is the circle ?"), add_generation_prompt=True)
    ids = proc(images=[make_sample(0, 0, "color").image], text=[text])["input_ids"][0]
    pos = token_roles(ids, proc.tokenizer, model.config.image_token_id)
    assert sorted(np.concatenate(list(pos.values())).tolist()) == list(range(len(ids)))
    assert len(pos["image"]) == 256
    assert proc.tokenizer.decode([ids[i] for i in pos["question"]]) == "what color is the circle?"
    x, y = np.random.default_rng(0).normal(size=(2, 50))
    assert math.isclose(_spearman(x, y), spearmanr(x, y).statistic, abs_tol=1e-12)


# --- the bundled, trained organism ---------------------------------------------------------


@pytest.fixture(scope="module")
def bundle():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(min(2, torch.get_num_threads()))
    proc = AutoProcessor.from_pretrained(BUNDLE, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(BUNDLE, local_files_only=True).eval()
    return model, proc


def test_bundle_reaches_its_card(bundle):
    """On the first 16 held-out samples of each family, accuracy within 3 binomial standard errors
    of the card's (eval.json, 500 per family)."""
    from vtrlab.organism.evaluate import evaluate

    card = json.loads((BUNDLE / "eval.json").read_text())
    n = 16
    res = evaluate(*bundle, n=n, seed=card["seed"], batch_size=16, blank=False, progress=False)
    for fam in FAMILIES:
        p = card["families"][fam]["accuracy"]
        floor = p - 3 * math.sqrt(p * (1 - p) / n) - 1e-9
        assert res["families"][fam]["accuracy"] >= floor, (fam, res["families"][fam])


def test_bundle_batched_left_padding_equals_one_by_one(bundle):
    from vtrlab.organism.evaluate import answer

    model, proc = bundle
    ss = [make_sample(0, 3, f) for f in ("count", "position", "reading")]
    images, qs = [s.image for s in ss], [s.question for s in ss]
    batched = answer(model, proc, images, qs, batch_size=8)
    single = [answer(model, proc, [im], [q])[0] for im, q in zip(images, qs)]
    assert batched == single
    assert proc.tokenizer.padding_side == "left"


def test_bundle_is_small_and_sharded():
    files = list(BUNDLE.rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= 50e6
    assert all(f.stat().st_size <= 16e6 for f in files)


def test_card_is_rendered_from_its_records():
    """The model card's numbers come from eval.json and the records beside it: the committed
    README is exactly what ``vtrlab organism card`` renders."""
    from vtrlab.organism.card import render

    assert (BUNDLE / "README.md").read_text() == render(BUNDLE)
