"""Every deployment flow the project knows, whether it can measure here, and what shapes it runs.

A flow is one of three kinds (``amoeba-profile backends`` lists them all):

- ``measuring``: a registered adapter (``backends.REGISTRY``) whose library is installed here;
- ``unavailable``: a registered adapter whose library is missing (its ``availability()`` gives
  the reason and the install hint);
- ``roofline-only``: a flow with a roofline profile in ``data/flows.json`` and no adapter; its
  tables are computed (``build-lut --predict``), never measured.

What shapes a flow can run (``Capabilities``) is defined once per flow: by the adapter's
``capabilities()`` for a registered flow, and by the ``capabilities`` section of
``data/flows.json`` for a roofline-only flow (never both). The per-layer optimizer constrains its
answer with it and the listing shows it, so the two cannot disagree.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from .backends import REGISTRY, Capabilities, Maturity, backend_class, list_backends
from .errors import UsageError

MEASURING, UNAVAILABLE, ROOFLINE_ONLY = "measuring", "unavailable", "roofline-only"


@dataclass(frozen=True)
class FlowInfo:
    """One row of the flow listing. ``install_hint`` says what to install for the flow's library;
    ``roofline_profile`` says whether ``build-lut --predict`` can compute a table for it;
    ``maturity`` is the adapter's own declaration of a recorded hardware run (a roofline-only flow
    has no adapter, and is labelled so)."""

    name: str
    status: str
    reason: str
    install_hint: str
    capabilities: Capabilities
    roofline_profile: bool
    maturity: Maturity


@lru_cache(maxsize=1)
def _flows_data() -> dict[str, Any]:
    return json.loads(resources.files("amoeba_profile").joinpath("data/flows.json").read_text())


def _declared() -> dict[str, dict[str, Any]]:
    """The roofline-only flows' declared capabilities, by name."""
    return {name: entry for name, entry in _flows_data()["capabilities"].items() if not name.startswith("_")}


def _declared_capabilities(entry: dict[str, Any]) -> Capabilities:
    # A roofline-only flow has no measurement method: its rows are computed.
    return Capabilities(per_layer_heads=bool(entry["per_layer_heads"]), per_layer_ffn=bool(entry["per_layer_ffn"]),
                        methods=(), dtypes=tuple(entry["dtypes"]), devices=tuple(entry["devices"]))


def known_flows() -> list[str]:
    """Registered adapters first (in registry order), then the roofline-only flows."""
    return list(REGISTRY) + [name for name in _declared() if name not in REGISTRY]


def flow_capabilities(name: str) -> Capabilities:
    """What ``name`` can run: its adapter's declaration, or data/flows.json's for a roofline-only flow."""
    if name in REGISTRY:
        return backend_class(name).capabilities()
    declared = _declared()
    if name not in declared:
        raise UsageError(f"unknown flow {name!r}: the project knows {known_flows()}")
    return _declared_capabilities(declared[name])


def list_flows() -> list[FlowInfo]:
    """Every known flow with its kind, why it can or cannot measure here, and an install hint."""
    profiles = set(_flows_data()["flows"])
    rows = [FlowInfo(name, MEASURING if avail.ok else UNAVAILABLE, avail.reason, avail.install_hint, caps,
                     name in profiles, backend_class(name).maturity())
            for name, avail, caps in list_backends()]
    for name, entry in _declared().items():
        if name in REGISTRY:
            continue
        installed = importlib.util.find_spec(entry["library"]) is not None
        reason = (f"no measuring adapter yet ({entry['library']} {'is' if installed else 'is not'} installed here); "
                  f"compute its tables with build-lut --predict --backend {name}")
        rows.append(FlowInfo(name, ROOFLINE_ONLY, reason, entry["install_hint"], _declared_capabilities(entry),
                             name in profiles, Maturity(False, "no adapter: computed tables only", "")))
    return rows
