"""Every deployment flow the project knows, whether it can measure here, and what shapes it runs.

A flow is a registered adapter (``backends.REGISTRY``): ``measuring`` where its library is
installed here, else ``unavailable`` (its ``availability()`` gives the reason and the install
hint); ``amoeba-profile backends`` lists them all. What shapes a flow can run (``Capabilities``)
is defined once, by the adapter's ``capabilities()``: the per-layer optimizer constrains its
answer with it and the listing shows it, so the two cannot disagree. A flow whose adapter declares
a roofline profile (``roofline.json`` in its folder) can also have its tables computed
(``build-lut --predict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amoeba_profile.backends import REGISTRY, Capabilities, Maturity, backend_class, list_backends

from amoeba_profile.core.errors import UsageError

MEASURING, UNAVAILABLE = "measuring", "unavailable"


@dataclass(frozen=True)
class FlowInfo:
    """One row of the flow listing. ``install_hint`` says what to install for the flow's library;
    ``roofline_profile`` says whether ``build-lut --predict`` can compute a table for it;
    ``maturity`` is the adapter's own declaration of a recorded hardware run."""

    name: str
    status: str
    reason: str
    install_hint: str
    capabilities: Capabilities
    roofline_profile: bool
    maturity: Maturity


def roofline_profiles() -> dict[str, dict[str, Any]]:
    """Every registered flow's roofline profile, by flow name (flows that declare none are absent)."""
    profiles = {name: backend_class(name).roofline_profile() for name in REGISTRY}
    return {name: profile for name, profile in profiles.items() if profile is not None}


def flow_capabilities(name: str) -> Capabilities:
    """What ``name`` can run: its adapter's declaration."""
    if name not in REGISTRY:
        raise UsageError(f"unknown flow {name!r}: the project knows {list(REGISTRY)}")
    return backend_class(name).capabilities()


def list_flows() -> list[FlowInfo]:
    """Every known flow with its kind, why it can or cannot measure here, and an install hint."""
    profiles = roofline_profiles()
    return [
        FlowInfo(
            name,
            MEASURING if avail.ok else UNAVAILABLE,
            avail.reason,
            avail.install_hint,
            caps,
            name in profiles,
            backend_class(name).maturity(),
        )
        for name, avail, caps in list_backends()
    ]
