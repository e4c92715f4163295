"""One record type for every source of image–question data, JSONL manifests and image folders.

A ``Record`` is one sample: a picture (read on access, so a long dataset costs no memory), a
question, the accepted answers, optional ground truth (pixel boxes and/or a pixel mask in the
original picture), a group (task family, question type, ...) and an id. The synthetic organism
samples, manifests, image folders, parquet/JSON files and Hugging Face datasets all become
``Record`` objects (``vtrlab.data.sources.load_data``).

A manifest is one JSON object per line::

    {"image": "images/cat.png", "question": "What animal is this?", "answers": ["cat", "kitten"],
     "boxes": [[30, 0, 400, 290]], "mask": "masks/cat.png", "group": "animals", "id": "cat-1"}

``image`` (required) is a path relative to the manifest's folder, an absolute path, or
``skimage:<name>`` (a photograph shipped with scikit-image). ``answer`` (one string) or
``answers`` (a list of strings, or VQA-style ``[{"answer": ...}, ...]``), ``boxes`` (pixel
``[x0, y0, x1, y1]`` or a list of them; see ``BOX_FORMATS``), ``mask`` (a picture file, nonzero =
relevant, same size as the image), ``object_mask`` (a picture file of every object's pixels: the objectness
controls' map) and ``group``/``family`` are optional; other keys go to ``meta``.
``write_manifest`` exports synthetic samples in that form (PNG pictures and PNG pixel masks).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vtrlab.io import atomic_dir

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# (corner convention, normalised): x0,y0,x1,y1 or x,y,w,h; in pixels or as fractions of width/height.
BOX_FORMATS = ("xyxy", "xywh", "xyxy_norm", "xywh_norm")
SKIMAGE_PREFIX = "skimage:"


def _open_rgb(source: Any) -> Image.Image:
    """A picture from a path, ``skimage:<name>``, encoded bytes, a PIL image, an array or a callable."""
    if callable(source) and not isinstance(source, Image.Image):
        source = source()
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        return Image.fromarray(np.asarray(arr)).convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(source))) as im:
            return im.convert("RGB")
    if isinstance(source, str) and source.startswith(SKIMAGE_PREFIX):
        from vtrlab.data.photos import skimage_photo

        return skimage_photo(source[len(SKIMAGE_PREFIX) :])
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as im:
            return im.convert("RGB")
    raise TypeError(
        f"cannot read an image from {type(source).__name__}; accepted: a path, "
        "'skimage:<name>', encoded bytes, a PIL image, a numpy array or a callable returning one"
    )


def read_mask(source: Any) -> np.ndarray:
    """A pixel mask (H, W) as float in [0, 1] from a picture file, encoded bytes or an array.

    Boolean and integer masks: nonzero = relevant (1.0); float masks are kept as soft weights
    (must lie in [0, 1]); a colour picture is relevant where any channel is nonzero.
    """
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as im:
            arr = np.asarray(im)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(source))) as im:
            arr = np.asarray(im)
    else:
        arr = np.asarray(source)
    if arr.ndim == 3:
        arr = (arr != 0).any(axis=2)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D (height, width); got shape {arr.shape}")
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return (arr != 0).astype(np.float64)
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"a float mask must lie in [0, 1]; got values in [{np.nanmin(arr)}, {np.nanmax(arr)}]")
    return arr


def parse_boxes(value: Any, where: str = "boxes") -> np.ndarray | None:
    """``None`` → None; one box ``[a, b, c, d]`` or a list of them → float array (n, 4)."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=object)
    if arr.size == 0:
        return np.zeros((0, 4))
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a box [x0, y0, x1, y1] or a list of boxes") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
        raise ValueError(f"{where}: {value!r} is not a box [x0, y0, x1, y1] or a list of boxes (finite numbers)")
    return arr


def parse_answers(value: Any, where: str = "answers") -> tuple[str, ...]:
    """One answer, a list of answers, or VQA-style ``[{"answer": ...}, ...]`` → tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, Sequence):
        out = []
        for a in value:
            if isinstance(a, dict) and "answer" in a:
                a = a["answer"]
            if not isinstance(a, (str, int, float)) or isinstance(a, bool):
                raise ValueError(
                    f"{where}: answer {a!r} is not a string (accepted: a string, a list of strings, "
                    "or a list of {{'answer': str}} objects)"
                )
            out.append(str(a))
        return tuple(out)
    raise ValueError(
        f"{where}: {value!r} is not an answer (accepted: a string, a list of strings, "
        "or a list of {'answer': str} objects)"
    )


@dataclass
class Record:
    """One image–question sample with its optional ground truth.

    ``boxes`` are in ``box_format`` (see ``BOX_FORMATS``) and are converted to pixel corners by
    ``pixel_boxes()``; ``mask`` is a pixel mask of the original picture (or a source read on
    access by ``pixel_mask``). ``relevance`` is the organism's own patch-grid mask, kept only as
    a reference: ground truth for any model comes from the pixels (``vtrlab.data.groundtruth``).
    """

    id: str
    image_source: Any  # Path | 'skimage:<name>' | bytes | PIL image | array | callable
    question: str | None = None
    answers: tuple[str, ...] = ()
    boxes: np.ndarray | None = None
    box_format: str = "xyxy"
    mask: Any = None
    group: str | None = None
    relevance: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    objects: Any = None  # pixel mask of every object (a source as ``mask``): the objectness controls' map

    def __post_init__(self):
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"box_format={self.box_format!r}; accepted: {', '.join(BOX_FORMATS)}")
        self.answers = parse_answers(self.answers, f"record {self.id}: answers")
        self.boxes = parse_boxes(self.boxes, f"record {self.id}: boxes")

    @property
    def image(self) -> Image.Image:
        """The picture as RGB (read on access)."""
        return _open_rgb(self.image_source)

    @property
    def path(self) -> Path | None:
        src = self.image_source
        return Path(src) if isinstance(src, (os.PathLike, str)) and not str(src).startswith(SKIMAGE_PREFIX) else None

    @property
    def answer(self) -> str | None:
        """The first accepted answer (the reference answer), or None."""
        return self.answers[0] if self.answers else None

    @property
    def family(self) -> str:
        """The group, as the synthetic samples name it ("all" for a record without one)."""
        return "all" if self.group is None else self.group

    @property
    def has_ground_truth(self) -> bool:
        return self.boxes is not None or self.mask is not None

    def image_size(self) -> tuple[int, int]:
        """(width, height) of the picture."""
        src = self.image_source
        if isinstance(src, (str, os.PathLike)) and not str(src).startswith(SKIMAGE_PREFIX):
            with Image.open(src) as im:
                return im.size
        return self.image.size

    def pixel_boxes(self, image_size: tuple[int, int] | None = None) -> np.ndarray | None:
        """Boxes as pixel corners (n, 4) [x0, y0, x1, y1] in the original picture, or None."""
        if self.boxes is None:
            return None
        return to_pixel_boxes(
            self.boxes,
            self.box_format,
            image_size if image_size is not None or "norm" not in self.box_format else self.image_size(),
        )

    @property
    def object_mask(self) -> np.ndarray | None:
        """Bool (H, W): pixels of any object (manifest key ``object_mask``, read on access), or None."""
        return None if self.objects is None else read_mask(self.objects) > 0

    @property
    def pixel_mask(self) -> np.ndarray | None:
        """The mask as float (H, W) in [0, 1] (read on access), or None; same name as the synthetic
        ``Sample.pixel_mask``, so ground truth reads either kind of sample."""
        return None if self.mask is None else read_mask(self.mask)


def to_pixel_boxes(boxes: np.ndarray, box_format: str, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Convert boxes (n, 4) in ``box_format`` to pixel corners [x0, y0, x1, y1]; refuse empty/flipped boxes."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format={box_format!r}; accepted: {', '.join(BOX_FORMATS)}")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    if box_format.startswith("xywh"):
        b[:, 2:] += b[:, :2]
    if box_format.endswith("_norm"):
        if image_size is None:
            raise ValueError("normalised boxes need the image size")
        if (b < 0).any() or (b > 1).any():
            raise ValueError(f"box_format={box_format!r} needs coordinates in [0, 1]; got {boxes.tolist()}")
        w, h = image_size
        b *= np.array([w, h, w, h], dtype=np.float64)
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        raise ValueError(f"box {boxes[bad][0].tolist()} ({box_format}) has x1 < x0 or y1 < y0")
    return b


def _resolve(value: str, base: Path, where: str) -> Any:
    if value.startswith(SKIMAGE_PREFIX):
        from vtrlab.data.photos import check_skimage_name

        check_skimage_name(value[len(SKIMAGE_PREFIX) :], where)
        return value
    p = Path(value)
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise FileNotFoundError(f"{where}: file {p} does not exist")
    return p


def read_manifest(path: str | os.PathLike, *, box_format: str = "xyxy") -> list[Record]:
    """Every line of a JSONL manifest as a ``Record`` (see the module docstring for the keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "image" not in row:
            raise ValueError(
                f"{path}:{lineno}: each line needs an object with an 'image' key "
                "(accepted keys: image, question, answer/answers, boxes, mask, group/family, id; "
                "others are kept as meta)"
            )
        rows.append((lineno, row))
    return [
        record_from_row(
            row, base=path.parent, where=f"{path}:{lineno}", default_id=str(lineno - 1), box_format=box_format
        )
        for lineno, row in rows
    ]


def record_from_row(
    row: dict,
    *,
    base: Path,
    where: str,
    default_id: str,
    box_format: str = "xyxy",
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str | None = None,
    boxes_column: str = "boxes",
    mask_column: str = "mask",
    group_column: str | None = None,
    id_column: str = "id",
) -> Record:
    """One row (a dict) → ``Record``; string image/mask values are paths relative to ``base``."""
    row = dict(row)
    if image_column not in row:
        raise ValueError(f"{where}: no column {image_column!r} (image_column); have {sorted(row)}")
    image = row.pop(image_column)
    if isinstance(image, dict):  # HF / parquet image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str):
        image = _resolve(image, base, where)
    if image is None:
        raise ValueError(f"{where}: image ({image_column!r}) is empty")
    if answer_column is None:
        answer_column = "answers" if "answers" in row else "answer"
        answers = row.pop(answer_column, None)
    else:
        if answer_column not in row:
            raise ValueError(f"{where}: no column {answer_column!r} (answer_column); have {sorted(row)}")
        answers = row.pop(answer_column)
    if group_column is None:
        group_column = "group" if "group" in row else "family"
    mask = row.pop(mask_column, None)
    if isinstance(mask, dict):
        mask = mask.get("bytes") or mask.get("path")
    if isinstance(mask, str):
        mask = _resolve(mask, base, where)
    objects = row.pop("object_mask", None)  # every object's pixels (the objectness controls), as mask
    if isinstance(objects, dict):
        objects = objects.get("bytes") or objects.get("path")
    if isinstance(objects, str):
        objects = _resolve(objects, base, where)
    group = row.pop(group_column, None)
    rid = row.pop(id_column, None)
    return Record(
        id=str(default_id if rid is None else rid),
        image_source=image,
        question=row.pop(question_column, None),
        answers=parse_answers(answers, f"{where}: {answer_column}"),
        boxes=parse_boxes(row.pop(boxes_column, None), f"{where}: {boxes_column}"),
        box_format=box_format,
        mask=mask,
        group=None if group is None else str(group),
        meta=row,
        objects=objects,
    )


def read_image_folder(
    folder: str | os.PathLike, question: str | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[Record]:
    """Every picture in ``folder`` (sorted by name, not recursive), each with the same question."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} does not exist")
    exts = {e.lower() for e in extensions}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in exts and p.is_file())
    if not files:
        raise ValueError(f"no images in {folder} (accepted extensions: {', '.join(sorted(exts))})")
    return [Record(id=p.name, image_source=p, question=question) for p in files]


def write_manifest(samples, folder: str | os.PathLike) -> Path:
    """Export synthetic samples as PNG pictures, PNG pixel masks and manifest.jsonl; the folder appears whole.

    Each line holds image, question, answers, group (the task family), id, mask (the sample's
    ``pixel_mask`` as a 1-bit PNG), object_mask (every object's pixels, 1-bit PNG: the objectness controls)
    and the generator's seed and index.
    """
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        (tmp / "objects").mkdir()
        lines = []
        for i, s in enumerate(samples):
            name = f"{i:06d}_{s.family}.png"
            s.image.save(tmp / "images" / name)
            Image.fromarray(np.asarray(s.pixel_mask, dtype=bool)).save(tmp / "masks" / name)
            Image.fromarray(np.asarray(s.object_map) > 0).save(tmp / "objects" / name)
            row = {
                "id": f"organism-{s.seed}-{s.index}-{s.family}",
                "image": f"images/{name}",
                "question": s.question,
                "answers": [s.answer],
                "group": s.family,
                "mask": f"masks/{name}",
                "object_mask": f"objects/{name}",
                "seed": s.seed,
                "index": s.index,
            }
            lines.append(json.dumps(row))
        (tmp / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"
