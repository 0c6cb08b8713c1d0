"""Deployment-flow adapters and their registry.

Every backend module imports its heavy library lazily, so listing backends never fails: a
missing library is an ``Availability`` with a reason and an install hint.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..errors import BackendUnavailable, UsageError
from .base import Availability, Backend, BuiltUnit, Capabilities, Engine, EngineSpec, Maturity, ToolResult

# name -> "module:class", resolved on demand.
REGISTRY: dict[str, str] = {
    "pytorch": "amoeba_profile.backends.pytorch:PyTorchBackend",
    "llama.cpp": "amoeba_profile.backends.llama_cpp:LlamaCppBackend",
    "pytorch-compiled": "amoeba_profile.backends.pytorch_compiled:PyTorchCompiledBackend",
    "onnxruntime": "amoeba_profile.backends.ort:OrtBackend",
    "tensorrt-llm": "amoeba_profile.backends.tensorrt_llm:TensorRtLlmBackend",
    "mlc-llm": "amoeba_profile.backends.mlc_llm:MlcLlmBackend",
}


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
        raise UsageError(f"backend {name!r} has no option {sorted(set(options) - set(known))}; its options are "
                         f"{known}") from None
    return cls(**options)


def list_backends() -> list[tuple[str, Availability, Capabilities]]:
    return [(name, backend_class(name).availability(), backend_class(name).capabilities()) for name in REGISTRY]


__all__ = ["Availability", "Backend", "BuiltUnit", "Capabilities", "Engine", "EngineSpec", "Maturity", "REGISTRY", "ToolResult", "backend_class", "get_backend", "list_backends"]
