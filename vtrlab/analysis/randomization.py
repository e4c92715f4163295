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


def cascade_steps(
    vlm: Any, stacks: Sequence[str] = ("lm", "vision"), per_stack: int | None = None
) -> list[tuple[str, str, list[nn.Module]]]:
    """The cascade: ``(stack, step name, modules re-initialised)`` per step; "trained" first (nothing),
    then for each stack its layers from the top, cumulatively (``lm.5``, ``lm.5-4``, ...). Each stack
    cascades on its own (the other one trained). ``per_stack``: keep only that many of each stack's steps,
    evenly spaced and always ending with the whole stack re-initialised (None: every layer, Adebayo's
    cascade)."""
    bad = [s for s in stacks if s not in ("lm", "vision")]
    if bad:
        raise ValueError(f"stacks {bad}; accepted: 'lm', 'vision'")
    if per_stack is not None and (isinstance(per_stack, bool) or int(per_stack) < 1):
        raise ValueError(f"per_stack={per_stack!r}; accepted: None or a positive integer")
    steps: list[tuple[str, str, list[nn.Module]]] = [("trained", "trained", [])]
    for stack in stacks:
        layers = list(vlm.lm_layers if stack == "lm" else vlm.vision_layers)
        top = len(layers) - 1
        ks = list(range(top, -1, -1))  # first re-initialised layer of each cumulative step
        if per_stack is not None and per_stack < len(ks):
            picks = np.unique(np.round(np.linspace(0, len(ks) - 1, int(per_stack) + 1)[1:]).astype(int))
            ks = [ks[i] for i in picks]
        for k in ks:
            name = f"{stack}.{top}" if k == top else f"{stack}.{top}-{k}"
            steps.append((stack, name, layers[k:]))
    return steps


def attention_signals(
    vlm: Any, batch: Any, layers="all", vision: bool = True, vision_layers="all"
) -> dict[str, list[np.ndarray]]:
    """LM attention of the last token to each image token per layer (``lm_attn.<l>``, mean over heads), and
    the vision [CLS] attention per vision layer (``cls_attn.<l>``) read at each LM token's grid cell
    (:func:`vtrlab.analysis.signals.attention_signals`; every signal kind of the kit: that module)."""
    from .signals import attention_signals as run

    return run(vlm, batch, layers=layers, vision=vision, vision_layers=vision_layers)


def randomization_check(
    vlm: Any,
    batch: Any,
    signal_fn: SignalFn = attention_signals,
    relevance: Sequence[np.ndarray | None] | None = None,
    stacks: Sequence[str] = ("lm", "vision"),
    seed: int = 0,
    families: Sequence[str] | None = None,
    objects: Sequence[np.ndarray | None] | None = None,
    per_stack: int | None = None,
) -> pd.DataFrame:
    """Run the cascade (:func:`cascade_steps`, ``per_stack`` steps per stack) on one batch. Per step, signal
    and sample: spearman (with the trained model's map),
    auroc (against ``relevance[i]``, bool per image token; NaN without it) and object_auroc (target vs
    distractor object tokens, ``objects[i]`` bool per image token; NaN without it). Columns: step (0 =
    trained), step_name, stack, signal, sample, family, spearman, auroc, object_auroc. ``signal_fn``: any
    ``(vlm, batch) -> {name: per-sample scores}``, e.g. :func:`vtrlab.analysis.signals.signal_fn` for every
    signal of the kit; a sample whose score is None (e.g. no ground truth) is left out for that signal. The
    model is restored after each step (:func:`randomized`)."""
    n = len(batch.layouts)
    for what, seq in (("relevance", relevance), ("families", families), ("objects", objects)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} entries for a batch of {n} samples")
    steps = cascade_steps(vlm, stacks, per_stack)
    trained: Mapping[str, Sequence[np.ndarray]] | None = None
    rows = []
    for i, (stack, name, modules) in enumerate(steps):
        with randomized(vlm, modules, seed=seed + i):
            sig = signal_fn(vlm, batch)
        if trained is None:
            trained = sig
        for sname, per in sig.items():
            if sname not in trained:
                raise ValueError(f"signal {sname!r} appeared at step {name!r} but not on the trained model")
            for b, s in enumerate(per):
                if s is None or trained[sname][b] is None:
                    continue
                s = np.asarray(s, dtype=np.float64)
                rel = None if relevance is None else relevance[b]
                ok = rel is not None and rel.any() and not rel.all()
                obj = None if objects is None or not ok else objects[b]
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
                        "object_auroc": float(controls.object_auroc(s, rel, obj)) if obj is not None else np.nan,
                    }
                )
    cols = ["step", "step_name", "stack", "signal", "sample", "family", "spearman", "auroc", "object_auroc"]
    return pd.DataFrame(rows, columns=cols)


RANDOMIZATION_METRICS = ("spearman", "auroc", "object_auroc")


def randomization_ci(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0, by_family: bool = False) -> pd.DataFrame:
    """Mean Spearman, AUROC and object AUROC per step and signal with bootstrap 95% CIs over samples (with
    ``by_family``, also per family; family ``"all"`` pools every sample). Columns: [family,] step, step_name,
    stack, signal, metric, mean, low, high, n."""
    metrics = [m for m in RANDOMIZATION_METRICS if m in table.columns]
    by = ["step", "step_name", "stack", "signal"]
    if not by_family:
        return controls.ci_table(table, by, metrics, n_boot=n_boot, seed=seed)
    parts = [controls.ci_table(table.assign(family="all"), ["family", *by], metrics, n_boot=n_boot, seed=seed)]
    if table["family"].notna().any():
        parts.insert(0, controls.ci_table(table, ["family", *by], metrics, n_boot=n_boot, seed=seed))
    return pd.concat(parts, ignore_index=True)


def randomization_summary(ci: pd.DataFrame) -> dict:
    """Metrics to log from :func:`randomization_ci` (pooled rows, or family ``"all"``): per signal and
    stack, its Spearman with the trained map and its AUROC once the whole stack is re-initialised (the
    cascade's last step of that stack), with CIs. Keys ``rand_<metric>/<stack>/<signal>`` (+ ``_low``,
    ``_high``); JSON-ready floats."""
    if "family" in ci.columns:
        ci = ci[ci["family"] == "all"]
    out: dict = {}
    for stack, g in ci[ci["stack"] != "trained"].groupby("stack", sort=True):
        last = g[g["step"] == g["step"].max()]
        for _, r in last.iterrows():
            key = f"rand_{r['metric']}/{stack}/{r['signal']}"
            out |= {key: float(r["mean"]), f"{key}_low": float(r["low"]), f"{key}_high": float(r["high"])}
    trained = ci[ci["stack"] == "trained"]
    for _, r in trained[trained["metric"] != "spearman"].iterrows():
        key = f"rand_{r['metric']}/trained/{r['signal']}"
        out |= {key: float(r["mean"]), f"{key}_low": float(r["low"]), f"{key}_high": float(r["high"])}
    return out


def randomization_prose(metrics: Mapping, max_rho: float = 0.5) -> list[str]:
    """One line per signal from :func:`randomization_summary` values (e.g. read back from metrics.json): its
    Spearman with the trained map once the LM (and the tower) is random, and whether it passes the check —
    the map changes (upper CI bound of Spearman below ``max_rho``) when the weights it depends on
    (:data:`vtrlab.analysis.signals.DEPENDS`) are re-initialised. Signals that depend on no weights (ground
    truth, random) are the references that must not change."""
    from .signals import describe

    def num(key):
        return float(metrics[key])

    sigs = list(
        dict.fromkeys(
            k.split("/", 2)[2] for k in metrics if k.startswith("rand_spearman/") and not k.endswith(("_low", "_high"))
        )
    )
    lines = [
        f"Model randomization (Spearman with the trained map after re-initialising a whole stack; passes: < {max_rho}):"
    ]
    for sig in sigs:
        try:
            depends = describe(sig)["depends"]
        except ValueError:
            depends = ("lm", "vision")
        parts, failed, tested = [], [], []
        for stack in ("lm", "vision"):
            key = f"rand_spearman/{stack}/{sig}"
            if key not in metrics:
                continue
            v, lo, hi = num(key), num(key + "_low"), num(key + "_high")
            parts.append(f"{stack} random {v:.2f} [{lo:.2f}, {hi:.2f}]")
            if stack in depends and np.isfinite(hi):
                tested.append(stack)
                if hi >= max_rho:
                    failed.append(stack)
        au = f"rand_auroc/trained/{sig}"
        if au in metrics and np.isfinite(num(au)):
            parts.append(f"trained AUROC {num(au):.2f}")
        if not depends:
            tag = "reference (depends on no weights)"
        elif not tested:
            tag = "not tested"
        elif failed:
            tag = f"FAILS: the map survives re-initialising the {' and the '.join(failed)} stack"
        else:
            tag = "passes"
        lines.append(f"  {sig}: " + "; ".join(parts) + f" — {tag}.")
    return lines if sigs else []
