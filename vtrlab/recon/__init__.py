"""Reconstruction: the "When Less is Enough" selector and reconstruction error as an importance signal.

    sel = vtrlab.recon.Selector.load("data/models/organism/selector")
    keep = sel.select(vlm, batch, ratio=0.3)        # per sample, bool over image tokens (layout order)
    answers = vtrlab.answer(vlm, batch, keep=keep)
"""

from .error import masked_token_error, token_error
from .features import SampleFeatures, vision_features
from .selector import (
    Selector,
    SelectorConfig,
    gumbel_keep_mask,
    selector_loss,
    topk_reconstruction_error,
    train_selector,
)

__all__ = [
    "SampleFeatures",
    "Selector",
    "SelectorConfig",
    "gumbel_keep_mask",
    "masked_token_error",
    "selector_loss",
    "token_error",
    "topk_reconstruction_error",
    "train_selector",
    "vision_features",
]
