"""Model-randomization sanity check (Adebayo et al. 2018, "Sanity checks for saliency maps").

Re-initialise the model's layers cumulatively from the top — LM layers L-1, then L-1 and L-2, ... — and,
in a second cascade (LM trained), the vision tower's layers from the top; after each step recompute
every signal and compare it with the signal of the trained model (Spearman over image tokens) and with
the ground truth (AUROC). A signal that survives re-initialisation of the weights it claims to explain
is explaining the input (or the architecture), not the model.

The model is changed in place only inside :func:`randomized`, which saves the re-initialised layers'
tensors first and restores them bit for bit on exit, also on an exception; the caller's model is
never left modified.

A *signal function* takes ``(vlm, batch)`` and returns ``{name: [scores per image token, per sample]}``
(aligned with ``layout.image_positions``); :func:`attention_signals` is the default (LM attention of the
last token per layer, and vision [CLS] attention per vision layer mapped onto the LM's tokens by grid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from vtrlab.metrics import agreement, controls

SignalFn = Callable[[Any, Any], Mapping[str, Sequence[np.ndarray]]]


def _reinit_(module: nn.Module, generator: torch.Generator, std: float) -> None:
    """Fresh random init of every parameter of ``module``: weight matrices ~ N(0, std²), biases 0,
    1-D norm scales 1 (the usual transformer init), drawn from ``generator``."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                draw = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                p.copy_((draw * std).to(p.dtype))
            elif leaf == "bias":
                p.zero_()
            else:  # 1-D scales (LayerNorm / RMSNorm weight) and other vectors
                p.fill_(1.0)


def _init_std(vlm: Any) -> float:
    for cfg in (getattr(vlm.model.config, "text_config", None), vlm.model.config):
        std = getattr(cfg, "initializer_range", None)
        if std:
            return float(std)
    return 0.02


@contextlib.contextmanager
def randomized(vlm: Any, modules: Sequence[nn.Module], seed: int = 0) -> Iterator[Any]:
    """Inside the block, ``modules`` (e.g. ``vlm.lm_layers[3:]``) carry fresh random weights; on exit their
    saved tensors are copied back (bit-identical), also when the block raises."""
    saved = [{k: v.detach().clone() for k, v in m.state_dict(keep_vars=False).items()} for m in modules]
    gen = torch.Generator().manual_seed(int(seed))
    std = _init_std(vlm)
    try:
        for m in modules:
            _reinit_(m, gen, std)
        yield vlm
    finally:
        with torch.no_grad():
            for m, state in zip(modules, saved):
                m.load_state_dict(state, strict=True)


def cascade_steps(vlm: Any, stacks: Sequence[str] = ("lm", "vision")) -> list[tuple[str, str, list[nn.Module]]]:
    """The cascade: ``(stack, step name, modules re-initialised)`` per step; "trained" first (nothing),
    then for each stack its layers from the top, cumulatively (``lm.5``, ``lm.5-4``, ...). Each stack
    cascades on its own (the other one trained)."""
    bad = [s for s in stacks if s not in ("lm", "vision")]
    if bad:
        raise ValueError(f"stacks {bad}; accepted: 'lm', 'vision'")
    steps: list[tuple[str, str, list[nn.Module]]] = [("trained", "trained", [])]
    for stack in stacks:
        layers = list(vlm.lm_layers if stack == "lm" else vlm.vision_layers)
        top = len(layers) - 1
        for k in range(top, -1, -1):
            name = f"{stack}.{top}" if k == top else f"{stack}.{top}-{k}"
            steps.append((stack, name, layers[k:]))
    return steps


def attention_signals(
    vlm: Any, batch: Any, layers="all", vision: bool = True, vision_layers="all"
) -> dict[str, list[np.ndarray]]:
    """LM attention of the last token to each image token per layer (``lm_attn.<l>``, mean over heads), and
    the vision [CLS] attention per vision layer (``cls_attn.<l>``) read at each LM token's grid cell.
    Every signal kind of the kit: :mod:`vtrlab.analysis.signals`."""
    from vtrlab.models.base import grid_values
    from vtrlab.probes import capture

    from .attention import image_token_scores, vision_token_scores

    ds = capture(vlm, batch, queries="last", layers=layers, vision=vision, vision_layers=vision_layers)
    out: dict[str, list[np.ndarray]] = {}
    lm = image_token_scores(ds)
    for lay, g in lm.groupby("layer", sort=True):
        out[f"lm_attn.{int(lay)}"] = [
            g[g["sample"] == b].set_index("position").loc[lay_.image_positions, "score"].fillna(0.0).to_numpy()
            for b, lay_ in enumerate(batch.layouts)
        ]
    if vision and "vision_attn" in ds:
        vt = vision_token_scores(ds)
        vt = vt[(vt["image"] == 0) & (vt["tile"] == 0)]
        for lay, g in vt.groupby("vision_layer", sort=True):
            per = []
            for b, layout in enumerate(batch.layouts):
                gb = g[g["sample"] == b]
                grid = np.zeros((int(gb["row"].max()) + 1, int(gb["col"].max()) + 1))
                grid[gb["row"].to_numpy(), gb["col"].to_numpy()] = gb["score"].to_numpy()
                sel = layout.kind == "image"
                lm_grid = layout.grid(0, 0)
                if grid.shape[0] < lm_grid[0]:
                    raise ValueError(f"vision grid {grid.shape} is coarser than the LM grid {lm_grid}")
                fr, fc = grid.shape[0] // lm_grid[0], grid.shape[1] // lm_grid[1]
                pooled = grid[: fr * lm_grid[0], : fc * lm_grid[1]].reshape(lm_grid[0], fr, lm_grid[1], fc).mean((1, 3))
                per.append(grid_values(pooled, lm_grid, layout.row[sel], layout.col[sel]))
            out[f"cls_attn.{int(lay)}"] = per
    return out


def randomization_check(
    vlm: Any,
    batch: Any,
    signal_fn: SignalFn = attention_signals,
    relevance: Sequence[np.ndarray | None] | None = None,
    stacks: Sequence[str] = ("lm", "vision"),
    seed: int = 0,
    families: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Run the cascade on one batch. Per step, signal and sample: spearman (with the trained model's map)
    and auroc (against ``relevance[i]``, bool per image token; NaN without it). Columns: step (0 =
    trained), step_name, stack, signal, sample, family, spearman, auroc. The model is restored after
    each step (:func:`randomized`)."""
    steps = cascade_steps(vlm, stacks)
    trained: Mapping[str, Sequence[np.ndarray]] | None = None
    rows = []
    for i, (stack, name, modules) in enumerate(steps):
        with randomized(vlm, modules, seed=seed + i):
            sig = signal_fn(vlm, batch)
        if trained is None:
            trained = sig
        for sname, per in sig.items():
            for b, s in enumerate(per):
                s = np.asarray(s, dtype=np.float64)
                rel = None if relevance is None else relevance[b]
                ok = rel is not None and rel.any() and not rel.all()
                rows.append(
                    {
                        "step": i,
                        "step_name": name,
                        "stack": stack,
                        "signal": sname,
                        "sample": b,
                        "family": None if families is None else families[b],
                        "spearman": float(agreement.spearman(s, np.asarray(trained[sname][b], dtype=np.float64))),
                        "auroc": float(agreement.auroc(s, rel)) if ok else np.nan,
                    }
                )
    return pd.DataFrame(rows)


def randomization_ci(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean Spearman and AUROC per step and signal with bootstrap 95% CIs over samples. Columns: step,
    step_name, stack, signal, metric, mean, low, high, n."""
    return controls.ci_table(
        table, ["step", "step_name", "stack", "signal"], ["spearman", "auroc"], n_boot=n_boot, seed=seed
    )
