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
    return dict(
        color=color, shape=shape, letter=letter, centre=centre, obj_xy=obj_xy, on_object=(owner > 0), own_rc=own_rc
    )


N_CENTRE = N_SHAPE + 1


def _render_chunk(args):
    seed, family, start, stop = args
    pix, tg, qa, caps = [], {}, [], []
    for i in range(start, stop):
        s = make_sample(seed, i, family)
        pix.append(np.asarray(s.image, dtype=np.uint8).transpose(2, 0, 1))
        for key, v in patch_targets(s).items():
            tg.setdefault(key, []).append(v)
        qa.append((s.question, s.answer))
        caps.append(s.caption)
    return np.stack(pix), {k: np.stack(v) for k, v in tg.items()}, qa, caps


@dataclass
class Seqs:
    """Right-padded token sequences of one kind; ``labels`` -100 where no loss is taken."""

    ids: torch.Tensor  # int64 (N, L)
    mask: torch.Tensor  # bool (N, L)
    labels: torch.Tensor  # int64 (N, L)

    def to(self, device) -> Seqs:
        return Seqs(*(t.to(device, non_blocking=True) for t in (self.ids, self.mask, self.labels)))


@dataclass
class EncodedSet:
    """Everything a training step needs, as tensors (move with .to(device)).

    Sequences per sample (``seqs``): ``answer`` the chat prompt (system, image, question) and the
    answer (labels: answer + end); ``caption`` the same prompt asking for a description and the
    scene's caption (labels: caption + end; LLaVA stage 1); ``text`` caption, question and answer as
    plain text in the chat format, no image (labels: every token; the LM's language stage);
    ``clip`` the caption alone for the CLIP text encoder (``<s> caption <|end|>``)."""

    pixels: torch.Tensor  # uint8 (N, 3, H, W)
    family: torch.Tensor  # int64 (N,), index into FAMILIES
    targets: dict[str, torch.Tensor]
    seqs: dict[str, Seqs]
    questions: list[str]
    answers: list[str]
    captions: list[str]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.seqs["answer"].ids

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.seqs["answer"].mask

    @property
    def labels(self) -> torch.Tensor:
        return self.seqs["answer"].labels

    def to(self, device) -> EncodedSet:
        return EncodedSet(
            self.pixels.to(device, non_blocking=True),
            self.family.to(device),
            {k: v.to(device, non_blocking=True) for k, v in self.targets.items()},
            {k: v.to(device) for k, v in self.seqs.items()},
            self.questions,
            self.answers,
            self.captions,
        )

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

    def _batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def text_template(self) -> str:
        """The chat format with the caption in place of the picture, as plain text: a format string
        with {caption}, {question}, {answer} (rendered once by the chat template)."""
        conv = [
            {"role": "user", "content": [{"type": "text", "text": "@C@ . @Q@"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "@A@"}]},
        ]
        text = self.processor.apply_chat_template(conv)
        return (
            text.replace("{", "{{")
            .replace("}", "}}")
            .replace("@C@", "{caption}")
            .replace("@Q@", "{question}")
            .replace("@A@", "{answer}")
        )

    def text_ids(self, captions: list[str], qa: list[tuple[str, str]]) -> list[list[int]]:
        fmt = self.text_template()
        return self._batch([fmt.format(caption=c, question=q, answer=a) for c, (q, a) in zip(captions, qa)])

    def caption_answer_ids(self, captions: list[str]) -> list[list[int]]:
        return [ids + [self.end_id] for ids in self._batch([" " + c for c in captions])]

    def clip_ids(self, captions: list[str]) -> list[list[int]]:
        bos = self.tok.bos_token_id
        return [[bos] + ids + [self.end_id] for ids in self._batch(list(captions))]


def _pad(seqs: list[tuple], n_unlabelled: list[int] | None, pad: int) -> Seqs:
    """Right-pad sequences given as tuples of parts (numpy arrays or lists, concatenated); labels are
    the tokens themselves after the first ``n_unlabelled[i]`` (None: all of them)."""
    lens = np.array([sum(len(part) for part in s) for s in seqs])
    length = int(lens.max())
    ids = np.full((len(seqs), length), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        a = 0
        for part in s:
            ids[i, a : a + len(part)] = part
            a += len(part)
    pos = np.arange(length)[None, :]
    start = np.zeros(len(seqs), np.int64) if n_unlabelled is None else np.asarray(n_unlabelled)
    labelled = (pos >= start[:, None]) & (pos < lens[:, None])
    labels = np.where(labelled, ids, -100)
    ids_t = torch.from_numpy(ids)
    return Seqs(ids_t, ids_t != pad, torch.from_numpy(labels))


def encode(
    pixels: np.ndarray,
    targets: dict[str, np.ndarray],
    qa: list[tuple[str, str]],
    families: list[str],
    encoder: SequenceEncoder,
    captions: list[str] | None = None,
) -> EncodedSet:
    from vtrlab.organism.tokenizer import CAPTION_PROMPT

    captions = list(captions) if captions is not None else [""] * len(qa)
    pad = encoder.tok.pad_token_id
    answers: dict[str, list[int]] = {}
    prompts: dict[str, np.ndarray] = {}
    answer, n_prompt = [], []
    for q, a in qa:
        if a not in answers:
            answers[a] = encoder.answer_ids(a)
        if q not in prompts:
            prompts[q] = np.asarray(encoder.prompt_ids(q), dtype=np.int64)
        answer.append((prompts[q], answers[a]))
        n_prompt.append(len(prompts[q]))
    cap_prompt = np.asarray(encoder.prompt_ids(CAPTION_PROMPT), dtype=np.int64)
    cap = [(cap_prompt, ids) for ids in encoder.caption_answer_ids(captions)]
    seqs = {
        "answer": _pad(answer, n_prompt, pad),
        "caption": _pad(cap, [len(cap_prompt)] * len(cap), pad),
        "text": _pad([(t,) for t in encoder.text_ids(captions, qa)], None, pad),
        "clip": _pad([(t,) for t in encoder.clip_ids(captions)], None, pad),
    }
    return EncodedSet(
        pixels=torch.from_numpy(pixels),
        family=torch.tensor([FAMILIES.index(f) for f in families]),
        targets={k: torch.from_numpy(v) for k, v in targets.items()},
        seqs=seqs,
        questions=[q for q, _ in qa],
        answers=[a for _, a in qa],
        captions=captions,
    )


class BuildStopped(RuntimeError):
    """A background build_set was told to stop."""


def build_set(
    n_per_family: int | dict[str, int],
    seed: int,
    processor,
    families=FAMILIES,
    workers: int = 1,
    chunk: int = 500,
    image_size: int = 128,
    stop=None,
) -> EncodedSet:
    """Render n samples of each family (indices 0..n-1 at ``seed``) and encode them; ``n_per_family``
    is one count for every family or a count per family (families missing from the dict: none).
    ``stop``: a threading.Event; once set, a parallel build raises BuildStopped (used when the set is
    built in the background and the call ends before it is needed)."""
    counts = n_per_family if isinstance(n_per_family, dict) else dict.fromkeys(families, n_per_family)
    families = [f for f in families if counts.get(f, 0) > 0]
    jobs = [(seed, f, a, min(a + chunk, counts[f])) for f in families for a in range(0, counts[f], chunk)]
    fams = [f for f in families for a in range(0, counts[f], chunk) for _ in range(a, min(a + chunk, counts[f]))]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            futures = [ex.submit(_render_chunk, j) for j in jobs]
            parts = []
            for fu in tqdm(futures, desc=f"render seed {seed}"):
                if stop is not None and stop.is_set():  # abandoned: drop the queued chunks, end soon
                    for f in futures:
                        f.cancel()
                    raise BuildStopped(f"building the set of seed {seed} was stopped")
                parts.append(fu.result())
    else:
        parts = [_render_chunk(j) for j in tqdm(jobs, desc=f"render seed {seed}", disable=len(jobs) < 4)]
    pixels = np.concatenate([p[0] for p in parts])
    targets = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    qa = [x for p in parts for x in p[2]]
    caps = [x for p in parts for x in p[3]]
    return encode(pixels, targets, qa, fams, SequenceEncoder(processor), caps)
