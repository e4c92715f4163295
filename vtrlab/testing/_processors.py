"""Build real HF processors offline for tiny test models.

Two frictions of a torchvision-free CPU environment are handled here, for tests only:
- image processors default to the torchvision backend; we pick the PIL backend when torchvision
  is missing (same resize/split arithmetic; transformers would fall back with a warning anyway);
- processors with a video slot (Qwen2-VL, SmolVLM, ...) check every attribute's class in
  ``__init__``, and the video base class is not importable without torchvision, so the check
  fails even for ``video_processor=None``. We skip that type check on the one instance we build.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers.utils import is_torchvision_available

_IMAGE_PROCESSORS = {
    "qwen2_vl": "Qwen2VLImageProcessor",
    "idefics3": "Idefics3ImageProcessor",
    "smolvlm": "SmolVLMImageProcessor",
    "gemma3": "Gemma3ImageProcessor",
}


def image_processor_class(family: str) -> type:
    """The image-processor class of ``family``: torchvision backend if available, else PIL."""
    try:
        name = _IMAGE_PROCESSORS[family]
    except KeyError:
        raise ValueError(f"no image processor known for {family!r}; known: {sorted(_IMAGE_PROCESSORS)}") from None
    if not is_torchvision_available() and hasattr(transformers, name + "Pil"):
        name += "Pil"
    return getattr(transformers, name)


def build_processor(processor_cls: type, **kwargs: Any) -> Any:
    """``processor_cls(**kwargs)``; without torchvision, skipping only the attribute class check."""
    if is_torchvision_available():
        return processor_cls(**kwargs)
    proc = processor_cls.__new__(processor_cls)
    proc.check_argument_for_proper_class = lambda name, arg: type(arg)  # instance-level, this object only
    proc.__init__(**kwargs)
    del proc.check_argument_for_proper_class
    return proc


_VIDEO_PROCESSORS = {"qwen2_vl": "Qwen2VLVideoProcessor", "smolvlm": "SmolVLMVideoProcessor"}


class NoVideoProcessor(dict):
    """Stands in for a video processor (which needs torchvision) in image-only tests. SmolVLM's
    ``apply_chat_template`` reads ``num_frames``/``fps`` from it even for image-only chats.
    (A dict so that the processor's JSON repr/serialization still works: it serializes as {}.)"""

    num_frames = 64
    fps = 1

    def __call__(self, *args, **kwargs):
        raise RuntimeError("tiny test processors have no video support")


def video_processor(family: str) -> object:
    """The family's real video processor when torchvision is installed, else a stand-in."""
    if is_torchvision_available():
        return getattr(transformers, _VIDEO_PROCESSORS[family])()
    return NoVideoProcessor()
