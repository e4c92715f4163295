"""A small real-photo set for tests and demos: scikit-image's photographs with questions,
answers and hand-drawn boxes (``data/photos/manifest.jsonl``).

Only the manifest is committed; the pictures are read from the installed scikit-image package
(``skimage.data``), never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data functions whose picture ships inside the package (no download needed).
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "page", "rocket", "motorcycle")
MANIFEST = Path(__file__).resolve().parents[2] / "data" / "photos" / "manifest.jsonl"


def check_skimage_name(name: str, where: str = "image") -> None:
    if name not in PHOTOS:
        raise ValueError(
            f"{where}: 'skimage:{name}' is not a shipped photograph; accepted: "
            + ", ".join(f"skimage:{p}" for p in PHOTOS)
        )


def skimage_photo(name: str) -> Image.Image:
    """One of scikit-image's photographs as an RGB picture (``motorcycle``: the stereo pair's left view)."""
    check_skimage_name(name)
    import skimage.data

    arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise TypeError(f"skimage.data.{name}() returned {arr.dtype}, expected uint8")
    return Image.fromarray(arr).convert("RGB")


def photos_manifest() -> Path:
    """Path of the committed photo manifest (``data/photos/manifest.jsonl``)."""
    if not MANIFEST.is_file():
        raise FileNotFoundError(f"{MANIFEST} is missing: the photo set ships with the repository checkout")
    return MANIFEST
