"""Deployment-flow adapters and their registry.

A flow is a plugin: an adapter class registered under the entry-point group
``amoeba_profile.backends`` (``[project.entry-points."amoeba_profile.backends"]`` in a package's
``pyproject.toml``). The project's own flows are registered the same way as a third party's, so a
flow shipped as a separate pip package needs no edit here. Every adapter imports its heavy library
lazily, so listing flows never fails: a missing library is an ``Availability`` with a reason and
an install hint. The group is read on first use, not at import (scanning installed packages costs
tens of milliseconds that ``select`` does not need).
"""

from __future__ import annotations

import importlib
import inspect
from collections import UserDict
from importlib.metadata import entry_points
from typing import Any

from amoeba_profile.backends.base import (
    Availability,
    Backend,
    BuiltUnit,
    Capabilities,
    Engine,
    EngineSpec,
    Maturity,
    ToolResult,
)

from amoeba_profile.core.errors import BackendUnavailable, UsageError

ENTRY_POINT_GROUP = "amoeba_profile.backends"


class _Registry(UserDict):
    """flow name -> ``"module:Class"``, read from the entry-point group on first access."""

    def __init__(self) -> None:
        self._loaded: dict[str, str] | None = None

    @property
    def data(self) -> dict[str, str]:
        if self._loaded is None:
            self._loaded = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
        return self._loaded

    @data.setter
    def data(self, value: dict[str, str]) -> None:
        self._loaded = value


REGISTRY: _Registry = _Registry()


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise UsageError(f"unknown backend {name!r}: use one of {sorted(REGISTRY)}")
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_backend(name: str, **options: Any) -> Backend:
    """An instance ready to measure, or BackendUnavailable with the install hint."""
    cls = backend_class(name)
    available = cls.availability()
    if not available.ok:
        hint = f" ({available.install_hint})" if available.install_hint else ""
        raise BackendUnavailable(f"backend {name!r} is unavailable: {available.reason}{hint}")
    signature = inspect.signature(cls)
    try:
        signature.bind(**options)
    except TypeError:
        known = [p.name for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        raise UsageError(
            f"backend {name!r} has no option {sorted(set(options) - set(known))}; its options are {known}"
        ) from None
    return cls(**options)


def list_backends() -> list[tuple[str, Availability, Capabilities]]:
    return [(name, backend_class(name).availability(), backend_class(name).capabilities()) for name in REGISTRY]


__all__ = [
    "Availability",
    "Backend",
    "BuiltUnit",
    "Capabilities",
    "Engine",
    "EngineSpec",
    "Maturity",
    "REGISTRY",
    "ToolResult",
    "backend_class",
    "get_backend",
    "list_backends",
]
