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
(``get_backend``), so ``import amoeba_profile`` stays light.
"""

__version__ = "0.1.0"  # before the imports: build.py records it

from amoeba_profile.core.arch import ModelArch, resolve_arch  # noqa: E402
from amoeba_profile.backends import get_backend, list_backends  # noqa: E402
from amoeba_profile.measure.build import BuildResult, run_build  # noqa: E402
from amoeba_profile.core.errors import (AmoebaError, ArchError, BackendUnavailable, InfeasibleBudget, LutError, OutOfRange,  # noqa: E402
                     UnsupportedShape, UsageError)
from amoeba_profile.table.lut import Lut, load_one, load_table, reseal  # noqa: E402
from amoeba_profile.core.timing import TimingProtocol  # noqa: E402
from amoeba_profile.select.optimize import optimize_per_layer  # noqa: E402
from amoeba_profile.measure.plan import BuildPlan  # noqa: E402
from amoeba_profile.select.predict import Prediction, Predictor  # noqa: E402
from amoeba_profile.measure.prepare import PreparedBuild, prepare_build  # noqa: E402
# The function shadows the submodule of the same name as an attribute of the package; import its
# other names with ``from amoeba_profile.select.picker import ...``.
from amoeba_profile.select.picker import Candidate, Selection, select  # noqa: E402
from amoeba_profile.core.subnet import DesignSpace, LayerShape, Subnet  # noqa: E402
from amoeba_profile.core.workload import Workload, metric_name  # noqa: E402

__all__ = [
    "__version__", "resolve_arch", "ModelArch", "Subnet", "LayerShape", "DesignSpace", "Workload", "metric_name",
    "prepare_build", "PreparedBuild", "BuildPlan", "run_build", "BuildResult", "TimingProtocol", "get_backend",
    "list_backends", "load_table", "load_one", "Lut", "reseal", "Predictor", "Prediction", "select", "Selection",
    "Candidate", "optimize_per_layer", "AmoebaError", "UsageError", "ArchError", "UnsupportedShape",
    "BackendUnavailable", "LutError", "OutOfRange", "InfeasibleBudget",
]
