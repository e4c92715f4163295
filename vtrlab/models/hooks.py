"""One recorder of module inputs and outputs for a forward pass of the unchanged model.

Every probe that only *reads* a module (decoder inputs, vision features, hidden-state norms, the
projector's input) records through :func:`record`; hooks are removed when the block ends, also on
errors. With ``stop=True`` the forward is cut short once every module has fired (nothing after it
is needed) and the block swallows that one abort, so the caller writes::

    with record(outputs={"v3": vlm.vision_layers[3]}, stop=True) as seen:
        vlm.model(**batch.inputs, use_cache=False)
    feats = seen["v3"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn


class ModuleCall(NamedTuple):
    """What a module was called with: positional and keyword arguments."""

    args: tuple
    kwargs: dict


class StopForward(Exception):
    """Raised by a recorder with ``stop=True`` once everything it records has been seen."""

    def __init__(self, owner: object):
        super().__init__("forward stopped by a vtrlab recorder: everything it needed was recorded")
        self.owner = owner


def output_tensor(out: Any) -> torch.Tensor:
    """The hidden-state tensor inside a module output (a tensor, a tuple, or a ModelOutput)."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    for key in ("last_hidden_state", "hidden_states"):
        if hasattr(out, key):
            return getattr(out, key)
    raise TypeError(f"cannot read a hidden-state tensor from a module output of type {type(out).__name__}")


@contextmanager
def record(
    outputs: Mapping[str, nn.Module] | None = None,
    inputs: Mapping[str, nn.Module] | None = None,
    *,
    transform: Callable[[torch.Tensor], Any] | None = None,
    stop: bool = False,
) -> Iterator[dict[str, Any]]:
    """Record, under the given names, each module's output tensor (``outputs``, detached, passed
    through ``transform`` if given) and each module's call (``inputs``: a :class:`ModuleCall` of the
    arguments it received, before it runs). Yields the dict being filled.

    ``stop=True``: once every named module has fired, the forward is aborted and the ``with`` block
    ends there (the abort is swallowed by this block only; other errors propagate). A name seen
    twice (a module run twice in one forward) keeps the last value.
    """
    outputs, inputs = dict(outputs or {}), dict(inputs or {})
    clash = sorted(set(outputs) & set(inputs))
    if clash:
        raise ValueError(f"names {clash} are used for both an output and an input; give each its own name")
    if not outputs and not inputs:
        raise ValueError("record() needs at least one module in outputs= or inputs=")
    seen: dict[str, Any] = {}
    want = len(outputs) + len(inputs)
    token = object()
    handles = []

    def done():
        if stop and len(seen) == want:
            raise StopForward(token)

    def out_hook(name):
        def hook(_module, _args, out):
            t = output_tensor(out).detach()
            seen[name] = transform(t) if transform is not None else t
            done()

        return hook

    def in_hook(name):
        def hook(_module, args, kwargs):
            seen[name] = ModuleCall(tuple(args), dict(kwargs))
            done()

        return hook

    try:
        for name, mod in outputs.items():
            handles.append(mod.register_forward_hook(out_hook(name)))
        for name, mod in inputs.items():
            handles.append(mod.register_forward_pre_hook(in_hook(name), with_kwargs=True))
        try:
            yield seen
        except StopForward as e:
            if e.owner is not token:
                raise
    finally:
        for h in handles:
            h.remove()


def require_seen(seen: Mapping[str, Any], names, model: nn.Module) -> None:
    """Raise if a recorded module never ran during ``model``'s forward."""
    absent = [n for n in names if n not in seen]
    if absent:
        raise RuntimeError(f"{type(model).__name__}.forward never called the module(s) recorded as {absent}")
