"""Real (or exported) data: JSONL manifests and plain image folders.

A manifest is one JSON object per line: ``{"image": "relative/or/absolute.png", "question": "...",
"answer": "..." (optional), ...}``; other keys are kept in ``Record.meta``. Image paths are
relative to the manifest's folder. ``write_manifest`` exports synthetic samples in that form
(PNG pictures, plus their relevance and pixel masks in one ``masks.npz``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vtrlab.io import atomic_dir

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Record:
    path: Path
    question: str | None = None
    answer: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        """The picture as RGB (opened on access, so a long manifest costs no memory)."""
        with Image.open(self.path) as im:
            return im.convert("RGB")


def read_manifest(path: str | os.PathLike) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "image" not in row:
            raise ValueError(f"{path}:{lineno}: each line needs an object with an 'image' key "
                             "(accepted keys: image, question, answer, any others kept as meta)")
        img = Path(row.pop("image"))
        img = img if img.is_absolute() else path.parent / img
        if not img.is_file():
            raise FileNotFoundError(f"{path}:{lineno}: image {img} does not exist")
        records.append(Record(img, row.pop("question", None), row.pop("answer", None), row))
    return records


def read_image_folder(folder: str | os.PathLike, question: str | None = None,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Record]:
    """Every picture in ``folder`` (sorted by name, not recursive), each with the same question."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} does not exist")
    exts = {e.lower() for e in extensions}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in exts and p.is_file())
    if not files:
        raise ValueError(f"no images in {folder} (accepted extensions: {', '.join(sorted(exts))})")
    return [Record(p, question) for p in files]


def write_manifest(samples, folder: str | os.PathLike) -> Path:
    """Export synthetic samples as PNGs + manifest.jsonl + masks.npz; the folder appears whole."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        lines, relevance, pixel = [], [], []
        for i, s in enumerate(samples):
            name = f"images/{i:06d}_{s.family}.png"
            s.image.save(tmp / name)
            lines.append(json.dumps({"image": name, "question": s.question, "answer": s.answer,
                                     "family": s.family, "seed": s.seed, "index": s.index, "mask_row": i}))
            relevance.append(s.relevance)
            pixel.append(s.pixel_mask)
        (tmp / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        np.savez_compressed(tmp / "masks.npz", relevance=np.stack(relevance), pixel_mask=np.stack(pixel))
    return folder / "manifest.jsonl"
