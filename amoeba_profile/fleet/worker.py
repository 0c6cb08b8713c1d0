"""What a fleet runs on its nodes: detection, the description of a build, one unit-round's measurement.

These are plain functions, made Ray tasks by the driver (``driver.py``), so each runs in a worker
process on a node of the device and returns plain values. Every measurement goes through the
code a local build runs (``build.UnitMeasurer``) under the node's measurement lock, with the
backend rebuilt from the table's own config; a node that is not the table's device measures
nothing and says what it is, so the driver can refuse it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from amoeba_profile.backends import get_backend
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.device import device_slug, fingerprint, resolve_device
from amoeba_profile.device.load import CpuLoad
from amoeba_profile.device.monitor import monitor_for
from amoeba_profile.device.quiet import BusyPolicy, quiet_machine
from amoeba_profile.fleet.plan import FleetBuild
from amoeba_profile.measure.artifacts import ArtifactCache
from amoeba_profile.measure.build import BackendRecord, UnitMeasurer, check_device, to_stderr
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.measure.prepare import prepare_build


def _node_id() -> str:
    import ray  # only ever called inside a Ray worker

    return ray.get_runtime_context().get_node_id()


def as_on_the_node(started_with: Path = Path("/proc/self/environ")) -> None:
    """Undo Ray's thread pin for this task, so it picks threads as build-lut does on this machine.

    For a task that holds no CPU, Ray sets OMP_NUM_THREADS=1 while it runs when the node's
    environment has none (``ray._private.utils.set_omp_num_threads_if_unset``, against many
    workers oversubscribing a node); torch imported under it defaults to one thread, and the
    pytorch backend takes a set OMP_NUM_THREADS as the user's choice. A measurement is alone on its
    device, so the variable goes unless the worker process started with it (``started_with``:
    the environment ``ray start`` ran in, as the process was started)."""
    try:
        names = {item.split(b"=", 1)[0] for item in started_with.read_bytes().split(b"\0")}
    except OSError:
        return
    if b"OMP_NUM_THREADS" not in names:
        os.environ.pop("OMP_NUM_THREADS", None)


def detect_task() -> str:
    """profile-device's detection on this node: the slug of the device ``auto`` resolves to."""
    as_on_the_node()
    resolved, _ = resolve_device("auto")
    return device_slug(resolved)


@dataclass(frozen=True)
class Described:
    """What a node of the device says about the build it would measure: the plan and method it
    resolves, the backend's record (config with the thread count filled in, versions), the device
    fingerprint and the device state now."""

    plan: BuildPlan
    record: BackendRecord
    device: dict[str, Any]
    method_reason: str
    monitor: str
    state: dict[str, Any]


def describe_task(build: FleetBuild, threads: int | None) -> Described:
    """``prepare_build`` and the device checks of ``preflight``, on the device: what a local build
    checks before writing a byte."""
    as_on_the_node()
    prepared = prepare_build(
        build.arch,
        backend=build.backend,
        device=build.device,
        method=build.method,
        dtype=build.dtype,
        threads=threads,
        backend_options=build.backend_options,
        **build.plan_options,
    )
    backend = prepared.backend
    check_device(prepared.plan, backend)
    monitor = monitor_for(backend.device, load=CpuLoad(), needed=backend.host_cores())
    return Described(
        prepared.plan,
        BackendRecord.of(backend),
        fingerprint(backend.device),
        prepared.method_reason,
        monitor.source,
        monitor.sample(),
    )


@dataclass(frozen=True)
class UnitJob:
    """One unit's pending entries in one round, and everything a worker needs to measure them as
    the table's other rows were measured (``device``: the table's fingerprint)."""

    plan: BuildPlan
    record: BackendRecord
    device: dict[str, Any]
    protocol: TimingProtocol
    entries: tuple[Entry, ...]
    round_index: int
    busy: BusyPolicy | None
    target: str  # the table, for the measurement lock's holder note


@dataclass(frozen=True)
class UnitResult:
    """A worker's answer: one result per entry (journal records), whether the unit could be built,
    and the fingerprint, versions and node they were measured on; ``state`` is the device state
    after measuring (None when the worker refused to measure)."""

    records: list[dict[str, Any]]
    built: bool
    device: dict[str, Any]
    versions: dict[str, Any]
    node: str
    state: dict[str, Any] | None


# The kinds of notice this worker process has printed, per table: see ``once_per_table``.
_SAID: set[tuple[str, str]] = set()


def once_per_table(target: str) -> Callable[[str], None]:
    """A notice that prints each kind of message once per worker process and table.

    A local build checks the machine once and prints its busy-machine warning or lock wait once; a
    fleet measures a table one unit-round per task, and every task checks again, so the same lines
    (differing only in their figures) came once per task. The first of each kind stands for the
    rest; the rows measured under contention are flagged in the table either way."""

    def notice(message: str) -> None:
        kind = (target, re.sub(r"\d+(?:\.\d+)?", "#", message))
        if kind not in _SAID:
            _SAID.add(kind)
            to_stderr(message)

    return notice


def measure_task(job: UnitJob) -> UnitResult:
    """Measure one unit-round with the backend rebuilt from the table's config, under this node's
    measurement lock. A node whose device or versions are not the table's measures nothing: the
    driver refuses its answer and sends the unit elsewhere."""
    as_on_the_node()
    backend = get_backend(job.record.name, **job.record.config)
    device, versions, node = fingerprint(backend.device), backend.versions(), _node_id()
    if device != job.device or versions != job.record.versions:
        return UnitResult([], True, device, versions, node, None)
    records: list[dict[str, Any]] = []
    load = CpuLoad()
    with quiet_machine(
        backend.device, device["slug"], backend.host_cores(), job.target, job.busy, once_per_table(job.target), -1, load
    ):
        measurer = UnitMeasurer(job.plan, backend, job.protocol, ArtifactCache(), load)
        built = measurer.measure_unit(list(job.entries), job.round_index, lambda entry, result: records.append(result))
        state = measurer.monitor.sample()
    return UnitResult(records, built, device, versions, node, state)
