"""Reconstruction: the "When Less is Enough" selector and reconstruction error as an importance signal.

sel = vtrlab.recon.Selector.load("data/models/organism/selector")
keep = sel.select(vlm, batch, ratio=0.3)        # per sample, bool over image tokens (layout order)
answers = vtrlab.answer(vlm, batch, keep=keep)
err = vtrlab.recon.token_error(vlm, batch, selector=sel)            # Dataset: recon_error (sample, token)
lerr = vtrlab.recon.layer_error(vlm, batch, layers="all", vision_layers="all")
# Dataset: lm_error (sample, layer, token), vision_error (sample, vision_layer, token)
"""

from .error import masked_token_error, token_error
from .features import SampleFeatures, token_features, vision_features
from .ridge import layer_error, ridge_token_error
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
    "layer_error",
    "ridge_token_error",
    "token_features",
    "masked_token_error",
    "selector_loss",
    "token_error",
    "topk_reconstruction_error",
    "train_selector",
    "vision_features",
]
