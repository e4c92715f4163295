"""The "When Less is Enough" selector: keep the image tokens with the largest selector logits.

Source: Allakhverdov, Goncharova, Kuznetsov (2025), "When Less is Enough: Adaptive Token Reduction
for Efficient Image Representation" — a learned Gumbel-Softmax selector over vision features,
trained with a reconstructor; at inference tokens are ranked by the selector's logits and the top
k kept. vtrlab's implementation and training live in :mod:`vtrlab.recon` (``Selector``); this
method only ranks with a trained one. ``path``: a directory written by ``Selector.save``; empty
(default) = the selector shipped beside the organism (``data/models/organism/selector``), which was
trained for the organism only. A token's score is the mean logit of the vision patches it covers.
Positions kept (the selector only chooses the keep mask; vtrlab's keep path keeps position ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..context import top_k_mask
from ..registry import Method, NotApplicable, Selection, register


@register("selector")
class LearnedSelector(Method):
    stage = "projector"
    positions = "kept"
    merges = False
    defaults = {"path": ""}
    source = "vtrlab.recon.Selector (When Less is Enough, 2025): top-k by the selector's logits"

    def _path(self) -> Path:
        from ...models.loader import organism_path

        p = str(self.params["path"])
        return Path(p).expanduser() if p else organism_path() / "selector"

    def check(self, vlm):
        path = self._path()
        if not (path / "config.json").is_file():
            raise NotApplicable(
                self.name,
                vlm.family,
                f"no trained selector at {str(path)!r}; train one with vtrlab.recon.train_selector and pass path=",
            )
        if not self.params["path"] and vlm.name != "organism":
            raise NotApplicable(
                self.name,
                vlm.family,
                f"the shipped selector was trained for the organism, not "
                f"{vlm.name!r}; pass path= to a selector trained for this model",
            )

    def select(self, ctx, n_keep):
        from ...recon import Selector

        key = ("selector", str(self._path()))
        sel = ctx.cached(key, lambda: Selector.load(self._path(), device=ctx.vlm.device))
        scores = sel.token_scores(ctx.vlm, ctx.batch)
        keep = [top_k_mask(np.where(np.isfinite(s), s, -np.inf), k) for s, k in zip(scores, n_keep)]
        return Selection(keep=keep, scores=[np.asarray(s, dtype=float) for s in scores])
