"""Synthetic visual question answering with ground-truth relevance: the organism's tasks.

Every sample knows which pixels (``pixel_mask``) and which patches of the model's grid
(``relevance``) hold the answer: the pixels of the objects the question is about, taken from the
rendering itself (after any occlusion), not from nominal bounding boxes.

Families (answer set in brackets):

- ``color``    "what color is the circle ?"            [7 colors]     target shape is unique
- ``shape``    "what shape is the red object ?"         [5 shapes]     target color is unique
- ``count``    "how many circles are there ?"           [1 .. 5]       other shapes distract
- ``relation`` "is the circle left or right of the square ?" [left, right] or
               "is the circle above or below the square ?"     [above, below]  the two shapes are unique;
               GQA's "choose" form: the answer names the relation, a two-hop comparison
- ``reading``  "what word is written ?"                 [3 letters]    small glyphs on clutter
- ``position`` "is the red circle left or right ?"     [left, right] or "... top or bottom ?" [top, bottom]
  one hop: the object (named by colour+shape, or by shape alone when its shape is unique) is placed
  >= POSITION_MARGIN px from the midline the question asks about

Relation and position questions offer two answers each (``Sample.choices``; chance 1/2).
Organism v2's first runs asked relation as yes/no ("is the circle left of the square ?", four
relations): it stayed at chance without LM-internal supervision (an XOR of the relation word and the
order of the two objects); the organism card records those attempts.

Every sample also carries a ``caption`` (``Sample.caption``): a plain-text description of the whole
scene (every object's colour, shape and coarse region, or the written word) generated with it, the
organism's image -> text pairs for contrastive (CLIP) and captioning (LLaVA stage 1) training.

Each sample is drawn from its own generator seeded by (seed, index, family), so ``generate`` is
deterministic and a longer list extends a shorter one with the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from vtrlab._validate import check_int
from vtrlab.data.glyphs import LETTERS, glyph

FAMILIES = ("color", "shape", "count", "relation", "reading", "position")
COLORS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 20),
    "purple": (150, 60, 190),
    "orange": (245, 135, 20),
    "cyan": (30, 200, 215),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
COUNTS = ("1", "2", "3", "4", "5")
AXES = ("horizontal", "vertical")  # what a relation or position question asks about
WORD_LENGTH = 3
QUESTIONS = {
    "color": "what color is the {shape} ?",
    "shape": "what shape is the {color} object ?",
    "count": "how many {plural} are there ?",
    "relation": "is the {a} left or right of the {b} ?",
    "reading": "what word is written ?",
    "position": "is the {color} {shape} left or right ?",
}
# per axis: (question template, answer for the smaller coordinate, answer for the larger one)
RELATION_QUESTIONS = {
    "horizontal": ("is the {a} left or right of the {b} ?", "left", "right"),
    "vertical": ("is the {a} above or below the {b} ?", "above", "below"),
}
POSITION_QUESTIONS = {
    "horizontal": ("is the {name} left or right ?", "left", "right"),
    "vertical": ("is the {name} top or bottom ?", "top", "bottom"),
}
ANSWERS = {
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "count": COUNTS,
    "relation": ("left", "right", "above", "below"),
    "reading": None,  # any WORD_LENGTH-letter string over LETTERS (lower case)
    "position": ("left", "right", "top", "bottom"),
}
# answers a single question offers, where fewer than the family's set (chance = 1 / this)
OPTIONS_PER_QUESTION = {"relation": 2, "position": 2}
BACKGROUND = (236, 236, 236)
GLYPH_SCALE = 2  # 5x7 font -> 10x14 px glyphs, about 2x2 patches of 8 px
MIN_SEPARATION = 24  # px between object centres along the axis a relation question asks about
POSITION_MARGIN = 12  # px between a position question's object centre and the vertical midline
# captions: coarse regions of the picture (thirds), read from an object's centre
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
CAPTION_WORDS = (
    "a",
    "an",
    "picture",
    "of",
    "at",
    "and",
    "the",
    "word",
    "written",
    "on",
    "clutter",
    "empty",
    *COLUMNS,
    *ROWS,
)


def _family_index(family: str) -> int:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; accepted: {', '.join(FAMILIES)}")
    return FAMILIES.index(family)


@dataclass
class SyntheticObject:
    """One drawn thing: a shape or a glyph. ``index`` is its id in ``Sample.object_map`` (1-based)."""

    index: int
    kind: str  # "shape" | "glyph"
    shape: str | None  # one of SHAPES for kind == "shape"
    letter: str | None  # one of LETTERS for kind == "glyph"
    color: str | None  # one of COLOR_NAMES (shapes); None for glyphs (dark ink)
    center: tuple[float, float]  # (x, y) in pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in pixels
    relevant: bool


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    family: str
    relevance: np.ndarray  # bool (grid, grid): patch holds a pixel of a relevant object
    pixel_mask: np.ndarray  # bool (H, W): pixels of relevant objects as rendered
    object_map: np.ndarray  # int16 (H, W): 0 background, else SyntheticObject.index
    objects: list[SyntheticObject] = field(default_factory=list)
    choices: tuple[str, ...] | None = None  # the answers this question offers (None: open, reading)
    seed: int = 0
    index: int = 0
    caption: str = ""  # plain-text description of the whole scene (see ``caption``)

    @property
    def grid(self) -> int:
        return self.relevance.shape[0]


def relevance_from_mask(pixel_mask: np.ndarray, grid: int) -> np.ndarray:
    """Patches (grid x grid) that contain at least one pixel of the mask."""
    h, w = pixel_mask.shape
    if h % grid or w % grid:
        raise ValueError(f"image {w}x{h} is not divisible into a {grid}x{grid} patch grid")
    ph, pw = h // grid, w // grid
    return pixel_mask.reshape(grid, ph, grid, pw).any(axis=(1, 3))


# --- drawing ---------------------------------------------------------------------------------
def _shape_mask(shape: str, cx: float, cy: float, size: float, hw: tuple[int, int]) -> np.ndarray:
    """Boolean mask of one shape (no anti-aliasing, so the mask is exactly what is painted)."""
    canvas = Image.new("L", (hw[1], hw[0]), 0)
    d = ImageDraw.Draw(canvas)
    r = size / 2
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=255)
    elif shape == "square":
        q = r * 0.85
        d.rectangle([cx - q, cy - q, cx + q - 1, cy + q - 1], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r - 1, cy + r - 1)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r - 1, cy), (cx, cy + r - 1), (cx - r, cy)], fill=255)
    elif shape == "cross":
        t = size / 6
        d.rectangle([cx - t, cy - r, cx + t - 1, cy + r - 1], fill=255)
        d.rectangle([cx - r, cy - t, cx + r - 1, cy + t - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")
    return np.asarray(canvas) > 0


class _Canvas:
    """An RGB picture plus the id of the object that owns each pixel (later paint wins)."""

    def __init__(self, size: int, background: tuple[int, int, int]):
        self.rgb = np.empty((size, size, 3), dtype=np.uint8)
        self.rgb[:] = background
        self.ids = np.zeros((size, size), dtype=np.int16)
        self.objects: list[SyntheticObject] = []

    def paint(self, mask: np.ndarray, rgb: tuple[int, int, int], obj: SyntheticObject | None) -> None:
        self.rgb[mask] = rgb
        if obj is not None:
            self.ids[mask] = obj.index
            self.objects.append(obj)
        else:
            self.ids[mask] = 0


def _place(
    rng: np.random.Generator, n: int, size_range: tuple[int, int], image_size: int, gap: int = 3, max_tries: int = 2000
) -> list[tuple[float, float, int]]:
    """n non-overlapping (cx, cy, size) boxes inside the image, by rejection sampling."""
    boxes: list[tuple[float, float, int]] = []
    tries = 0
    while len(boxes) < n:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(f"could not place {n} objects in a {image_size}px image")
        size = int(rng.integers(size_range[0], size_range[1] + 1))
        cx = float(rng.integers(size // 2 + 1, image_size - size // 2 - 1))
        cy = float(rng.integers(size // 2 + 1, image_size - size // 2 - 1))
        if all(abs(cx - bx) >= (size + bs) / 2 + gap or abs(cy - by) >= (size + bs) / 2 + gap for bx, by, bs in boxes):
            boxes.append((cx, cy, size))
    return boxes


def _draw_shapes(
    canvas: _Canvas,
    rng: np.random.Generator,
    specs: Sequence[tuple[str, str, bool]],
    boxes: Sequence[tuple[float, float, int]],
) -> None:
    """Draw (shape, color, relevant) specs into the given boxes."""
    size = canvas.rgb.shape[0]
    for (shape, color, relevant), (cx, cy, s) in zip(specs, boxes):
        mask = _shape_mask(shape, cx, cy, s, (size, size))
        ys, xs = np.nonzero(mask)
        obj = SyntheticObject(
            index=len(canvas.objects) + 1,
            kind="shape",
            shape=shape,
            letter=None,
            color=color,
            center=(float(xs.mean()), float(ys.mean())),
            bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            relevant=relevant,
        )
        canvas.paint(mask, COLORS[color], obj)


def _pick(rng: np.random.Generator, options: Sequence[str], k: int = 1, exclude: Sequence[str] = ()) -> list[str]:
    pool = [o for o in options if o not in exclude]
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def _distractors(
    rng: np.random.Generator, n: int, shapes: Sequence[str], colors: Sequence[str]
) -> list[tuple[str, str, bool]]:
    return [(shapes[rng.integers(len(shapes))], colors[rng.integers(len(colors))], False) for _ in range(n)]


def _color_task(rng, size):
    target, color = _pick(rng, SHAPES)[0], _pick(rng, COLOR_NAMES)[0]
    others = [s for s in SHAPES if s != target]
    specs = [(target, color, True)] + _distractors(rng, int(rng.integers(1, 4)), others, COLOR_NAMES)
    return specs, QUESTIONS["color"].format(shape=target), color


def _shape_task(rng, size):
    shape, target = _pick(rng, SHAPES)[0], _pick(rng, COLOR_NAMES)[0]
    others = [c for c in COLOR_NAMES if c != target]
    specs = [(shape, target, True)] + _distractors(rng, int(rng.integers(1, 4)), SHAPES, others)
    return specs, QUESTIONS["shape"].format(color=target), shape


def _count_task(rng, size):
    target = _pick(rng, SHAPES)[0]
    k = int(rng.integers(1, len(COUNTS) + 1))
    others = [s for s in SHAPES if s != target]
    specs = [(target, _pick(rng, COLOR_NAMES)[0], True) for _ in range(k)]
    specs += _distractors(rng, int(rng.integers(0, 4)), others, COLOR_NAMES)
    return specs, QUESTIONS["count"].format(plural=PLURALS[target]), str(k)


def _scene(rng: np.random.Generator, specs, image_size: int, size_range=(14, 22)) -> _Canvas:
    order = rng.permutation(len(specs))  # relevant objects are not always drawn first
    specs = [specs[i] for i in order]
    canvas = _Canvas(image_size, BACKGROUND)
    _draw_shapes(canvas, rng, specs, _place(rng, len(specs), size_range, image_size))
    return canvas


def _relation_scene(rng: np.random.Generator, image_size: int):
    a, b = _pick(rng, SHAPES, 2)
    axis = AXES[int(rng.integers(2))]
    template, smaller, larger = RELATION_QUESTIONS[axis]
    a_smaller = bool(rng.integers(2))  # the answer, balanced per axis
    k = 0 if axis == "horizontal" else 1
    others = [s for s in SHAPES if s not in (a, b)]
    specs = [(a, _pick(rng, COLOR_NAMES)[0], True), (b, _pick(rng, COLOR_NAMES)[0], True)]
    specs += _distractors(rng, int(rng.integers(0, 3)), others, COLOR_NAMES)
    for _ in range(200):
        boxes = _place(rng, len(specs), (14, 22), image_size)
        delta = boxes[1][k] - boxes[0][k]  # b - a along the asked axis
        if abs(delta) >= MIN_SEPARATION and (delta > 0) == a_smaller:
            break
    else:  # pragma: no cover - rejection sampling practically always succeeds
        raise RuntimeError("could not place a relation scene")
    canvas = _Canvas(image_size, BACKGROUND)
    _draw_shapes(canvas, rng, specs, boxes)
    return canvas, template.format(a=a, b=b), smaller if a_smaller else larger, (smaller, larger)


def _position_scene(rng: np.random.Generator, image_size: int):
    shape, color = _pick(rng, SHAPES)[0], _pick(rng, COLOR_NAMES)[0]
    axis = AXES[int(rng.integers(2))]
    by_shape = bool(rng.integers(2))  # named by its shape alone (as relation questions name objects)
    n = int(rng.integers(1, 4))
    # the named object is unique: distractors never repeat its colour+shape pair, nor its shape when
    # it is named by shape alone
    others = []
    while len(others) < n:
        d = _distractors(rng, 1, [s for s in SHAPES if s != shape] if by_shape else SHAPES, COLOR_NAMES)[0]
        if (d[0], d[1]) != (shape, color):
            others.append(d)
    specs = [(shape, color, True)] + others
    k, mid = (0 if axis == "horizontal" else 1), image_size / 2
    for _ in range(200):  # the margin holds for the drawn pixels' centre (a triangle's sits low in its box)
        boxes = _place(rng, len(specs), (14, 22), image_size)
        if abs(boxes[0][k] - mid) < POSITION_MARGIN:
            continue
        canvas = _Canvas(image_size, BACKGROUND)
        _draw_shapes(canvas, rng, specs, boxes)
        target = canvas.objects[0]
        if abs(target.center[k] - mid) >= POSITION_MARGIN:
            break
    else:  # pragma: no cover - rejection sampling practically always succeeds
        raise RuntimeError("could not place a position scene")
    template, smaller, larger = POSITION_QUESTIONS[axis]
    question = template.format(name=shape if by_shape else f"{color} {shape}")
    return canvas, question, smaller if target.center[k] < mid else larger, (smaller, larger)


def _reading_scene(rng: np.random.Generator, image_size: int):
    bg = tuple(int(v) for v in rng.integers(200, 246, size=3))
    canvas = _Canvas(image_size, bg)
    img = Image.fromarray(canvas.rgb)
    d = ImageDraw.Draw(img)
    # clutter: light strokes and dots all over the picture (they are background, not objects)
    for _ in range(int(rng.integers(20, 40))):
        x0, y0 = rng.integers(0, image_size, size=2)
        dx, dy = rng.integers(-20, 21, size=2)
        col = tuple(int(v) for v in rng.integers(120, 230, size=3))
        d.line([(int(x0), int(y0)), (int(x0 + dx), int(y0 + dy))], fill=col, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(10, 30))):
        x0, y0 = rng.integers(0, image_size - 3, size=2)
        col = tuple(int(v) for v in rng.integers(100, 230, size=3))
        d.rectangle([int(x0), int(y0), int(x0) + 1, int(y0) + 1], fill=col)
    canvas.rgb = np.array(img)
    letters = [LETTERS[i] for i in rng.integers(len(LETTERS), size=WORD_LENGTH)]
    gh, gw = glyph("A", GLYPH_SCALE).shape
    spacing = int(rng.integers(3, 6))
    width = WORD_LENGTH * gw + (WORD_LENGTH - 1) * spacing
    x = int(rng.integers(2, image_size - width - 2))
    y = int(rng.integers(2, image_size - gh - 2))
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    for k, letter in enumerate(letters):
        gx = x + k * (gw + spacing)
        mask = np.zeros((image_size, image_size), dtype=bool)
        mask[y : y + gh, gx : gx + gw] = glyph(letter, GLYPH_SCALE)
        ys, xs = np.nonzero(mask)
        obj = SyntheticObject(
            index=len(canvas.objects) + 1,
            kind="glyph",
            shape=None,
            letter=letter,
            color=None,
            center=(float(xs.mean()), float(ys.mean())),
            bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            relevant=True,
        )
        canvas.paint(mask, ink, obj)
    return canvas, QUESTIONS["reading"], "".join(letters).lower()


_TASKS = {"color": _color_task, "shape": _shape_task, "count": _count_task}


def make_sample(seed: int, index: int, family: str, grid: int = 16, image_size: int = 128) -> Sample:
    """The sample at (seed, index) of one family; pure function of its arguments."""
    fam = _family_index(family)
    if image_size % grid:
        raise ValueError(f"image_size={image_size} must be a multiple of grid={grid}")
    rng = np.random.default_rng([int(seed), int(index), fam])
    choices = ANSWERS[family]
    if family in _TASKS:
        specs, question, answer = _TASKS[family](rng, image_size)
        canvas = _scene(rng, specs, image_size)
    elif family == "relation":
        canvas, question, answer, choices = _relation_scene(rng, image_size)
    elif family == "position":
        canvas, question, answer, choices = _position_scene(rng, image_size)
    else:
        canvas, question, answer = _reading_scene(rng, image_size)
    relevant_ids = [o.index for o in canvas.objects if o.relevant]
    pixel_mask = np.isin(canvas.ids, relevant_ids)
    return Sample(
        image=Image.fromarray(canvas.rgb, mode="RGB"),
        question=question,
        answer=answer,
        family=family,
        relevance=relevance_from_mask(pixel_mask, grid),
        pixel_mask=pixel_mask,
        object_map=canvas.ids,
        objects=canvas.objects,
        choices=choices,
        seed=int(seed),
        index=int(index),
        caption=caption(canvas.objects, image_size),
    )


def region(center: tuple[float, float], image_size: int = 128) -> str:
    """Coarse region of a point, as captions name it: "top left", "middle center", ..."""
    col = min(2, int(center[0] * 3 // image_size))
    row = min(2, int(center[1] * 3 // image_size))
    return f"{ROWS[row]} {COLUMNS[col]}"


def caption(objects: Sequence[SyntheticObject], image_size: int = 128) -> str:
    """A plain-text description of a scene: its written word, or every shape with its colour and
    region, in reading order (top to bottom, left to right, by centre)."""
    glyphs = [o for o in objects if o.kind == "glyph"]
    if glyphs:
        word = "".join(o.letter for o in sorted(glyphs, key=lambda o: o.center[0])).lower()
        return f"the word {word} written on clutter"
    shapes = sorted(objects, key=lambda o: (round(o.center[1] * 3 // image_size), o.center[0]))
    if not shapes:
        return "an empty picture"
    return " and ".join(f"a {o.color} {o.shape} at {region(o.center, image_size)}" for o in shapes)


def generate(
    n: int, seed: int, family: str | Sequence[str] | None = None, grid: int = 16, image_size: int = 128
) -> list[Sample]:
    """n samples; ``family`` None cycles through all FAMILIES (balanced), a list cycles through it."""
    n, seed = check_int(n, "n", minimum=0), check_int(seed, "seed", minimum=0)  # seed=1.5 is not seed 1
    grid, image_size = check_int(grid, "grid", minimum=1), check_int(image_size, "image_size", minimum=16)
    if family is None:
        families = list(FAMILIES)
    elif isinstance(family, str):
        families = [family]
    else:
        families = list(family)
        if not families:
            raise ValueError(f"family list is empty; accepted: {', '.join(FAMILIES)}")
    for f in families:
        _family_index(f)
    return [make_sample(seed, i, families[i % len(families)], grid, image_size) for i in range(n)]


def blank_like(sample: Sample) -> Image.Image:
    """The no-image baseline picture: the plain background, no objects, same size."""
    return Image.new("RGB", sample.image.size, BACKGROUND)


def vocabulary() -> list[str]:
    """Every word a question or a closed-set answer can contain (the organism's tokenizer uses it)."""
    words: set[str] = set()
    for template in QUESTIONS.values():
        words.update(w for w in template.split() if "{" not in w)
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(COLOR_NAMES)
    words.update(COUNTS)
    for template, *answers in (*RELATION_QUESTIONS.values(), *POSITION_QUESTIONS.values()):
        words.update(w for w in template.split() if "{" not in w)
        words.update(answers)
    words.update(w for w in CAPTION_WORDS if len(w) > 1)
    return sorted(words)
