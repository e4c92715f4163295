"""Switch a model to vtrlab's attention function for the duration of a ``with`` block.

Every config reachable from the model (``module.config`` of every submodule and their
``sub_configs``) gets ``_attn_implementation = "vtrlab_sdpa"``; each one's previous value is put
back in ``finally``, also when the body raises. Only models whose attention runs through
``AttentionInterface`` can be switched; a module that still holds another implementation is an error
(it would silently bypass the probes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .attention import ATTN_NAME, register

# implementations vtrlab's function stands in for with identical outputs (it calls the stock sdpa);
# None: configs of modules that run no attention of their own
_SWITCHABLE = {"sdpa", None, ATTN_NAME}


def _configs(model: nn.Module) -> list:
    seen: dict[int, object] = {}

    def visit(cfg):
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            return
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            visit(getattr(cfg, key, None))

    for module in model.modules():
        # plain attribute lookup first: nn.Module.__getattr__ (taken for a missing attribute) is slow,
        # and this walk runs on every probe call over every module of the model
        cfg = module.__dict__.get("config")
        if cfg is None and hasattr(type(module), "config"):  # a class-level property or attribute
            cfg = getattr(module, "config", None)
        visit(cfg)
    return list(seen.values())


def _get(cfg):
    return cfg.__dict__.get("_attn_implementation_internal", getattr(cfg, "_attn_implementation", None))


def _set(cfg, value) -> None:
    # set this config only (the property setter would also recurse into sub-configs, which we
    # restore one by one ourselves)
    if "_attn_implementation_internal" in cfg.__dict__:
        cfg.__dict__["_attn_implementation_internal"] = value
    else:
        cfg._attn_implementation = value


@contextlib.contextmanager
def attention_switched(model: nn.Module) -> Iterator[None]:
    """Run the body with every config of ``model`` on :data:`ATTN_NAME`; restore in ``finally``."""
    register()
    configs = _configs(model)
    saved = [(cfg, _get(cfg)) for cfg in configs]
    for cfg, impl in saved:
        if impl not in _SWITCHABLE:
            raise ValueError(
                f"{type(cfg).__name__} runs attention with {impl!r}; vtrlab capture needs 'sdpa' (its output "
                f"is the stock sdpa output): call model.set_attn_implementation('sdpa') first"
            )
    try:
        for cfg, _ in saved:
            _set(cfg, ATTN_NAME)
        yield
    finally:
        for cfg, impl in reversed(saved):
            _set(cfg, impl)
