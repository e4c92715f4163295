"""Switch a model to vtrlab's attention function for the duration of a ``with`` block.

Every config reachable from the model (``module.config`` of every submodule and their
``sub_configs``) gets ``_attn_implementation = "vtrlab_sdpa"``; each one's previous value is put
back in ``finally``, also when the body raises. Only models whose attention runs through
``AttentionInterface`` can be switched; a module that still holds another implementation is an error
(it would silently bypass the probes).

``attention_switched(model, modules=...)`` switches only what a probe on those attention modules needs: the
model's own config with its sub-configs (the masks are built from them) and the config each module reads its
implementation from (``module.config``, as every transformers attention module does). Modules without a
site run stock sdpa either way (vtrlab's function outside a site *is* sdpa), so outputs are the same; the walk
over every module of the model (~720 at LLaVA-7B, ~1 ms of Python per probe call) is skipped. A module
without a config of its own falls back to the full walk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

from .attention import ATTN_NAME, register

# implementations vtrlab's function stands in for with identical outputs (it calls the stock sdpa);
# None: configs of modules that run no attention of their own
_SWITCHABLE = {"sdpa", None, ATTN_NAME}


def _own_config(module: nn.Module):
    # plain attribute lookup first: nn.Module.__getattr__ (taken for a missing attribute) is slow
    cfg = module.__dict__.get("config")
    if cfg is None and hasattr(type(module), "config"):  # a class-level property or attribute
        cfg = getattr(module, "config", None)
    return cfg


def _configs(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> list:
    """Every config reachable from ``model``: ``config`` of each submodule (pre-order, as ``model.modules()``
    lists them) and, depth first, each config's ``sub_configs``; each config once, in first-seen order.
    With ``modules``: only the model's own config (with its sub-configs) and those modules' configs."""
    seen: dict[int, object] = {}

    def visit(cfg):
        if cfg is None or id(cfg) in seen or not _has_attn_implementation(cfg):
            return
        seen[id(cfg)] = cfg
        attrs = _attrs(cfg)
        for key in getattr(type(cfg), "sub_configs", None) or getattr(cfg, "sub_configs", {}) or {}:
            # the sub-config instance from the instance dict (transformers' __getattribute__ is slow), else getattr
            visit(attrs[key] if key in attrs else getattr(cfg, key, None))

    if modules is not None:
        # the modules share a few configs (one per tower): each distinct one is checked once (a config's
        # attribute lookup runs transformers' own __getattribute__, slow on a per-call path)
        distinct: dict[int, object] = {}
        last = distinct  # (a sentinel no config is)
        for m in modules:
            cfg = m.__dict__.get("config")
            if cfg is not None and cfg is last:  # consecutive layers share their tower's config
                continue
            if cfg is None:
                cfg = _own_config(m)
            distinct[id(cfg)] = last = cfg
        own = list(distinct.values())
        if all(cfg is not None and _has_attn_implementation(cfg) for cfg in own):
            for cfg in [_own_config(model), *own]:
                visit(cfg)
            return list(seen.values())
    # This walk runs on every probe call over every module of the model (724 at LLaVA-1.5-7B), so it reads
    # the modules' ``__dict__`` directly: ``model.modules()`` builds every module's dotted name through nested
    # generators and keeps a set of the modules seen, and ``nn.Module.__getattr__`` (taken for a missing
    # attribute) is slow — together 4x the time of this loop. Same order as ``model.modules()`` (pre-order);
    # a module reachable twice is visited twice (its configs are already seen; the tree has no cycles, as
    # ``nn.Module.state_dict`` and ``_apply`` also assume).
    class_config: dict[type, bool] = {}  # whether a module class has a class-level ``config`` (property)
    stack = [model]
    while stack:
        module = stack.pop()
        if module is None:  # a child registered as None
            continue
        attrs = module.__dict__
        cfg = attrs.get("config")
        if cfg is None:
            cls = type(module)
            has = class_config.get(cls)
            if has is None:
                has = class_config[cls] = hasattr(cls, "config")
            if has:
                cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) not in seen:
            visit(cfg)
        children = attrs["_modules"]
        if children:
            stack.extend(reversed(children.values()))
    return list(seen.values())


def _has_attn_implementation(cfg) -> bool:
    # a property of transformers' configs (class level), or an instance attribute; else the slow hasattr
    return hasattr(type(cfg), "_attn_implementation") or hasattr(cfg, "_attn_implementation")


def _attrs(cfg) -> dict:
    # the instance dict without transformers' PretrainedConfig.__getattribute__ (Python, on every attribute)
    return object.__getattribute__(cfg, "__dict__")


def _get(cfg):
    attrs = _attrs(cfg)
    if "_attn_implementation_internal" in attrs:
        return attrs["_attn_implementation_internal"]
    return getattr(cfg, "_attn_implementation", None)


def _set(cfg, value) -> None:
    # set this config only (the property setter would also recurse into sub-configs, which we
    # restore one by one ourselves)
    attrs = _attrs(cfg)
    if "_attn_implementation_internal" in attrs:
        attrs["_attn_implementation_internal"] = value
    else:
        cfg._attn_implementation = value


@contextlib.contextmanager
def configs_set(configs: list, impl: str) -> Iterator[None]:
    """Run the body with each of ``configs`` on the attention implementation ``impl``; each one's previous value is
    put back in ``finally`` (in reverse order), also when the body raises."""
    saved = [(cfg, _get(cfg)) for cfg in configs]
    try:
        for cfg, _ in saved:
            _set(cfg, impl)
        yield
    finally:
        for cfg, previous in reversed(saved):
            _set(cfg, previous)


@contextlib.contextmanager
def attention_switched(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Run the body with every config of ``model`` on :data:`ATTN_NAME` (or, with ``modules``, the configs those
    attention modules and the model itself read: see the module docstring); restore in ``finally``."""
    register()
    configs = _configs(model, modules)
    for cfg in configs:
        impl = _get(cfg)
        if impl not in _SWITCHABLE:
            raise ValueError(
                f"{type(cfg).__name__} runs attention with {impl!r}; vtrlab capture needs 'sdpa' (its output "
                f"is the stock sdpa output): call model.set_attn_implementation('sdpa') first"
            )
    with configs_set(configs, ATTN_NAME):
        yield
