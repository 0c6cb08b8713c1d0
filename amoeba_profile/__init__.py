"""amoeba-profile: measure, tabulate and select shapes of shrinkable LLaMA models per device.

The public API (README, "Python API"); everything else is reached through its module:

- model and shapes: ``resolve_arch``, ``ModelArch``, ``Subnet``, ``LayerShape``, ``DesignSpace``, ``Workload``
- building a table: ``prepare_build`` (checks every option first) -> ``PreparedBuild``, ``BuildPlan``,
  ``run_build`` -> ``BuildResult``, ``TimingProtocol``, ``get_backend``, ``list_backends``
- tables: ``load_table``, ``load_one``, ``Lut``, ``reseal``
- prediction and selection: ``Predictor``, ``Prediction``, ``select`` -> ``Selection`` of ``Candidate``,
  ``optimize_per_layer``, ``metric_name`` (ttft, tpot, e2e, with or without ``_ms``)
- errors: ``AmoebaError`` and its subclasses

None of these modules imports torch: a backend imports its library when it is constructed
(``get_backend``). Each name is imported on first use (PEP 562), so a command imports only what it
uses: ``import amoeba_profile`` costs nothing, and ``select`` never loads the build machinery.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "resolve_arch": "core.arch",
    "ModelArch": "core.arch",
    "get_backend": "backends",
    "list_backends": "backends",
    "BuildResult": "measure.build",
    "run_build": "measure.build",
    "AmoebaError": "core.errors",
    "ArchError": "core.errors",
    "BackendUnavailable": "core.errors",
    "InfeasibleBudget": "core.errors",
    "LutError": "core.errors",
    "OutOfRange": "core.errors",
    "UnsupportedShape": "core.errors",
    "UsageError": "core.errors",
    "Lut": "table.lut",
    "load_one": "table.lut",
    "load_table": "table.lut",
    "reseal": "table.lut",
    "TimingProtocol": "core.timing",
    "optimize_per_layer": "selection.optimize",
    "BuildPlan": "measure.plan",
    "Prediction": "selection.predict",
    "Predictor": "selection.predict",
    "PreparedBuild": "measure.prepare",
    "prepare_build": "measure.prepare",
    "Candidate": "selection.picker",
    "Selection": "selection.picker",
    "select": "selection.picker",
    "DesignSpace": "core.subnet",
    "LayerShape": "core.subnet",
    "Subnet": "core.subnet",
    "Workload": "core.workload",
    "metric_name": "core.workload",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'amoeba_profile' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"amoeba_profile.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from amoeba_profile.backends import get_backend, list_backends
    from amoeba_profile.core.arch import ModelArch, resolve_arch
    from amoeba_profile.core.errors import (
        AmoebaError,
        ArchError,
        BackendUnavailable,
        InfeasibleBudget,
        LutError,
        OutOfRange,
        UnsupportedShape,
        UsageError,
    )
    from amoeba_profile.core.subnet import DesignSpace, LayerShape, Subnet
    from amoeba_profile.core.timing import TimingProtocol
    from amoeba_profile.core.workload import Workload, metric_name
    from amoeba_profile.measure.build import BuildResult, run_build
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.measure.prepare import PreparedBuild, prepare_build
    from amoeba_profile.selection.optimize import optimize_per_layer
    from amoeba_profile.selection.picker import Candidate, Selection, select
    from amoeba_profile.selection.predict import Prediction, Predictor
    from amoeba_profile.table.lut import Lut, load_one, load_table, reseal

__all__ = ["__version__", *_EXPORTS]
