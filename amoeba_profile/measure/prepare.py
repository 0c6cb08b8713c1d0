"""Check every option of a measured build before anything is measured or written.

A build writes its journal before the first measurement, and the journal remembers the options it
started with. A mistake found only while measuring (a device torch cannot use, a flow whose
library is missing) would leave a journal that refuses the corrected command. So the backend, the
device, the method, the plan and the dtype are all resolved here, and ``run_build`` starts only
from the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amoeba_profile.backends import REGISTRY, Backend, backend_class, get_backend
from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.inputs import positive_int
from amoeba_profile.device import resolve_device
from amoeba_profile.device.load import CpuLoad
from amoeba_profile.measure.methods import choose_method, device_kind
from amoeba_profile.measure.plan import BuildPlan


@dataclass(frozen=True)
class PreparedBuild:
    """A validated measured build: hand ``plan`` and ``backend`` to ``run_build``."""

    plan: BuildPlan
    backend: Backend
    device_reason: str  # why this device: "requested" or what ``auto`` saw
    method_reason: str  # why this method: "requested with --method" or the evidence for the default
    threads_reason: str = ""  # the thread count and why ("" for a backend without one)
    # The thread count is a load-dependent default: run_build(adopt_threads=...) keeps the table's own.
    adopt_threads: bool = False
    warnings: tuple[str, ...] = ()  # one line each: an option changed to what the build really uses


def prepare_build(
    arch: ModelArch,
    *,
    backend: str = "pytorch",
    device: str = "auto",
    method: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    backend_options: dict[str, Any] | None = None,
    out_dir: Path | None = None,
    **plan_options: Any,
) -> PreparedBuild:
    """Resolve and check a measured build; ``backend_options`` are further fields of the backend's
    config (e.g. pytorch-compiled's ``mode``); ``plan_options`` are ``BuildPlan`` fields (grid, depths,
    whole subnets, decode steps). With ``out_dir``, a build that resumes or extends a table there
    keeps the thread count it was measured with (``build.backend_for_build``). Raises UsageError (or BackendUnavailable) naming the option."""
    if backend not in REGISTRY:
        backend_class(backend)  # raises: unknown backend, with the list
    warnings: list[str] = []
    capped = ""
    if threads is not None:
        threads = positive_int(threads, "--threads")
        cores = CpuLoad().cores()
        if threads > cores:
            # Threads beyond the cores share them, and every OpenMP barrier waits for the one descheduled.
            warnings.append(
                f"--threads {threads} is more than the {cores} cores this process may run on; measuring "
                f"with {cores} threads (recorded as such)"
            )
            capped = f"threads: {cores} (capped from --threads {threads})"
            threads = cores
    resolved, device_reason = resolve_device(device)
    capabilities = backend_class(backend).capabilities()
    if device_kind(resolved) not in capabilities.devices:
        raise UsageError(f"backend {backend!r} runs on {list(capabilities.devices)}, not {resolved!r}")
    chosen, method_reason = choose_method(backend, capabilities.methods, resolved, method)
    if plan_options.get("depths") and chosen != "difference":
        how = f"--method {chosen}" if method else f"the default for {backend} on {device_kind(resolved)}"
        raise UsageError(
            f"--depths sets the model depths the difference method fits; this build uses the {chosen} "
            f"method ({how}): drop --depths, or add --method difference"
        )
    plan = BuildPlan(arch, method=chosen, **plan_options)
    plan.check_usable()
    if out_dir is None:
        instance, threads_reason = (
            get_backend(backend, device=resolved, dtype=dtype, threads=threads, **(backend_options or {})),
            "",
        )
    else:
        from amoeba_profile.measure.build import backend_for_build

        instance, threads_reason = backend_for_build(
            backend, out_dir, plan, resolved, dtype, threads, backend_options or {}
        )
    if capped and threads_reason:
        threads_reason = capped
    return PreparedBuild(
        plan,
        instance,
        device_reason,
        method_reason,
        threads_reason,
        adopt_threads=threads is None and "threads" in instance.config_dict(),
        warnings=tuple(warnings),
    )
