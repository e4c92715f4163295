"""Loading VLMs and describing them: one adapter per family, exact image-token layouts."""

from .base import Batch, FamilyAdapter, ImageLayout
from .vlm import VLM

__all__ = ["Batch", "FamilyAdapter", "ImageLayout", "VLM", "load"]


def load(*args, **kwargs):
    from .loader import load as _load

    return _load(*args, **kwargs)
