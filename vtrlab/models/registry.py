"""Registries: name -> entry tables filled by decorators in the modules of one package.

One mechanism for every table of the house (family adapters here; tiny / full-size / proof builders
in ``vtrlab.testing``): a :class:`Registry` names the package whose public modules (no leading
underscore) register their entries, and imports them all on the first lookup — adding a family
means adding one file to that package.

Adapters register themselves with ``@register`` (one per family, serving its HF ``model_type``s).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any

from .base import FamilyAdapter


class Registry:
    """``key -> entry``, filled by ``@registry.register(key)`` in the public modules of ``package``."""

    def __init__(self, what: str, package: str):
        self.what, self.package = what, package
        self._entries: dict[str, Any] = {}
        self._discovered = False

    def register(self, key: str) -> Callable[[Any], Any]:
        """Decorator: register the decorated object under ``key`` (a second, different object is an error)."""

        def deco(obj: Any) -> Any:
            other = self._entries.get(key)
            if other is not None and getattr(other, "__qualname__", other) != getattr(obj, "__qualname__", obj):
                raise ValueError(f"{self.what} {key!r} is already registered ({other!r}); cannot register {obj!r}")
            self._entries[key] = obj
            return obj

        return deco

    def discover(self) -> None:
        """Import every public module of ``package`` once (each registers its entries)."""
        if self._discovered:
            return
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")
        self._discovered = True

    def __getitem__(self, key: str) -> Any:
        self.discover()
        try:
            return self._entries[key]
        except KeyError:
            raise ValueError(f"no {self.what} {key!r}; have: {', '.join(sorted(self._entries)) or 'none'}") from None

    def __contains__(self, key: object) -> bool:
        self.discover()
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Any]]:
        self.discover()
        return sorted(self._entries.items())


ADAPTERS = Registry("family adapter", "vtrlab.models.families")  # family -> adapter instance


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: make ``cls`` the adapter for its ``family`` and ``model_types``."""
    if not cls.family or not cls.model_types:
        raise ValueError(f"{cls.__name__} must set `family` and `model_types` before registering")
    for fam, other in ADAPTERS._entries.items():
        if fam != cls.family and set(other.model_types) & set(cls.model_types):
            clash = sorted(set(other.model_types) & set(cls.model_types))
            raise ValueError(
                f"model_type {clash[0]!r} is already served by {type(other).__name__}; "
                f"{cls.__name__} cannot claim it too"
            )
    adapter = cls()
    existing = ADAPTERS._entries.get(cls.family)
    if existing is not None and type(existing).__qualname__ != cls.__qualname__:
        raise ValueError(f"family {cls.family!r} is already served by {type(existing).__name__}")
    ADAPTERS._entries[cls.family] = adapter
    return cls


def _by_model_type() -> dict[str, FamilyAdapter]:
    return {mt: a for _, a in ADAPTERS.items() for mt in a.model_types}


def families() -> dict[str, FamilyAdapter]:
    """Registered adapters by family name."""
    return dict(ADAPTERS.items())


def supported_model_types() -> list[str]:
    return sorted(_by_model_type())


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter for an HF ``config.model_type``; a clear error listing the supported ones otherwise."""
    by_type = _by_model_type()
    try:
        return by_type[model_type]
    except KeyError:
        listing = ", ".join(f"{fam} ({'/'.join(a.model_types)})" for fam, a in ADAPTERS.items())
        raise ValueError(
            f"unsupported architecture: model_type {model_type!r}; supported families: {listing}"
        ) from None


def adapter_for_family(family: str) -> FamilyAdapter:
    try:
        return ADAPTERS[family]
    except ValueError:
        raise ValueError(f"unknown family {family!r}; registered: {', '.join(ADAPTERS.names())}") from None
