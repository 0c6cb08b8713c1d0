"""Which measurement method a build uses: the one validated for this backend and kind of device.

The choice is data with the evidence beside it, not a rule in code: each flow declares its own
(``Backend.default_methods``, its folder's ``methods.json``), and ``data/methods.json`` holds the
fallback for a flow or device that declares none; a backend that cannot time lone components can
only use ``difference``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from amoeba_profile.backends import REGISTRY, backend_class
from amoeba_profile.core.errors import UsageError
from amoeba_profile.measure.plan import METHODS


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(resources.files("amoeba_profile").joinpath("data/methods.json").read_text())


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def choose_method(
    backend_name: str, supported: tuple[str, ...], device: str, requested: str | None = None
) -> tuple[str, str]:
    """(method, why): ``requested`` when given and supported, else the validated default."""
    if requested is not None:
        if requested not in METHODS:
            raise UsageError(f"unknown method {requested!r}: use one of {list(METHODS)}")
        if requested not in supported:
            raise UsageError(f"backend {backend_name!r} supports {list(supported)}, not {requested!r}")
        return requested, "requested with --method"
    fallback = _table()["fallback"]
    declared = backend_class(backend_name).default_methods() if backend_name in REGISTRY else {}
    choice = declared.get(device_kind(device), fallback)
    if choice["method"] not in supported:
        choice = fallback
    return choice["method"], choice["evidence"]
