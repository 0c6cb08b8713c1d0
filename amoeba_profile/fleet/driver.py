"""Fleet profiling: one Ray cluster, many devices, each table built as ``build-lut`` builds it.

Ray schedules, retries and moves work between machines; this module only decides what to measure
and keeps the books. Each node advertises its device as a custom resource of capacity 1,
``device:<label>`` (``node_resources``: the slug profile-device's detection gives there), and every
measuring task asks for one unit of it, so two measurements never share a device whatever else
the cluster runs.

The driver does everything a local build does on its own machine - the table lock, the journal,
the build loop of ``scheduler.py`` (rounds, noisy rows re-measured), the aggregation, the fit and
the atomic write (``build.start_table`` ... ``build.finish_table``) - and the workers only measure
(``worker.py``): the loop's launcher here (``RayLauncher``) sends each unit's pending entries of a
round as one task (``build.UnitMeasurer``, under the device's measurement lock on that node), and
the loop appends the results to the table's journal as each task finishes. So:
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

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import AmoebaError, UsageError
from amoeba_profile.core.files import Notice, table_lock
from amoeba_profile.core.inputs import output_dir
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.device import device_slug, resolve_device
from amoeba_profile.device.quiet import BusyPolicy
from amoeba_profile.fleet.plan import FleetBuild
from amoeba_profile.fleet.worker import Described, UnitJob, UnitResult, describe_task, detect_task, measure_task
from amoeba_profile.measure.build import (
    BuildResult,
    finish_table,
    journal_rows,
    leave_unchanged,
    open_journal,
    start_table,
    stored_config_at,
    to_stderr,
)
from amoeba_profile.measure.journal import Journal, check_corrupt_choice
from amoeba_profile.measure.scheduler import Sink, run_rounds
from amoeba_profile.table.lut import table_path

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
            raise AmoebaError(
                f"cannot join the Ray cluster at {address} ({' '.join(str(exc).split())}); is "
                "`ray start --head` running there, and if the head uses token authentication "
                "(Ray's default from 2.61, or a ~/.ray/auth_token), set RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN (`ray get-auth-token` on the head) here too"
            ) from None
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
_REMOTE_MADE = threading.Lock()


def _remote(function: Callable):
    """The Ray remote function of ``function``, made once per process (the builds' threads share it)."""
    with _REMOTE_MADE:
        if function.__name__ not in _REMOTE:
            _REMOTE[function.__name__] = _ray().remote(function)
        return _REMOTE[function.__name__]


def discover(timeout_s: float = 120.0) -> list[FleetNode]:
    """Every live node that advertises a device, with the slug detection gives on it (a task pinned
    to each node); a node that does not answer within ``timeout_s`` says so in ``detected``."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and _labels(n["Resources"])]
    refs = {
        _remote(detect_task)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        .remote(): n
        for n in nodes
    }
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
    return tuple(
        sorted(k.removeprefix(RESOURCE_PREFIX) for k, v in resources.items() if k.startswith(RESOURCE_PREFIX) and v > 0)
    )


def _cause(exc: BaseException) -> str:
    """One line for a failed task: the exception the task raised, else Ray's own error."""
    cause = getattr(exc, "cause", None)
    text = str(cause) if isinstance(cause, BaseException) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:400]


def refusal(
    expected_device: dict[str, Any],
    expected_versions: dict[str, Any],
    entries: list[Entry],
    round_index: int,
    result: UnitResult,
) -> str | None:
    """Why a worker's results may not enter the table (None: they may): measured on another device
    (fingerprint) or with other library versions than the table's, or not the entries asked for."""
    for what, got, want in (
        ("device fingerprint", result.device, expected_device),
        ("library versions", result.versions, expected_versions),
    ):
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


class _Stop(Exception):
    """Ends one build of the fleet without writing its table; ``status`` is ``lost`` or ``failed``."""

    def __init__(self, status: str, why: str):
        super().__init__(why)
        self.status, self.why = status, why


@dataclass
class _Table:
    """One build of the fleet, run in a driver thread of its own."""

    build: FleetBuild
    started: float = field(default_factory=time.perf_counter)
    stack: ExitStack = field(default_factory=ExitStack)
    status: str = "describing"  # describing, measuring, written, unchanged, lost, failed
    message: str = ""
    journal: Journal | None = None
    nodes: set[str] = field(default_factory=set)
    missing_since: float | None = None
    result: BuildResult | None = None

    @property
    def resource(self) -> str:
        return resource_name(self.build.label)


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


def run_fleet(
    builds: list[FleetBuild],
    out_dir: Path,
    protocol: TimingProtocol = TimingProtocol(),
    *,
    busy: BusyPolicy | None = None,
    progress: FleetProgress | None = None,
    notice: Notice | None = None,
    device_wait_s: float = 600.0,
    max_retries: int = 3,
    on_corrupt_journal: str = "stop",
    resume_hint: str = "the same run_fleet call",
    poll_s: float = 1.0,
) -> list[FleetOutcome]:
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
    driver = _Driver(
        Path(out_dir),
        protocol,
        busy,
        progress,
        notice or to_stderr,
        device_wait_s,
        max_retries,
        on_corrupt_journal,
        resume_hint,
        poll_s,
    )
    return driver.run([_Table(build) for build in builds])


class _Driver:
    """Runs every build of the fleet at once, each in a thread of its own: a build's loop
    (``scheduler.run_rounds``) waits while its round's tasks run, and the builds of other devices
    must not wait with it. A thread polls Ray every ``poll_s``, so a stopped run (Ctrl-C) ends each
    build at its next poll, its tasks cancelled and its lock released. The caller's ``progress``
    and ``notice`` run on the calling thread (``_on_caller``), as in a local build."""

    def __init__(
        self,
        out_dir: Path,
        protocol: TimingProtocol,
        busy: BusyPolicy | None,
        progress: FleetProgress | None,
        notice: Notice,
        device_wait_s: float,
        max_retries: int,
        on_corrupt: str,
        resume_hint: str,
        poll_s: float,
    ):
        self.ray = _ray()
        self.out_dir, self.protocol, self.busy, self.progress, self.notice = out_dir, protocol, busy, progress, notice
        self.device_wait_s, self.max_retries, self.on_corrupt = device_wait_s, max_retries, on_corrupt
        self.resume_hint, self.poll_s = resume_hint, poll_s
        self.paths: dict[Path, _Table] = {}
        self.claiming = threading.Lock()
        self.stopping = threading.Event()
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def announce_missing(self, tables: list[_Table]) -> None:
        """One line for every device no live node advertises as the run starts (a plan may name
        thousands); their builds then wait silently, and only a device lost later is named alone."""
        present, now = self.ray.cluster_resources(), time.monotonic()
        missing = [t for t in tables if present.get(t.resource, 0) <= 0]
        for table in missing:
            table.missing_since = now
        if missing:
            self.say(
                f"no live node advertises {listed(sorted({t.resource for t in missing}))}; waiting up to "
                f"{self.device_wait_s:g} s for one to join"
            )

    def run(self, tables: list[_Table]) -> list[FleetOutcome]:
        self.announce_missing(tables)
        while not self.calls.empty():
            self.calls.get()()
        with ThreadPoolExecutor(max_workers=max(len(tables), 1), thread_name_prefix="fleet-build") as pool:
            futures = [pool.submit(self._build, table) for table in tables]
            try:
                while not all(future.done() for future in futures):
                    try:
                        self.calls.get(timeout=self.poll_s)()
                    except queue.Empty:
                        pass
                    for future in futures:
                        if future.done():
                            future.result()  # a build's unexpected error stops the run
                while not self.calls.empty():
                    self.calls.get()()
            except BaseException:
                self.stopping.set()
                raise
        return [
            FleetOutcome(
                t.build,
                t.status,
                t.message,
                t.result,
                tuple(sorted(t.nodes)),
                t.journal.path if t.journal is not None and t.journal.path.exists() else None,
            )
            for t in tables
        ]

    def _on_caller(self, function: Callable[..., None], *args: Any) -> None:
        """Call ``function(*args)`` on the thread that runs ``run``, in order, without waiting for
        it: a caller's callback may do what only the main thread may (a test's progress callback
        starts a Ray node, which installs a signal handler)."""
        self.calls.put(lambda: function(*args))

    def say(self, message: str) -> None:
        self._on_caller(self.notice, message)

    def _build(self, table: _Table) -> None:
        try:
            self._measure(table)
        except _Stop as stop:
            self._stopped(table, stop.status, stop.why)
        except AmoebaError as exc:  # the table or journal refused (identity, lock, a bad record)
            self._stopped(table, "failed", str(exc))
        finally:
            table.stack.close()

    def _measure(self, table: _Table) -> None:
        """``run_build`` with the device's answers taken from its nodes: describe, start the table,
        the build loop through a ``RayLauncher``, finish the table."""
        described = self._describe(table, table.build.threads)
        plan, record = described.plan, described.record
        path = table_path(self.out_dir, described.device["slug"], record.name, plan.arch.name, record.dtype)
        stored = stored_config_at(path) if table.build.threads is None else None
        if stored and stored.get("threads") and stored["threads"] != record.config.get("threads"):
            # A load-dependent default thread count must not change a table's identity between runs.
            described = self._describe(table, stored["threads"])
            plan, record = described.plan, described.record
        with self.claiming:
            other = self.paths.setdefault(path, table)
        if other is not table:
            raise _Stop(
                "failed",
                f"writes {path}, as {other.build.name} does: both labels' nodes have the same "
                "device; give one of them other flows or models",
            )
        output_dir(path.parent, "--out")
        table.stack.enter_context(table_lock(path, 0, self.say))
        start = start_table(path, plan, record, self.protocol, described.device, described.method_reason)

        def journal() -> Journal:
            return open_journal(start.journal_path, plan, record, self.protocol, described.device, self.on_corrupt)

        if start.nothing_new:
            table.result, table.status = leave_unchanged(start, journal, table.started), "unchanged"
            return
        table.journal, table.status = journal(), "measuring"
        # An extended table keeps the device it was measured on: rows from any other are refused.
        fingerprint = (start.old_meta.device if start.old_meta else None) or described.device
        start.meta.monitor, start.meta.state_at_start = described.monitor, described.state
        launcher = RayLauncher(self, table, described, fingerprint, str(path))
        progress = self.progress
        run_rounds(
            start.todo,
            table.journal,
            self.protocol,
            launcher,
            (lambda *done_total_label: self._on_caller(progress, table.build.name, *done_total_label))
            if progress
            else None,
        )
        rows, failed = journal_rows(start.todo, table.journal, self.protocol, plan.method)
        start.meta.state_at_end = launcher.last_state if launcher.last_state is not None else described.state
        provenance = {"resource": table.resource, "nodes": sorted(table.nodes)}
        if start.old_meta is None:
            start.meta.fleet = provenance
        elif start.meta.later_builds:  # an extending build lists itself last (``build._extend_meta``)
            start.meta.later_builds[-1]["fleet"] = provenance
        table.result = finish_table(start, rows, failed, table.journal, table.started)
        table.status = "written"

    def options(self, table: _Table) -> dict[str, Any]:
        # num_cpus=0: the device resource is what a measurement holds; a node started with
        # --num-cpus=0 (a head that measures nothing) still runs nothing of ours.
        return {
            "resources": {table.resource: 1},
            "num_cpus": 0,
            "max_retries": self.max_retries,
            "retry_exceptions": False,
        }

    def _describe(self, table: _Table, threads: int | None) -> Described:
        ref = _remote(describe_task).options(**self.options(table)).remote(table.build, threads)
        try:
            self.ready(table, [ref])
        except BaseException:
            self.ray.cancel(ref)
            raise
        return self.value(ref)

    def ready(self, table: _Table, refs: list[Any]) -> list[Any]:
        """The tasks of ``refs`` that have finished, waiting at most ``poll_s`` at a time; in between,
        a stopped run or a device with no live node for ``device_wait_s`` ends the build."""
        while True:
            if self.stopping.is_set():
                raise _Stop("failed", "the fleet run was stopped")
            done, _ = self.ray.wait(refs, num_returns=1, timeout=self.poll_s)
            if done:
                return done
            self._watch_device(table)

    def value(self, ref: Any) -> Any:
        """A finished task's value; a task that raised (a refusal, a failed measurement) fails the
        build, one lost past its retries loses it."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            raise _Stop("failed", _cause(exc)) from None
        except self.ray.exceptions.RayError as exc:
            raise _Stop("lost", _cause(exc)) from None

    def _watch_device(self, table: _Table) -> None:
        """Give up a build whose device has had no live node for ``device_wait_s``: its tasks wait
        for a node that may never come back."""
        now = time.monotonic()
        if self.ray.cluster_resources().get(table.resource, 0) > 0:
            table.missing_since = None
        elif table.missing_since is None:
            table.missing_since = now
            self.say(
                f"{table.build.name}: no live node advertises {table.resource}; waiting up to "
                f"{self.device_wait_s:g} s for one to join"
            )
        elif now - table.missing_since >= self.device_wait_s:
            raise _Stop("lost", f"no live node advertised {table.resource} for {self.device_wait_s:g} s")

    def _stopped(self, table: _Table, status: str, why: str) -> None:
        """A build ended without writing its table: say in one line what is kept and how to resume."""
        journal = table.journal
        kept = (
            f"{len(journal.records)} results kept in {journal.path}" if journal is not None else "nothing measured yet"
        )
        table.status = status
        table.message = f"{table.build.name}: {why}; {kept}; resume with: {self.resume_hint}"


class RayLauncher:
    """Where a fleet build's units run: one Ray task per unit (``worker.measure_task``), every unit
    of a round at once, on the nodes that advertise the table's device (the device resource makes
    them take turns there); Ray reruns a task lost with its node elsewhere (``max_retries``).
    Results from a node that measures unlike the table (``refusal``) are never journaled: the unit
    goes to another node of the device, and with none left the build fails."""

    def __init__(self, driver: _Driver, table: _Table, described: Described, fingerprint: dict[str, Any], target: str):
        self.driver, self.table, self.described = driver, table, described
        self.fingerprint, self.target = fingerprint, target
        self.refused: dict[str, str] = {}  # node id -> why its results were refused
        self.turn = 0
        self.last_state: dict[str, Any] | None = None  # the device state after the latest unit

    def launch(self, groups: list[list[Entry]], round_index: int, sink: Sink) -> set[tuple]:
        driver, failed = self.driver, set()
        pending = {}
        try:
            for entries in groups:
                pending[self._submit(entries, round_index)] = entries
            while pending:
                for ref in driver.ready(self.table, list(pending)):
                    entries = pending.pop(ref)
                    result: UnitResult = driver.value(ref)
                    problem = refusal(self.fingerprint, self.described.record.versions, entries, round_index, result)
                    if problem is not None:
                        if result.node not in self.refused:
                            driver.say(
                                f"{self.table.build.name}: results from node {result.node[:12]} refused, "
                                f"never mixed in: {problem}"
                            )
                        self.refused[result.node] = problem
                        pending[self._submit(entries, round_index)] = entries
                        continue
                    by_key = {e.key: e for e in entries}
                    for record in result.records:
                        sink(by_key[record["key"]], record)
                    self.table.nodes.add(result.node)
                    self.last_state = result.state
                    if not result.built:
                        failed.add(entries[0].unit)
        finally:
            for ref in pending:
                driver.ray.cancel(ref)
        return failed

    def _submit(self, entries: list[Entry], round_index: int) -> Any:
        described, driver = self.described, self.driver
        job = UnitJob(
            described.plan,
            described.record,
            self.fingerprint,
            driver.protocol,
            tuple(entries),
            round_index,
            driver.busy,
            self.target,
        )
        options = driver.options(self.table)
        if self.refused:
            eligible = self._eligible()
            if not eligible:
                reasons = "; ".join(f"node {node[:12]}: {why}" for node, why in self.refused.items())
                raise _Stop(
                    "failed", f"no node with {self.table.resource} measures as the table was measured ({reasons})"
                )
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                eligible[self.turn % len(eligible)], soft=False
            )
            self.turn += 1
        return _remote(measure_task).options(**options).remote(job)

    def _eligible(self) -> list[str]:
        """Live nodes that advertise the table's device and whose results were never refused."""
        resource = self.table.resource
        return sorted(
            n["NodeID"]
            for n in self.driver.ray.nodes()
            if n["Alive"] and n["Resources"].get(resource, 0) > 0 and n["NodeID"] not in self.refused
        )
