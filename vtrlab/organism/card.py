"""Render the organism's model card (README.md) from the files that hold its numbers:
eval.json (held-out accuracy), train_record_stage*.json (recipe as run) and, if present,
benchmarks/results/organism_forward.json. ``python -m vtrlab.organism.card [BUNDLE]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STAGE1 = ("python -m vtrlab.organism.train --out runs/organism-stage1 --image-first false "
          "--tower-steps 2000 --tower-rounds 2 --frozen-steps 472 --joint-steps 1328 --max-minutes 60")
STAGE2 = ("python -m vtrlab.organism.train --out runs/organism --init-from runs/organism-stage1 --image-first false "
          "--tower-steps 0 --frozen-steps 0 --joint-steps 1947 --aux-weight 0 --lr-tower-joint 3e-5 "
          "--lr-lm 6e-4 --n-train-per-family 12000 --eval-n 0 --max-minutes 60")

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
{s2['config']['n_train_per_family']} in stage 2), validation seed 2, **held-out evaluation seed 0**
(notebooks' default `seed=0` therefore sees held-out samples).

## Held-out accuracy (greedy exact match, {ev['n_per_family']} samples per family, seed {ev['seed']})

| family | accuracy | no-image baseline (blank picture) | chance |
|---|---|---|---|
{rows}

Reproduce: `vtrlab organism eval data/models/organism --n {ev['n_per_family']}`
(= `python -m vtrlab.organism.evaluate data/models/organism --n {ev['n_per_family']}`; CPU, ~20 min on
2 busy cores). The numbers live in `eval.json` (the tests read them from there).

Targets of issue 3: color, shape, count, reading >= 0.98 (reading misses it by 0.006: 13 of 500
wrong, each a single-letter confusion such as z->c, f->p, o->d); relation >= 0.90: **not met,
relation is at chance**: the model has not learned it (see below). Do not use relation samples
to validate importance methods against ground truth: the model does not use the relevant patches.

{bench_line}

## Recipe (vtrlab/organism/train.py; records of both runs beside this card)

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

```
{STAGE1}
{STAGE2}
```

`vtrlab organism train --out DIR` runs the default recipe from scratch in one command (train,
evaluate on held-out data, save the bundle with eval.json).

### What worked, what did not

- End to end from scratch (probe before this recipe): only the answer prior. Dense per-patch
  supervision of the tower first is what makes color/shape/count/reading learnable.
- Question before the image learned faster than LLaVA's image-first order: same recipe and steps
  (stage 1), held-out color 0.988 vs 0.894, shape 0.980 vs 0.870, count 0.966 vs 0.956, reading 0.974 vs 0.968.
  With the question first, every image token can already attend to the question.
- relation: positional supervision of the tower (own row/col and object centre regression: both
  reach MSE ~1e-3, so positions *are* in the tower's features), a 2x sampling weight, and both
  token orders did **not** lift relation above chance within ~3,300 answer steps (stage 1: 0.52
  image-first, 0.51 question-first; stage 2: still ~0.52). Not tried for lack of device time:
  an auxiliary "locate" task (name a shape, answer its coarse position) as a curriculum for the
  first hop, much longer training, relation-only warm-up.

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
    tmp = bundle / "README.md.tmp"
    tmp.write_text(text)
    tmp.replace(bundle / "README.md")
    print(f"wrote {bundle / 'README.md'}")


if __name__ == "__main__":
    main()
