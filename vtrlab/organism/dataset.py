"""Training tensors for the organism: pictures, token sequences and dense per-patch targets.

The dense targets come from the generator's ground truth (which object owns each pixel) and
teach the vision tower what is where before any question is asked: without them the model
trained end to end from scratch learns only the answer prior.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from vtrlab.data.glyphs import LETTERS
from vtrlab.data.synthetic import COLOR_NAMES, FAMILIES, SHAPES, Sample, make_sample

MIN_PIXELS = 3  # an object labels a patch when it owns at least this many of its pixels

# dense target vocabularies (0 = background / none)
N_COLOR = len(COLOR_NAMES) + 1
N_SHAPE = len(SHAPES) + 1
N_LETTER = len(LETTERS) + 1


def patch_owners(sample: Sample) -> np.ndarray:
    """Per patch (grid*grid, row-major): index of the object owning most of its pixels (0: none,
    or fewer than MIN_PIXELS)."""
    ids = sample.object_map
    h, w = ids.shape
    g = sample.grid
    k = len(sample.objects) + 1
    ys, xs = np.divmod(np.arange(h * w), w)
    patch = (ys // (h // g)) * g + xs // (w // g)
    counts = np.bincount(patch * k + ids.ravel().astype(np.int64), minlength=g * g * k).reshape(g * g, k)
    counts[:, 0] = 0
    owner = counts.argmax(axis=1)
    owner[counts.max(axis=1) < MIN_PIXELS] = 0
    return owner


def referent_targets(sample: Sample, owner: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Targets for the language model's intermediate states on relation questions
    ("is the A left of the B ?"): ``ref_role`` per patch (0 neither, 1 A, 2 B) for the image
    tokens, and ``ref_xy`` = (A's centre x, y, B's centre x, y) in [0, 1] for the last prompt
    token. ``ref_on`` says whether the sample has them (relation samples only).

    The two hops a relation answer needs (find A and B, read their positions) are what the model
    did not discover from the yes/no answer alone; see the model card."""
    g = sample.grid
    h, w = sample.object_map.shape
    role = np.zeros(g * g, np.int64)
    xy = np.zeros(4, np.float32)
    if sample.family != "relation":
        return dict(ref_role=role, ref_xy=xy, ref_on=np.array(False))
    words = sample.question.replace("?", " ").split()
    named = [wd for wd in words if wd in SHAPES]  # A then B, in the order the question names them
    owner = patch_owners(sample) if owner is None else owner
    for r, name in enumerate(named[:2], start=1):
        obj = next(o for o in sample.objects if o.kind == "shape" and o.shape == name)
        role[owner == obj.index] = r
        xy[2 * (r - 1): 2 * r] = (obj.center[0] / w, obj.center[1] / h)
    return dict(ref_role=role, ref_xy=xy, ref_on=np.array(True))


def patch_targets(sample: Sample, owner: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-patch targets (grid*grid, row-major) from the rendered object map.

    color/shape/letter: class of the object owning most of the patch (0: none); centre: shape
    class (N_SHAPE for glyphs) of the object whose centre lies in the patch; obj_xy: the owning
    object's centre (x, y) in [0, 1]; on_object: the patch has an owner; own_rc: the patch's own
    (row, col) in [0, 1].
    """
    h, w = sample.object_map.shape
    g = sample.grid
    ph, pw = h // g, w // g
    owner = patch_owners(sample) if owner is None else owner
    color = np.zeros(g * g, np.int64)
    shape = np.zeros(g * g, np.int64)
    letter = np.zeros(g * g, np.int64)
    centre = np.zeros(g * g, np.int64)
    obj_xy = np.zeros((g * g, 2), np.float32)
    for obj in sample.objects:
        sel = owner == obj.index
        if obj.kind == "shape":
            color[sel] = COLOR_NAMES.index(obj.color) + 1
            shape[sel] = SHAPES.index(obj.shape) + 1
            cls = SHAPES.index(obj.shape) + 1
        else:
            letter[sel] = LETTERS.index(obj.letter) + 1
            cls = N_SHAPE  # glyph centres get their own class
        obj_xy[sel] = (obj.center[0] / w, obj.center[1] / h)
        cx, cy = int(obj.center[0] // pw), int(obj.center[1] // ph)
        centre[cy * g + cx] = cls
    rows, cols = np.divmod(np.arange(g * g), g)
    own_rc = np.stack([rows, cols], axis=1).astype(np.float32) / (g - 1)
    return dict(color=color, shape=shape, letter=letter, centre=centre, obj_xy=obj_xy,
                on_object=(owner > 0), own_rc=own_rc)


N_CENTRE = N_SHAPE + 1


def _render_chunk(args):
    seed, family, start, stop = args
    pix, tg, qa = [], {}, []
    for i in range(start, stop):
        s = make_sample(seed, i, family)
        pix.append(np.asarray(s.image, dtype=np.uint8).transpose(2, 0, 1))
        owner = patch_owners(s)  # shared by both target sets
        for key, v in {**patch_targets(s, owner), **referent_targets(s, owner)}.items():
            tg.setdefault(key, []).append(v)
        qa.append((s.question, s.answer))
    return np.stack(pix), {k: np.stack(v) for k, v in tg.items()}, qa


@dataclass
class EncodedSet:
    """Everything a training step needs, as tensors (move with .to(device))."""

    pixels: torch.Tensor  # uint8 (N, 3, H, W)
    input_ids: torch.Tensor  # int64 (N, L), right-padded
    attention_mask: torch.Tensor  # bool (N, L)
    labels: torch.Tensor  # int64 (N, L), -100 outside answer + end token
    family: torch.Tensor  # int64 (N,), index into FAMILIES
    targets: dict[str, torch.Tensor]
    questions: list[str]
    answers: list[str]

    def to(self, device) -> EncodedSet:
        mv = lambda t: t.to(device, non_blocking=True)
        return EncodedSet(mv(self.pixels), mv(self.input_ids), mv(self.attention_mask), mv(self.labels),
                          mv(self.family), {k: mv(v) for k, v in self.targets.items()},
                          self.questions, self.answers)

    def __len__(self) -> int:
        return self.pixels.shape[0]


class SequenceEncoder:
    """Token ids exactly as ``processor(text=apply_chat_template(...), images=...)`` makes them,
    cached per distinct prompt (expanding the <image> placeholder is all the processor does)."""

    def __init__(self, processor):
        from vtrlab.organism.processor import user_message

        self.processor = processor
        self.tok = processor.tokenizer
        self.user_message = user_message
        self.n_image = self._count_image_tokens()
        self._cache: dict[str, list[int]] = {}
        self.end_id = self.tok.convert_tokens_to_ids(self.tok.eos_token)

    def _count_image_tokens(self) -> int:
        # ask the processor itself how many tokens one picture expands to
        from PIL import Image

        text = self.processor.apply_chat_template(self.user_message("what"), add_generation_prompt=True)
        size = self.processor.image_processor.size
        img = Image.new("RGB", (size["width"], size["height"]))
        ids = self.processor(images=[img], text=[text])["input_ids"][0]
        return int(sum(1 for t in ids if t == self.tok.convert_tokens_to_ids(self.processor.image_token)))

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._cache:
            text = self.processor.apply_chat_template(self.user_message(question), add_generation_prompt=True)
            n = self.n_image
            text = text.replace(self.processor.image_token, self.processor.image_token * n)
            self._cache[question] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[question]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok(" " + answer, add_special_tokens=False)["input_ids"] + [self.end_id]


def encode(pixels: np.ndarray, targets: dict[str, np.ndarray], qa: list[tuple[str, str]], families: list[str],
           encoder: SequenceEncoder) -> EncodedSet:
    seqs, labs = [], []
    for q, a in qa:
        p, ans = encoder.prompt_ids(q), encoder.answer_ids(a)
        seqs.append(p + ans)
        labs.append([-100] * len(p) + ans)
    length = max(map(len, seqs))
    pad = encoder.tok.pad_token_id
    ids = torch.full((len(seqs), length), pad, dtype=torch.int64)
    labels = torch.full((len(seqs), length), -100, dtype=torch.int64)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(l)] = torch.tensor(l)
    return EncodedSet(
        pixels=torch.from_numpy(pixels), input_ids=ids, attention_mask=ids != pad, labels=labels,
        family=torch.tensor([FAMILIES.index(f) for f in families]),
        targets={k: torch.from_numpy(v) for k, v in targets.items()},
        questions=[q for q, _ in qa], answers=[a for _, a in qa])


def build_set(n_per_family: int, seed: int, processor, families=FAMILIES, workers: int = 1,
              chunk: int = 500, image_size: int = 128) -> EncodedSet:
    """Render n_per_family samples of each family (indices 0..n-1 at ``seed``) and encode them."""
    jobs = [(seed, f, a, min(a + chunk, n_per_family)) for f in families for a in range(0, n_per_family, chunk)]
    fams = [f for f in families for a in range(0, n_per_family, chunk) for _ in range(a, min(a + chunk, n_per_family))]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(tqdm(ex.map(_render_chunk, jobs), total=len(jobs), desc=f"render seed {seed}"))
    else:
        parts = [_render_chunk(j) for j in tqdm(jobs, desc=f"render seed {seed}", disable=len(jobs) < 4)]
    pixels = np.concatenate([p for p, _, _ in parts])
    targets = {k: np.concatenate([t[k] for _, t, _ in parts]) for k in parts[0][1]}
    qa = [x for _, _, q in parts for x in q]
    return encode(pixels, targets, qa, fams, SequenceEncoder(processor))
