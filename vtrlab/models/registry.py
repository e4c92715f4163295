"""Which adapter serves which HF ``config.model_type``.

Adapters register themselves with ``@register``; every module under ``vtrlab/models/families/``
is imported on the first lookup, so adding a family means adding one file there.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import FamilyAdapter

_BY_MODEL_TYPE: dict[str, FamilyAdapter] = {}
_BY_FAMILY: dict[str, FamilyAdapter] = {}
_discovered = False


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: make ``cls`` the adapter for its ``family`` and ``model_types``."""
    if not cls.family or not cls.model_types:
        raise ValueError(f"{cls.__name__} must set `family` and `model_types` before registering")
    adapter = cls()
    for model_type in cls.model_types:
        other = _BY_MODEL_TYPE.get(model_type)
        if other is not None and type(other).__qualname__ != cls.__qualname__:
            raise ValueError(
                f"model_type {model_type!r} is already served by {type(other).__name__}; "
                f"{cls.__name__} cannot claim it too"
            )
        _BY_MODEL_TYPE[model_type] = adapter
    _BY_FAMILY[cls.family] = adapter
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    from . import families

    for info in pkgutil.iter_modules(families.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{families.__name__}.{info.name}")
    _discovered = True


def families() -> dict[str, FamilyAdapter]:
    """Registered adapters by family name."""
    _discover()
    return dict(sorted(_BY_FAMILY.items()))


def supported_model_types() -> list[str]:
    _discover()
    return sorted(_BY_MODEL_TYPE)


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter for an HF ``config.model_type``; a clear error listing the supported ones otherwise."""
    _discover()
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        listing = ", ".join(
            f"{fam} ({'/'.join(a.model_types)})" for fam, a in sorted(_BY_FAMILY.items())
        )
        raise ValueError(
            f"unsupported architecture: model_type {model_type!r}; supported families: {listing}"
        ) from None


def adapter_for_family(family: str) -> FamilyAdapter:
    _discover()
    try:
        return _BY_FAMILY[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; registered: {', '.join(sorted(_BY_FAMILY))}") from None
