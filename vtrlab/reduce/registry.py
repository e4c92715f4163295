"""The reduction-method registry: one name per method, one file per method, the code's defaults.

Usage::

    import vtrlab as vl
    vl.reduce.names()                               # every registered method
    m = vl.reduce.get("fastv", layer=2)            # parameters override the code's defaults
    vl.reduce.apply(vlm, batch, m, keep=0.25)      # what survives where (xarray.Dataset)

A method is a subclass of :class:`Method` decorated with :func:`register`, in its own file
``vtrlab/reduce/methods/<name>.py``. Its class attributes say where it acts (``stage``), what
position ids the kept tokens get (``positions``), whether it merges (``merges``), its parameters
with the official code's defaults (``defaults``) and its ``source`` (official repository and file;
where code and paper differ). Parameters are validated on construction: an unknown name or a
value of the wrong type is an error naming it and the accepted parameters. Every method also
accepts ``positions="kept" | "renumbered"`` to override its code's position policy (e.g. to
isolate the effect of renumbering); see :func:`prepare`.

Stages and what a method implements:

* ``"projector"`` and ``"tower"`` (tokens leave before the LM):
  ``select(ctx, n_keep) -> Selection`` — ``ctx`` is a :class:`vtrlab.reduce.context.ReductionContext`.
* ``"lm"`` (tokens leave inside the LM from layer K on): ``lm_layers(vlm)`` — the layers where it
  prunes — and ``lm_select(signal, n_keep)`` called at each of them; see :mod:`vtrlab.reduce.stages.lm`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

STAGES = ("tower", "projector", "lm")
POSITIONS = ("kept", "renumbered")

_REGISTRY: dict[str, type[Method]] = {}
_DISCOVERED = False


class NotApplicable(ValueError):
    """A method has no meaningful signal on a family (e.g. no vision [CLS] token)."""

    def __init__(self, method: str, family: str, why: str):
        self.method, self.family, self.why = method, family, why
        super().__init__(f"method {method!r} is not applicable to family {family!r}: {why}")


@dataclass
class Selection:
    """What a pre-LM method decided, per sample (lists of length batch size).

    ``keep[i]``: bool over sample i's image tokens (layout order, ``layout.image_positions``).
    ``scores[i]``: float per image token, what the method ranked by (NaN where it ranks none).
    ``embeds[i]``: None, or a (n_kept_i, D) tensor of the embeddings the LM receives for the kept
    tokens, in layout order (merged tokens: VisionZip's contextual tokens, PruMerge's sums).
    ``group[i]``: int per image token, the layout index of the kept token it was merged into, -1
    where it was not merged (a kept token that absorbed others points to itself).
    """

    keep: list[np.ndarray]
    scores: list[np.ndarray]
    embeds: list[torch.Tensor | None] | None = None
    group: list[np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.keep)
        if len(self.scores) != n:
            raise ValueError(f"Selection has {n} keep masks but {len(self.scores)} score arrays")
        if self.embeds is None:
            self.embeds = [None] * n
        if self.group is None:
            self.group = [np.full(len(k), -1, dtype=np.int64) for k in self.keep]
        for i, (k, s, e, g) in enumerate(zip(self.keep, self.scores, self.embeds, self.group)):
            k = np.asarray(k)
            if k.dtype != bool:
                raise ValueError(f"Selection.keep[{i}] has dtype {k.dtype}; need bool")
            if np.shape(s) != k.shape or np.shape(g) != k.shape:
                raise ValueError(
                    f"Selection sample {i}: keep {k.shape}, scores {np.shape(s)}, group {np.shape(g)} differ"
                )
            if e is not None and e.shape[0] != int(k.sum()):
                raise ValueError(f"Selection.embeds[{i}] has {e.shape[0]} rows for {int(k.sum())} kept tokens")
            g = np.asarray(g)
            if ((g >= 0) & ~k[np.clip(g, 0, None)]).any():
                raise ValueError(f"Selection.group[{i}] points at a dropped token; merges go into kept tokens")


class Method:
    """Base of every reduction method. Subclasses set the class attributes and implement their stage."""

    name: str = ""
    stage: str = ""
    positions: str = "kept"
    merges: bool = False
    defaults: dict[str, Any] = {}
    source: str = ""

    def __init__(self, **params: Any):
        accepted = sorted(self.defaults)
        positions = params.pop("positions", None)
        if positions is not None and positions not in POSITIONS:
            raise ValueError(
                f"method {self.name!r}: positions={positions!r}; accepted: {', '.join(POSITIONS)} "
                "(or leave it out: the method's own policy)"
            )
        for k, v in params.items():
            if k not in self.defaults:
                raise ValueError(
                    f"method {self.name!r} has no parameter {k!r}; accepted: {', '.join(accepted) or '(none)'}"
                    f" (and positions={'|'.join(POSITIONS)})"
                )
            self._check_type(k, v)
        self.params: dict[str, Any] = {**self.defaults, **params}
        if positions is not None:
            self.params["positions"] = positions

    def _check_type(self, key: str, value: Any) -> None:
        default = self.defaults[key]
        if default is None or value is None:
            return
        if isinstance(default, bool):
            ok = isinstance(value, (bool, np.bool_))
        elif isinstance(default, int):
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (tuple, list))
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise TypeError(
                f"method {self.name!r}: parameter {key}={value!r} has type {type(value).__name__}; "
                f"expected {type(default).__name__} (default {default!r})"
            )

    def check(self, vlm: Any) -> None:
        """Raise :class:`NotApplicable` when the method has no signal on ``vlm``'s family."""

    # projector / tower stage
    def select(self, ctx: Any, n_keep: Sequence[int]) -> Selection:
        raise NotImplementedError(f"method {self.name!r} (stage {self.stage!r}) does not implement select()")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


def prepare(method: Method, vlm: Any) -> None:
    """Ready ``method`` for ``vlm``: its ``check`` (may raise :class:`NotApplicable`; may set a
    family-specific position policy), then the position policy: ``positions=`` when given wins;
    otherwise a pre-LM method whose code renumbers keeps the original ids on mRoPE families (Qwen2-VL,
    Qwen2.5-VL), where renumbering is undefined — as the methods' Qwen ports (ModelTC/LightCompress)
    slice ``position_ids``. The policy in force is ``method.positions`` (and the record's attrs)."""
    from .stages.lm import uses_mrope

    method.__dict__.pop("positions", None)  # a policy set for another model does not carry over
    method.check(vlm)
    want = method.params.get("positions")
    if want is not None:
        method.positions = want
    elif method.positions == "renumbered" and method.stage != "lm" and uses_mrope(vlm):
        method.positions = "kept"


def register(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register({name!r}) decorates Method subclasses, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a reduction method named {name!r} is already registered ({_REGISTRY[name].__name__})")
        if cls.stage not in STAGES:
            raise ValueError(f"method {name!r} has stage {cls.stage!r}; accepted: {', '.join(STAGES)}")
        if cls.positions not in POSITIONS:
            raise ValueError(f"method {name!r} has positions {cls.positions!r}; accepted: {', '.join(POSITIONS)}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    from . import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{methods.__name__}.{info.name}")
    _DISCOVERED = True


def names() -> list[str]:
    """Names of every registered method, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str | Method, **params: Any) -> Method:
    """The method ``name`` with ``params`` overriding its defaults (a Method instance passes through)."""
    if isinstance(name, Method):
        if params:
            raise ValueError(f"got a Method instance {name!r} and extra params {sorted(params)}; pass one or the other")
        return name
    _discover()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown reduction method {name!r}; accepted: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**params)
