"""Fleet profiling: one Ray cluster, many devices, each table built as ``build-lut`` builds it.

Ray schedules, retries and moves work between machines; this module only decides what to measure
and keeps the books. Each node advertises its device as a custom resource of capacity 1,
``device:<label>`` (``node_resources``: the slug profile-device's detection gives there), and every
measuring task asks for one unit of it, so two measurements never share a device whatever else
the cluster runs.

The driver does everything a local build does on its own machine - the table lock, the journal,
the rounds, the choice of noisy rows to re-measure, the aggregation, the fit and the atomic write
(``build.start_table`` ... ``build.finish_table``) - and the workers only measure
(``fleet_worker.py``): one task measures one unit's pending entries in one round
(``build.UnitMeasurer``, under the device's measurement lock on that node) and returns the
results, which the driver appends to the table's journal as each task finishes. So:
- a worker or node killed mid-build loses only the unit it was measuring; Ray retries that task
  (``max_retries``) on another node of the same device, or on one that joins later;
- a device with no node for ``device_wait_s`` is given up: its journal stays, and the message names
  the command that resumes it (the same fleet command, or ``build-lut`` with the same options on
  that device, which reads the same journal);
- results from a node whose device fingerprint or library versions differ from the table's are
  refused, never mixed in, and the unit goes to another node of the device.
A fleet table differs from a local one only in its provenance: the sidecar's ``fleet`` (or, for a
build that extends a table, its ``later_builds`` entry's) names the resource and the node ids.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .build import (BuildResult, TableStart, finish_table, group_units, journal_rows, leave_unchanged, noisy_groups,
                    open_journal, round_groups, start_table, stored_config_at, to_stderr)
from .device import device_slug, resolve_device
from .entry import Entry
from .errors import AmoebaError, UsageError
from .fleet_plan import FleetBuild
from .fleet_worker import Described, UnitJob, UnitResult, describe_task, detect_task, measure_task
from .inputs import output_dir
from .journal import Journal, check_corrupt_choice
from .lockfile import Notice, table_lock
from .lut import table_path
from .measure import TimingProtocol
from .quiet import BusyPolicy

FleetProgress = Callable[[str, int, int, str], None]  # (build name, done, total, what was measured last)
RESOURCE_PREFIX = "device:"
INSTALL_HINT = "pip install 'amoeba-profile[fleet]' (the same Python minor version and Ray version on every node)"


def _ray():
    """The ray module, or a one-line error with the install hint (Ray is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise AmoebaError(f"fleet profiling needs Ray: {INSTALL_HINT}") from None
    return ray


def resource_name(label: str) -> str:
    return RESOURCE_PREFIX + label


def listed(names: list[str], shown: int = 3) -> str:
    """``a, b, c and 1997 more``: a list of any length as a few words of one line."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def node_resources(device: str = "auto") -> dict[str, float]:
    """The custom resource this machine's node advertises: its device slug, capacity 1, so that
    one measurement at a time runs on it (``ray start --resources '<this as JSON>'``)."""
    resolved, _ = resolve_device(device)
    return {resource_name(device_slug(resolved)): 1.0}


def connect(address: str | None) -> str:
    """Join the Ray cluster at ``address``; without one, the cluster ``ray start`` runs on this
    machine, else a new local cluster whose one node advertises this machine's device. Returns
    what was joined, for people."""
    ray = _ray()
    if address:
        try:
            ray.init(address=address)
        except ConnectionError as exc:
            raise AmoebaError(f"cannot join the Ray cluster at {address} ({' '.join(str(exc).split())}); is "
                              "`ray start --head` running there, and if the head uses token authentication "
                              "(Ray's default from 2.61, or a ~/.ray/auth_token), set RAY_AUTH_MODE=token and "
                              "RAY_AUTH_TOKEN (`ray get-auth-token` on the head) here too") from None
        return f"the Ray cluster at {address}"
    try:
        ray.init(address="auto")
        return "the Ray cluster running on this machine"
    except ConnectionError:
        ray.init(address="local", resources=node_resources(), include_dashboard=False)
        return "a new local Ray cluster (this machine only)"


def disconnect() -> None:
    _ray().shutdown()


@dataclass(frozen=True)
class FleetNode:
    """A node of the cluster: the device labels it advertises and the slug detection gives there."""

    node: str
    host: str
    labels: tuple[str, ...]
    detected: str


_REMOTE: dict[str, Any] = {}


def _remote(function: Callable):
    """The Ray remote function of ``function``, made once per process."""
    if function.__name__ not in _REMOTE:
        _REMOTE[function.__name__] = _ray().remote(function)
    return _REMOTE[function.__name__]


def discover(timeout_s: float = 120.0) -> list[FleetNode]:
    """Every live node that advertises a device, with the slug detection gives on it (a task pinned
    to each node); a node that does not answer within ``timeout_s`` says so in ``detected``."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and _labels(n["Resources"])]
    refs = {_remote(detect_task).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(): n for n in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    found = []
    for ref, node in refs.items():
        try:
            detected = ray.get(ref) if ref in ready else f"(no answer in {timeout_s:g} s)"
        except ray.exceptions.RayError as exc:
            detected = f"(detection failed: {_cause(exc)})"
        found.append(FleetNode(node["NodeID"], node["NodeManagerAddress"], _labels(node["Resources"]), detected))
    return found


def _labels(resources: dict[str, float]) -> tuple[str, ...]:
    return tuple(sorted(k.removeprefix(RESOURCE_PREFIX) for k, v in resources.items()
                        if k.startswith(RESOURCE_PREFIX) and v > 0))


def _cause(exc: BaseException) -> str:
    """One line for a failed task: the exception the task raised, else Ray's own error."""
    cause = getattr(exc, "cause", None)
    text = str(cause) if isinstance(cause, BaseException) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:400]


def refusal(expected_device: dict[str, Any], expected_versions: dict[str, Any], entries: list[Entry],
            round_index: int, result: UnitResult) -> str | None:
    """Why a worker's results may not enter the table (None: they may): measured on another device
    (fingerprint) or with other library versions than the table's, or not the entries asked for."""
    for what, got, want in (("device fingerprint", result.device, expected_device),
                            ("library versions", result.versions, expected_versions)):
        if got != want:
            differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            detail = ", ".join(f"{k}: {got.get(k)!r} instead of {want.get(k)!r}" for k in differ)
            return f"its {what} differs from the table's ({detail})"
    asked = {(e.key, round_index) for e in entries}
    answered = [(r.get("key"), r.get("round")) for r in result.records]
    if len(answered) != len(asked) or set(answered) != asked:
        return "its results are not those of the entries it was asked to measure"
    return None


# ---- the driver -------------------------------------------------------------------------------


@dataclass
class _Table:
    """One build of the fleet in flight; ``pending`` maps each outstanding task to its unit-round
    (None: the describe task)."""

    build: FleetBuild
    started: float = field(default_factory=time.perf_counter)
    stack: ExitStack = field(default_factory=ExitStack)
    status: str = "describing"  # describing, measuring, written, unchanged, lost, failed
    message: str = ""
    described: Described | None = None
    start: TableStart | None = None
    journal: Journal | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    units: dict[tuple, list[Entry]] = field(default_factory=dict)
    failed_units: set[tuple] = field(default_factory=set)
    round_index: int = 0
    pending: dict[Any, tuple[list[Entry], int] | None] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)  # node id -> why its results were refused
    turn: int = 0
    redescribed: bool = False
    last_state: dict[str, Any] | None = None
    missing_since: float | None = None
    result: BuildResult | None = None

    @property
    def resource(self) -> str:
        return resource_name(self.build.label)

    @property
    def active(self) -> bool:
        return self.status in ("describing", "measuring")


@dataclass(frozen=True)
class FleetOutcome:
    """How one build of the fleet ended: ``written`` or ``unchanged`` (``result`` says what was
    measured), ``lost`` (its device went away) or ``failed``; ``message`` is one line for the last
    two, naming the journal kept and the command that resumes it."""

    build: FleetBuild
    status: str
    message: str
    result: BuildResult | None
    nodes: tuple[str, ...]
    journal: Path | None


def run_fleet(builds: list[FleetBuild], out_dir: Path, protocol: TimingProtocol = TimingProtocol(), *,
              busy: BusyPolicy | None = None, progress: FleetProgress | None = None, notice: Notice | None = None,
              device_wait_s: float = 600.0, max_retries: int = 3, on_corrupt_journal: str = "stop",
              resume_hint: str = "the same run_fleet call", poll_s: float = 1.0) -> list[FleetOutcome]:
    """Build every table of ``builds`` on the connected Ray cluster (``connect``) into ``out_dir``,
    as ``run_build`` would on each device; returns one outcome per build, in order.

    ``busy`` is each worker's policy about other processes' load on its node; ``device_wait_s``
    how long a device may have no node before its build is given up (journal kept);
    ``max_retries`` how often Ray reruns a task whose worker or node died."""
    ray = _ray()
    if not ray.is_initialized():
        raise UsageError("run_fleet needs a Ray connection: call fleet.connect(address) first")
    check_corrupt_choice(on_corrupt_journal)
    output_dir(out_dir, "--out")
    driver = _Driver(Path(out_dir), protocol, busy, progress, notice or to_stderr, device_wait_s, max_retries,
                     on_corrupt_journal, resume_hint, poll_s)
    return driver.run([_Table(build) for build in builds])


class _Driver:
    def __init__(self, out_dir: Path, protocol: TimingProtocol, busy: BusyPolicy | None,
                 progress: FleetProgress | None, notice: Notice, device_wait_s: float, max_retries: int,
                 on_corrupt: str, resume_hint: str, poll_s: float):
        self.ray = _ray()
        self.out_dir, self.protocol, self.busy, self.progress, self.notice = out_dir, protocol, busy, progress, notice
        self.device_wait_s, self.max_retries, self.on_corrupt = device_wait_s, max_retries, on_corrupt
        self.resume_hint, self.poll_s = resume_hint, poll_s
        self.owner: dict[Any, _Table] = {}
        self.paths: dict[Path, _Table] = {}

    def run(self, tables: list[_Table]) -> list[FleetOutcome]:
        try:
            for table in tables:
                self._describe(table, table.build.threads)
            while self.owner:
                ready, _ = self.ray.wait(list(self.owner), num_returns=1, timeout=self.poll_s)
                for ref in ready:
                    table = self.owner.pop(ref)
                    job = table.pending.pop(ref)
                    if table.active:
                        self._handle(table, ref, job)
                self._watch_devices(tables)
        finally:
            for table in tables:
                for ref in table.pending:
                    self.ray.cancel(ref)
                table.stack.close()
        return [FleetOutcome(t.build, t.status, t.message, t.result, tuple(sorted(t.nodes)),
                             t.journal.path if t.journal is not None and t.journal.path.exists() else None)
                for t in tables]

    def _options(self, table: _Table) -> dict[str, Any]:
        # num_cpus=0: the device resource is what a measurement holds; a node started with
        # --num-cpus=0 (a head that measures nothing) still runs nothing of ours.
        return {"resources": {table.resource: 1}, "num_cpus": 0, "max_retries": self.max_retries,
                "retry_exceptions": False}

    def _describe(self, table: _Table, threads: int | None) -> None:
        ref = _remote(describe_task).options(**self._options(table)).remote(table.build, threads)
        self.owner[ref] = table
        table.pending[ref] = None

    def _handle(self, table: _Table, ref: Any, job: tuple[list[Entry], int] | None) -> None:
        try:
            value = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:  # the task raised: a refusal or a failed measurement
            return self._stop(table, "failed", _cause(exc))
        except self.ray.exceptions.RayError as exc:  # the task was lost past its retries
            return self._stop(table, "lost", _cause(exc))
        try:
            if job is None:
                self._described(table, value)
            else:
                self._measured(table, job, value)
        except AmoebaError as exc:  # the table or journal refused (identity, lock, a bad record)
            self._stop(table, "failed", str(exc))

    def _described(self, table: _Table, described: Described) -> None:
        plan, record = described.plan, described.record
        path = table_path(self.out_dir, described.device["slug"], record.name, plan.arch.name, record.dtype)
        if table.build.threads is None and not table.redescribed:
            # A load-dependent default thread count must not change a table's identity between runs.
            stored = stored_config_at(path)
            if stored and stored.get("threads") and stored["threads"] != record.config.get("threads"):
                table.redescribed = True
                return self._describe(table, stored["threads"])
        other = self.paths.get(path)
        if other is not None:
            return self._stop(table, "failed", f"writes {path}, as {other.build.name} does: both labels' nodes have "
                              "the same device; give one of them other flows or models")
        self.paths[path] = table
        output_dir(path.parent, "--out")
        table.stack.enter_context(table_lock(path, 0, self.notice))
        start = start_table(path, plan, record, self.protocol, described.device, described.method_reason)

        def journal() -> Journal:
            return open_journal(start.journal_path, plan, record, self.protocol, described.device, self.on_corrupt)

        if start.nothing_new:
            table.result, table.status = leave_unchanged(start, journal, table.started), "unchanged"
            return table.stack.close()
        table.journal, table.start, table.described, table.status = journal(), start, described, "measuring"
        # An extended table keeps the device it was measured on: rows from any other are refused.
        table.fingerprint = start.old_meta.get("device", described.device) if start.old_meta else described.device
        start.meta["monitor"], start.meta["state_at_start"] = described.monitor, described.state
        table.units = group_units(start.todo)
        self._report(table, "resuming" if table.journal.records else "starting")
        self._advance(table)

    def _advance(self, table: _Table) -> None:
        """Submit the next round that has work (every unit once per round, as a local build; then
        the extra round for noisy rows); with none left, write the table."""
        rounds = self.protocol.rounds
        while table.round_index <= rounds:
            if table.round_index < rounds:
                groups = round_groups(table.units, table.journal.done(), table.failed_units, table.round_index)
            else:
                groups = noisy_groups(table.units, table.journal, table.failed_units, self.protocol)
            for entries in groups:
                self._submit(table, entries, table.round_index)
            if groups:
                return
            table.round_index += 1
        self._finish(table)

    def _submit(self, table: _Table, entries: list[Entry], round_index: int) -> None:
        if not table.active:
            return
        described = table.described
        job = UnitJob(described.plan, described.record, table.fingerprint, self.protocol, tuple(entries), round_index,
                      self.busy, str(table.start.path))
        options = self._options(table)
        if table.refused:
            eligible = self._eligible(table)
            if not eligible:
                reasons = "; ".join(f"node {node[:12]}: {why}" for node, why in table.refused.items())
                return self._stop(table, "failed", f"no node with {table.resource} measures as the table was "
                                  f"measured ({reasons})")
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(eligible[table.turn % len(eligible)],
                                                                            soft=False)
            table.turn += 1
        ref = _remote(measure_task).options(**options).remote(job)
        self.owner[ref] = table
        table.pending[ref] = (entries, round_index)

    def _eligible(self, table: _Table) -> list[str]:
        """Live nodes that advertise the table's device and whose results were never refused."""
        return sorted(n["NodeID"] for n in self.ray.nodes() if n["Alive"] and n["Resources"].get(table.resource, 0) > 0
                      and n["NodeID"] not in table.refused)

    def _measured(self, table: _Table, job: tuple[list[Entry], int], result: UnitResult) -> None:
        entries, round_index = job
        problem = refusal(table.fingerprint, table.described.record.versions, entries, round_index, result)
        if problem is not None:
            if result.node not in table.refused:
                self.notice(f"{table.build.name}: results from node {result.node[:12]} refused, never mixed in: "
                            f"{problem}")
            table.refused[result.node] = problem
            return self._submit(table, entries, round_index)
        for record in result.records:
            table.journal.append(record)
        table.nodes.add(result.node)
        table.last_state = result.state
        if not result.built:
            table.failed_units.add(entries[0].unit)
        rounds = self.protocol.rounds
        which = f"round {round_index + 1}/{rounds}" if round_index < rounds else "extra round for noisy rows"
        self._report(table, f"{which}: {entries[-1].label}")
        if not table.pending:
            self._advance(table)

    def _report(self, table: _Table, label: str) -> None:
        if self.progress is None:
            return
        todo_keys = {e.key for e in table.start.todo}
        total = len(todo_keys) * self.protocol.rounds
        done = len({d for d in table.journal.done() if d[0] in todo_keys})
        self.progress(table.build.name, min(done, total), total, label)

    def _finish(self, table: _Table) -> None:
        start, described = table.start, table.described
        rows, oom = journal_rows(start.todo, table.journal, self.protocol, described.plan.method)
        start.meta["state_at_end"] = table.last_state if table.last_state is not None else described.state
        provenance = {"resource": table.resource, "nodes": sorted(table.nodes)}
        if start.old_meta is None:
            start.meta["fleet"] = provenance
        else:
            start.meta["later_builds"][-1]["fleet"] = provenance
        table.result = finish_table(start, rows, oom, table.journal, table.started)
        table.status = "written"
        table.stack.close()

    def _watch_devices(self, tables: list[_Table]) -> None:
        """Give up a build whose device has had no live node for ``device_wait_s``: its tasks wait
        for a node that may never come back."""
        waiting = [t for t in tables if t.active and t.pending]
        if not waiting:
            return
        present = self.ray.cluster_resources()
        now = time.monotonic()
        missing: list[str] = []
        for table in waiting:
            if present.get(table.resource, 0) > 0:
                table.missing_since = None
            elif table.missing_since is None:
                table.missing_since = now
                missing.append(table.resource)
            elif now - table.missing_since >= self.device_wait_s:
                self._stop(table, "lost", f"no live node advertised {table.resource} for {self.device_wait_s:g} s")
        if missing:  # one line however many devices: a plan may name thousands of labels no node has
            missing = sorted(set(missing))
            self.notice(f"no live node advertises {listed(missing)}; waiting up to {self.device_wait_s:g} s for one "
                        "to join")

    def _stop(self, table: _Table, status: str, why: str) -> None:
        """End a build without writing its table: cancel its tasks, release its lock, and say in one
        line what is kept and how to resume."""
        for ref in table.pending:
            self.ray.cancel(ref)
            self.owner.pop(ref, None)
        table.pending.clear()
        journal = table.journal
        kept = (f"{len(journal.records)} results kept in {journal.path}" if journal is not None
                else "nothing measured yet")
        table.status = status
        table.message = f"{table.build.name}: {why}; {kept}; resume with: {self.resume_hint}"
        table.stack.close()
