"""Turning what users pass as an image into a PIL image, or a clear error naming what was wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

ACCEPTED = "PIL images, H×W×3 (or H×W) uint8/float arrays, or paths to image files"


def as_image(obj: Any, where: str = "image") -> Image.Image:
    """``obj`` as an RGB PIL image; ``where`` names it in errors (e.g. "sample 2, image 0")."""
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: no image file at '{path}'; accepted: {ACCEPTED}")
        try:
            with Image.open(path) as im:
                im.load()  # decode now: a truncated or corrupt file fails here, not deep in a processor
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise ValueError(f"{where}: '{path}' is not a readable image ({err})") from None
        _check_size(image, where)
        return image
    if isinstance(obj, Image.Image):
        try:
            obj.load()
        except (OSError, SyntaxError) as err:
            raise ValueError(f"{where}: the PIL image cannot be decoded ({err})") from None
        _check_size(obj, where)
        return obj if obj.mode == "RGB" else obj.convert("RGB")
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        arr = obj
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            raise ValueError(f"{where}: array of shape {arr.shape} looks channels-first; pass H×W×3")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or min(arr.shape[:2]) < 1:
            raise ValueError(f"{where}: array of shape {obj.shape} is not an image; accepted: {ACCEPTED}")
        if arr.dtype.kind not in "uif" or arr.dtype.itemsize > 8:  # bool, complex, object, strings
            raise TypeError(f"{where}: array of dtype {arr.dtype} is not an image; accepted: {ACCEPTED}")
        if arr.dtype != np.uint8:
            arr = np.asarray(arr, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise ValueError(f"{where}: array holds NaN or inf values")
            if arr.min() < 0 or arr.max() > 255:
                raise ValueError(f"{where}: values span [{arr.min():g}, {arr.max():g}]; expected [0, 1] or [0, 255]")
            arr = arr * 255.0 if arr.max() <= 1.0 else arr
            arr = np.round(arr).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"{where}: got {type(obj).__name__}; accepted: {ACCEPTED}")


def _check_size(image: Image.Image, where: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{where}: image of size {width}×{height} has no pixels")
