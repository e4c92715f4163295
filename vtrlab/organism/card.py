"""Render the organism's model card (README.md) from the files that hold its numbers:
eval.json (held-out accuracy), train_record_stage*.json (recipe as run) and, if present,
benchmarks/results/organism_forward.json. ``python -m vtrlab.organism.card [BUNDLE]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vtrlab.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]

STAGE1 = ("python -m vtrlab.organism.train --out runs/organism-stage1 --image-first false "
          "--tower-steps 2000 --tower-rounds 2 --frozen-steps 472 --joint-steps 1328 --max-minutes 60")
STAGE2 = ("python -m vtrlab.organism.train --out runs/organism --init-from runs/organism-stage1 --image-first false "
          "--tower-steps 0 --frozen-steps 0 --joint-steps 1947 --aux-weight 0 --lr-tower-joint 3e-5 "
          "--lr-lm 6e-4 --n-train-per-family 12000 --eval-n 0 --max-minutes 60")

TARGETS = {"color": 0.98, "shape": 0.98, "count": 0.98, "reading": 0.98, "relation": 0.90}  # issue 3


STAGE3 = ("python -m vtrlab.organism.train --out runs/organism-stage3 --init-from runs/organism --image-first false "
          "--tower-steps 0 --frozen-steps 3033 --joint-steps 0 --lr-lm 5e-4 --batch-size 32 --n-train-per-family 6000 "
          "--n-val-per-family 64 --eval-every 200 --log-every 50 --eval-n 0 --ref-weight 1 --max-minutes 76 "
          "--reserve-seconds 60 --workers 2 --family-weights color=0.5,shape=0.5,count=1,relation=4,reading=1.5 "
          "--device cpu")
STAGE4 = ("python -m vtrlab.organism.train --out runs/organism-stage4 --init-from runs/organism-stage3 --image-first false "
          "--tower-steps 0 --frozen-steps {steps} --joint-steps 0 --lr-lm 2e-4 --batch-size 32 --n-train-per-family 6000 "
          "--n-val-per-family 64 --eval-every 200 --log-every 50 --eval-n 0 --ref-weight 1 --max-minutes 24 "
          "--reserve-seconds 45 --workers 2 --seed 1 --family-weights color=0.5,shape=0.5,count=2,relation=1,reading=2 "
          "--device cpu")


def _val_trajectory(record: dict, family: str) -> str:
    return ", ".join(f"{e['step']}: {e['val'][family]:.2f}" for e in record["log"] if "val" in e and "step" in e)


def _planned(record: dict, stage: str = "frozen") -> tuple[int, int | None]:
    """(steps the cosine schedule was fitted to, step at which the wall-time limit cut the stage)."""
    planned = next((e["fitted_steps"] for e in record["log"] if e.get("stage") == stage and "fitted_steps" in e),
                   record["config"][f"{stage}_steps"])
    cut = next((e["step"] for e in record["log"] if e.get("stage") == stage and e.get("cut_short")), None)
    return planned, cut


def referent_section(s3: dict | None, s4: dict | None) -> str:
    """Stages 3 and 4 (relation made learnable by referent supervision), from their records."""
    if s3 is None:
        return ""
    log = [e for e in s3["log"] if "step" in e and "ref_xy" in e]
    hops = next((e["step"] for e in log if e.get("ref_role_acc", 0) >= 0.99), None)
    jump = next((e["step"] for e in s3["log"] if "val" in e and "step" in e and e["val"]["relation"] >= 0.9), None)
    planned3, cut3 = _planned(s3)
    text = f"""Stage 3 (`train_record_stage3.json`, CPU, 2 cores, {s3['train_seconds'] / 60:.0f} min): continued from stage 2 with the
**tower frozen** (the selector in `selector/` stays valid: vision features are unchanged) and
**referent supervision** of the LM on relation questions ("is the A left of the B ?", `--ref-weight 1`):
a linear head reads, at LM layer {s3['config']['ref_role_layer']}, which image tokens belong to A, to B or to neither
(class-weighted cross-entropy over the generator's object map), and another reads A's and B's
centres from the last prompt token (the one predicting the answer) at layer {s3['config']['ref_xy_layer']} (regression).
Batch {s3['config']['batch_size']}, LM lr {s3['config']['lr_lm']:g}, families color 0.5, shape 0.5, count 1, relation 4, reading 1.5; the
cosine schedule was fitted to {planned3} steps and the wall-time limit stopped the stage after
{s3['steps']['frozen'] if cut3 is None else cut3} (`--max-minutes` is generous in the command below, so it runs all {planned3}).

- The two hops were learned first (A/B patch accuracy >= 0.99 from step {hops}, centre error ~{(log[-1]['ref_xy'] / 10) ** 0.5 * 128:.0f} px at the end).
- The yes/no answer then stayed at chance for a long time and jumped late: validation relation by step
  {_val_trajectory(s3, 'relation')} (first >= 0.9 at step {jump}).
- The other families dipped meanwhile (validation count by step: {_val_trajectory(s3, 'count')}).
"""
    if s4 is not None:
        planned4, cut4 = _planned(s4)
        text += f"""
Stage 4 (`train_record_stage4.json`, CPU, {s4['train_seconds'] / 60:.0f} min): the same set-up from stage 3 at LM lr {s4['config']['lr_lm']:g}, families
color 0.5, shape 0.5, count 2, relation 1, reading 2 (batch order seed {s4['config']['seed']}), {s4['steps']['frozen']} steps
(schedule fitted to {planned4}), to win back count and reading. Validation at its end:
{', '.join(f"{k} {v:.2f}" for k, v in s4['val'].items())}.
"""
    return text


def target_lines(ev: dict) -> str:
    """One line per family: accuracy against the issue's target, computed from eval.json."""
    out = []
    for fam, r in ev["families"].items():
        goal = TARGETS.get(fam)
        if goal is None:
            continue
        n = ev["n_per_family"]
        wrong = round((1 - r["accuracy"]) * n)
        verdict = "met" if r["accuracy"] >= goal else "**not met**"
        out.append(f"- {fam}: {r['accuracy']:.3f} ({wrong} of {n} wrong) against >= {goal:.2f}: {verdict}")
    reading = ev["families"].get("reading")
    if reading and reading["accuracy"] < TARGETS["reading"]:
        out.append("\nReading errors are single-letter confusions made by the vision tower, which stages 3-4 kept "
                   "frozen. Next step (GPU): a joint stage from this bundle with the tower under its dense letter "
                   "targets, e.g. `python -m vtrlab.organism.train --out runs/organism-stage5 --init-from "
                   "data/models/organism --tower-steps 0 --frozen-steps 0 --joint-steps 2000 --aux-weight 1 "
                   "--lr-tower-joint 3e-5 --lr-lm 4e-4 --family-weights reading=3,count=1.5,relation=1.5 "
                   "--n-train-per-family 12000`, then retrain the selector (its input changes).")
    unused = [f for f, r in ev["families"].items() if r["accuracy"] <= r["chance"] + 0.1]
    if unused:
        out.append(f"\n**Do not use {' / '.join(unused)} samples to validate importance methods against the "
                   "ground truth**: the model answers them at chance, so it does not use the relevant patches.")
    return "\n".join(out)


SNIPPET = '''```python
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from vtrlab.data.synthetic import generate          # or any 128x128 RGB pictures

path = "data/models/organism"
processor = AutoProcessor.from_pretrained(path)
model = LlavaForConditionalGeneration.from_pretrained(path).eval()

samples = generate(5, seed=0)                       # one held-out sample per family
conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
                 for s in samples]
prompts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
processor.tokenizer.padding_side = "left"           # the saved default; batched generate needs it
inputs = processor(images=[s.image for s in samples], text=prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print([a.strip() for a in answers])                 # ['purple', 'diamond', '1', 'yes', 'lwd']
```'''


def render(bundle: Path) -> str:
    ev = json.loads((bundle / "eval.json").read_text())
    cfg = json.loads((bundle / "config.json").read_text())
    s1 = json.loads((bundle / "train_record_stage1.json").read_text())
    s2 = json.loads((bundle / "train_record_stage2.json").read_text())
    bench_path = ROOT / "benchmarks" / "results" / "organism_forward.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    v, t = cfg["vision_config"], cfg["text_config"]
    rows = "\n".join(
        f"| {fam} | {r['accuracy']:.3f} | {r.get('no_image_accuracy', float('nan')):.3f} | {r['chance']:.3f} |"
        for fam, r in ev["families"].items())
    mb = (bundle / "model.safetensors").stat().st_size / 1e6
    bench_line = (f"CPU forward of a batch of 8 (prompt of {bench['seq_len']} tokens, no generation) on "
                  f"{bench['threads']} threads: median **{bench['median_s']:.3f} s**, fastest {bench['min_s']:.3f} s, over "
                  f"{bench['repeats']} runs, measured on a shared machine with load average "
                  f"{bench['load_average'][0]:.1f} (`python benchmarks/organism_forward.py`, "
                  f"benchmarks/results/organism_forward.json)."
                  if bench else "CPU forward time: run `python benchmarks/organism_forward.py`.")
    steps1, steps2 = s1.get("steps", {}), s2.get("steps", {})
    s3, s4 = (json.loads((bundle / f"train_record_stage{i}.json").read_text())
              if (bundle / f"train_record_stage{i}.json").is_file() else None for i in (3, 4))
    stage4_cmd = STAGE4.format(steps=_planned(s4)[0]) if s4 else ""
    return f"""# vtrlab organism: a tiny LLaVA trained on synthetic VQA with ground-truth relevance

The kit's default model (`vtrlab.load("organism")`). A real, trained vision-language model whose
ground truth is known: for every question the generator (`vtrlab.data.synthetic`) knows which
pixels and which of the 16x16 patches hold the answer (`Sample.pixel_mask`, `Sample.relevance`).

## Architecture ({ev['n_parameters']:,} parameters, fp32, {mb:.1f} MB)

- `LlavaForConditionalGeneration` (transformers >= 5.9), loads offline with plain transformers.
- Vision: CLIP vision tower **with [CLS]**, 128x128 px, patch 8 -> 16x16 = **256 image tokens**,
  {v['num_hidden_layers']} layers, d={v['hidden_size']}, {v['num_attention_heads']} heads. LLaVA takes the last layer
  (`vision_feature_layer=-1`) and drops [CLS] (`vision_feature_select_strategy="default"`).
- Projector: LLaVA's 2-layer GELU MLP.
- LM: Llama, {t['num_hidden_layers']} layers, d={t['hidden_size']}, {t['num_attention_heads']} heads, vocabulary {t['vocab_size']}.
- Tokenizer: WordPiece built with `tokenizers` over the task vocabulary (task words whole, other
  text spelled with letters/digits and `##` pieces, so reading answers decode as one word);
  specials `<s> <|system|> <|user|> <|assistant|> <|end|> <image> <pad>`; pads on the left.
- Image processor: `CLIPImageProcessor`, resize to 128x128, no crop, mean = std = 0.5.
- Chat template: `<s><|user|> QUESTION <image><|end|><|assistant|>` then ` ANSWER<|end|>`.
  **The question comes before the image** (see the recipe for why); the template puts it there
  whatever the order of the content items. Derive token positions from the layout, never assume.

## Tasks (`vtrlab.data.synthetic.generate(n, seed, family=None)`)

| family | question | answers |
|---|---|---|
| color | what color is the circle ? | 7 colors; the shape is unique, 1-3 distractors of other shapes |
| shape | what shape is the red object ? | 5 shapes; the color is unique, 1-3 distractors of other colors |
| count | how many circles are there ? | 1-5; 0-3 distractors of other shapes |
| relation | is the circle left of the square ? (left of / right of / above / below) | yes / no; the two shapes are unique, centres >= 24 px apart on the asked axis, 0-2 distractors |
| reading | what word is written ? | 3 random letters, 10x14 px glyphs (~2x2 patches) on clutter |

Data seeds: training samples seed 1 ({s1['config']['n_train_per_family']} per family in stage 1,
{s2['config']['n_train_per_family']} in stage 2{f", {s3['config']['n_train_per_family']} in stages 3-4" if s3 else ""}), validation seed 2, **held-out evaluation seed 0**
(notebooks' default `seed=0` therefore sees held-out samples).

## Held-out accuracy (greedy exact match, {ev['n_per_family']} samples per family, seed {ev['seed']})

| family | accuracy | no-image baseline (blank picture) | chance |
|---|---|---|---|
{rows}

Reproduce: `vtrlab organism eval data/models/organism --n {ev['n_per_family']}`
(= `python -m vtrlab.organism.evaluate data/models/organism --n {ev['n_per_family']}`; CPU, ~20 min on
2 busy cores). The numbers live in `eval.json` (the tests read them from there).

Targets of issue 3 (computed from eval.json):

{target_lines(ev)}

{bench_line}

## Recipe (vtrlab/organism/train.py; the record of every stage lies beside this card)

Stage 1 (`train_record_stage1.json`, one H100 shared with a second variant, {s1.get('train_seconds')} s):

1. *tower*: the vision tower alone learns dense per-patch targets read out by linear heads from
   its selected layer: color, shape, letter of the object owning the patch, a shape/glyph class
   at each object's centre patch, and positions (the patch's own row/col, its object's centre
   x/y; regression). Two rounds of {s1['config']['tower_steps']} steps (cosine, lr 1e-3, batch 256; the
   stage-1 run repeated the stage by accident, and since letters are the slowest target and were
   still improving, the repeat is kept as the recipe: `--tower-rounds 2`).
2. *frozen*: projector + LM learn to answer with the tower frozen ({steps1.get('frozen')} steps, lr 1e-3).
3. *joint*: everything trains, the tower at lr 2e-4 and still under the dense targets (weight 1),
   LM at 5e-4 ({steps1.get('joint')} steps). Families sampled with weights color 1, shape 1, count 1.5, relation 2, reading 1.5.

Stage 2 (`train_record_stage2.json`, {s2.get('train_seconds')} s): continued from stage 1, joint stage only,
{steps2.get('joint')} steps, LM lr 3e-4, tower lr 3e-5 without dense targets.

The step counts of the answer stages were fitted by the script to the wall-time budget of the
device runs (stage 1 planned 1328 joint steps and was stopped by its time limit after 1319); the
commands below fix them (GPU kernels are not bitwise deterministic: expect the numbers within
noise, not identical bits). Stage 1 without a GPU is impractical (hours on CPU).

{referent_section(s3, s4)}
The commands of all stages (stages 3-4 run on CPU, where training is deterministic for a given
torch build and thread count):

```
{STAGE1}
{STAGE2}
{STAGE3 if s3 else ""}
{stage4_cmd}
```

`vtrlab organism train --out DIR` runs the recipe from scratch in one command (train, evaluate on
held-out data, save the bundle with eval.json); its defaults are stage 1's, with the referent
supervision of stage 3 on from the first answer step. That single-command form with referent
supervision has **not** been run end to end yet (no device time was left): the shipped weights come
from the four commands above.

**For interpretability users:** on relation questions the LM was *told* (stages 3-4) to mark A's and
B's patches at layer {s3['config']['ref_role_layer'] if s3 else 2} and to hold their centres at layer {s3['config']['ref_xy_layer'] if s3 else 4}. Findings there on relation samples
(which tokens are attended, what knocking them out does) partly reflect that supervision; the other
families had no LM-side supervision.

### What worked, what did not

- End to end from scratch (probe before this recipe): only the answer prior. Dense per-patch
  supervision of the tower first is what makes color/shape/count/reading learnable.
- Question before the image learned faster than LLaVA's image-first order: same recipe and steps
  (stage 1), held-out color 0.988 vs 0.894, shape 0.980 vs 0.870, count 0.966 vs 0.956, reading 0.974 vs 0.968.
  With the question first, every image token can already attend to the question.
- relation: positional supervision of the tower (own row/col and object centre regression: both
  reach MSE ~1e-3, so positions *are* in the tower's features), a 2x sampling weight, and both
  token orders did **not** lift relation above chance within ~3,300 answer steps (stage 1: 0.52
  image-first, 0.51 question-first; stage 2: still ~0.52).
- relation, what worked: supervising the two hops inside the LM (stage 3: which image tokens are
  A / B, and where A and B are, at the answering token). The hops were learned within ~1,000 steps;
  the comparison itself, never supervised, followed suddenly after ~2,300 steps (see stage 3).

## Use

{SNIPPET}

With vtrlab: `vlm = vtrlab.load("organism")`, `batch = vlm.prepare([img], [question])`.

## Token selector (`selector/`)

A "When Less is Enough" selector + reconstructor trained on this model's vision features ships in
`selector/` (`vtrlab.recon.Selector.load("data/models/organism/selector")`). Its card, results and
exact training command are in `selector/README.md`; the shipped weights come from

```
python -m vtrlab.recon.train --model organism --out data/models/organism/selector \\
    --n-train 1024 --n-val 128 --steps 300 --batch-size 16 --d-model 64 --n-heads 4 --ff-mult 2 \\
    --layers 3 --p 0.5 --lr 1e-3 --seed 0 --device cpu
```
"""


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    bundle = Path(argv[0]) if argv else ROOT / "data" / "models" / "organism"
    text = render(bundle)
    atomic_write_text(bundle / "README.md", text)
    print(f"wrote {bundle / 'README.md'}")


if __name__ == "__main__":
    main()
