"""Run a LUT build: interleaved rounds, a crash-safe journal, an atomic finish.

Every (entry, round) result goes to the journal (``journal.py``) before the next one starts, so a
build killed at any moment (even ``kill -9``) resumes with nothing lost or measured twice. Entries
are measured in interleaved rounds by the build loop of ``scheduler.py``; a local build runs each
unit in this process (``InlineLauncher`` around ``UnitMeasurer``). Whole models run through the backend's serving loop from engines compiled once (``artifacts.py``) and
loaded per round. A ``difference`` build then fits base + per-layer costs (``fit.py``). The
finished table replaces the old one atomically; a file lock serializes two builds of one table,
and a machine-wide lock per device serializes every measurement on it (``quiet.py``). Other
processes' CPU load is recorded around every entry; rows measured under it are flagged.

A fleet build (``fleet/driver.py``) runs the same parts, split between machines: ``UnitMeasurer``
on a node of the device, the same build loop with a launcher that sends units there, the journal
and the table (``start_table``, ``finish_table``) on the driver.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np

from amoeba_profile import __version__
from amoeba_profile.backends import Backend, get_backend
from amoeba_profile.backends.base import EngineSpec
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import AmoebaError, ArtifactError, LutError, UnsupportedShape
from amoeba_profile.core.files import Notice, held, table_lock
from amoeba_profile.core.inputs import output_dir, read_bounded
from amoeba_profile.core.schema import GRID_LISTS, Grid, Row, TableMeta, grid_fields
from amoeba_profile.core.timing import Measurement, TimingProtocol, sample, warm_up
from amoeba_profile.device import available_memory_bytes, fingerprint
from amoeba_profile.device.load import CpuLoad
from amoeba_profile.device.monitor import Monitor, entry_state, host_contention, monitor_for
from amoeba_profile.device.quiet import CONTENDED_SHARE, BusyPolicy, quiet_machine, wait_for_quiet
from amoeba_profile.measure.artifacts import ArtifactCache
from amoeba_profile.measure.journal import HEADER_BYTES, Journal, cannot_write
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.measure.scheduler import Progress, Sink, run_rounds
from amoeba_profile.selection.memory import check_fits
from amoeba_profile.table.fit import calibrate_rows, fit_rows
from amoeba_profile.table.lut import (
    Lut,
    frame_rows,
    load_table,
    measured_row,
    rows_frame,
    short_of,
    table_path,
    write_table,
)

HOST_BOUND_BUSY = 0.5  # accelerator busy less than half of a sample: the host is the bottleneck
_IDENTITY_KEYS = ("device_slug", "backend", "versions", "backend_config", "dtype", "arch", "method")


@dataclass(frozen=True)
class BackendRecord:
    """What a table and its journal record about the backend that measures them.

    A local build reads it off its backend; a fleet build gets it from a worker on the device,
    because the driver may have neither that device nor the flow's libraries."""

    name: str
    config: dict[str, Any]
    versions: dict[str, Any]
    environment: dict[str, Any]
    dtype: str
    clock_name: str

    @classmethod
    def of(cls, backend: Backend) -> BackendRecord:
        return cls(
            backend.name,
            backend.config_dict(),
            backend.versions(),
            backend.environment(),
            backend.dtype,
            backend.clock_name,
        )


def _journal_header(plan: BuildPlan, record: BackendRecord, protocol: TimingProtocol, device: dict[str, Any]) -> dict:
    """The options a journal's results belong to, and their hash: a journal of other options is refused,
    and the refusal names which differ."""
    options = {
        "arch": plan.arch.to_dict(),
        "grid": grid_fields(plan.grid()),
        "whole": sorted(s.id for s in plan.whole),
        "backend": record.name,
        "config": record.config,
        "versions": record.versions,
        "device": device["slug"],
        "protocol": protocol.identity_dict(),
    }
    identity = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    return {"kind": "header", "identity": identity, "options": options}


def _row_method(entry: Entry, plan_method: str) -> str:
    """A calibrated table measures its rows as components; only its derived layer rows are calibrated."""
    if entry.component == "model":
        return "whole"
    return "components" if plan_method == "calibrated" else plan_method


@dataclass
class BuildResult:
    """``measured``: entries with a result measured by this run; ``from_journal``: entries whose
    results all came from an earlier, interrupted run's journal; ``reused``: rows already in the
    table; ``remeasured``: entries of ``measured`` + ``from_journal`` whose old rows held fewer
    rounds or samples than this run's protocol; ``written``: False when the run had nothing to add
    and left the table untouched."""

    path: Path
    measured: int
    from_journal: int
    reused: int
    failed: list[str]  # labels of the entries that failed: stored as oom, or as error (too noisy, no result)
    wall_s: float
    written: bool = True
    recompiled: list[str] = field(default_factory=list)  # rows whose timed samples included JIT compiling
    remeasured: int = 0
    # Labels of the entries the flow cannot run (stored as unsupported, the reason in their note):
    # skipped by design, such as pytorch-compiled's model without layers, not failures.
    unsupported: list[str] = field(default_factory=list)


def preflight(plan: BuildPlan, backend: Backend, out_dir: Path) -> None:
    """Everything a build refuses before it writes a byte: what ``check_device`` refuses, and an
    output folder that cannot be one. ``run_build`` calls it; a caller that reports progress calls
    it first, so a refusal is the only thing it prints."""
    check_device(plan, backend)
    output_dir(out_dir, "--out")


def check_device(plan: BuildPlan, backend: Backend) -> None:
    """What the measuring machine refuses: a method the backend lacks, a largest engine or
    component chain that cannot fit the memory the device has available (``memory.check_fits``).
    A fleet worker runs it on the device; the output folder is the driver's to check."""
    _check_method(plan, backend)
    check_fits(
        plan,
        backend.dtype,
        available_memory_bytes(backend.device),
        backend.device,
        lambda component, h, kv, f: backend.chain_length(plan.arch, component, h, kv, f),
    )


def run_build(
    plan: BuildPlan,
    backend: Backend,
    out_dir: Path,
    protocol: TimingProtocol = TimingProtocol(),
    progress: Progress | None = None,
    lock_timeout_s: float = -1,
    artifacts: ArtifactCache | None = None,
    method_reason: str = "",
    on_corrupt_journal: str = "stop",
    busy: BusyPolicy | None = None,
    notice: Notice | None = None,
    load: CpuLoad | None = None,
    adopt_threads: bool = False,
) -> BuildResult:
    """Measure every entry of ``plan`` not already in the table, then write the table atomically.

    ``on_corrupt_journal`` is what to do with a damaged journal (``journal.CORRUPT_CHOICES``);
    ``notice`` gets one-line messages for the user, such as a wait for another build's lock. The
    build holds the table's lock and the device's measurement lock. With a ``busy`` policy it checks
    other processes' load first and waits for quiet before a re-measure round; without one it
    measures at once. Either way the load around every entry is recorded (``load`` reads it; tests
    pass a simulated one) and contended rows are flagged. ``adopt_threads``: the backend's thread
    count is a load-dependent default, not the user's; once the table's lock is held, the build
    takes the count of the table or journal found there (``adopt_stored_threads``)."""
    plan.check_usable()
    preflight(plan, backend, out_dir)
    device = fingerprint(backend.device)
    path = table_path(out_dir, device["slug"], backend.name, plan.arch.name, backend.dtype)
    output_dir(path.parent, "--out")
    notice = notice if notice is not None else to_stderr
    load = load if load is not None else CpuLoad()
    with table_lock(path, lock_timeout_s, notice):
        if adopt_threads:
            backend = adopt_stored_threads(path, backend, notice)
        with quiet_machine(
            backend.device, device["slug"], backend.host_cores(), str(path), busy, notice, lock_timeout_s, load
        ):
            runner = _Runner(plan, backend, protocol, artifacts or ArtifactCache(), progress, busy, notice, load)
            return runner.build(path, device, method_reason, on_corrupt_journal)


@dataclass(frozen=True)
class Measured:
    """Rows measured into a journal but not into a table (``measure_plan``)."""

    lut: Lut
    measured: int
    from_journal: int


def measure_plan(
    plan: BuildPlan,
    backend: Backend,
    journal_path: Path,
    protocol: TimingProtocol = TimingProtocol(),
    progress: Progress | None = None,
    *,
    artifacts: ArtifactCache | None = None,
    method_reason: str = "",
    on_corrupt_journal: str = "stop",
    busy: BusyPolicy | None = None,
    notice: Notice | None = None,
    load: CpuLoad | None = None,
) -> Measured:
    """Measure every entry of ``plan`` through a journal at ``journal_path`` and return the rows as
    a table in memory, fitted like a build's; nothing else is written and the journal is kept.

    For a caller that stores only part of the rows elsewhere (validate): killed at any moment, the
    same call resumes from the journal, and the caller removes the journal once its rows are stored.
    A lock beside the journal keeps two such runs from appending to it at once; it measures under
    the device's measurement lock and ``busy`` policy as ``run_build`` does."""
    preflight(plan, backend, journal_path.parent)
    device = fingerprint(backend.device)
    notice = notice if notice is not None else to_stderr
    load = load if load is not None else CpuLoad()
    with (
        held(Path(str(journal_path) + ".lock"), f"journal {journal_path}", -1, notice),
        quiet_machine(backend.device, device["slug"], backend.host_cores(), str(journal_path), busy, notice, -1, load),
    ):
        runner = _Runner(plan, backend, protocol, artifacts or ArtifactCache(), progress, busy, notice, load)
        record = BackendRecord.of(backend)
        meta = _meta(plan, record, protocol, device, method_reason)
        journal = open_journal(journal_path, plan, record, protocol, device, on_corrupt_journal)
        todo = plan.entries()
        meta.monitor, meta.state_at_start = runner.monitor.source, runner.monitor.sample()
        rows, _ = runner.measure(todo, journal)
        fit_ids = plan.fit_ids()
        if fit_ids:
            rows, meta.fit = _refit(rows, fit_ids, plan.method)
            meta.fit_subnet_ids = sorted(fit_ids)
        meta.state_at_end = runner.monitor.sample()
    return Measured(Lut(rows_frame(rows), meta), *_provenance(todo, journal))


def _provenance(todo: list[Entry], journal: Journal) -> tuple[int, int]:
    """(entries measured now, entries whose every result came from the journal as it was opened)."""
    now = journal.measured_now()
    measured = sum(e.key in now for e in todo)
    return measured, len(todo) - measured


def _check_method(plan: BuildPlan, backend: Backend) -> None:
    if plan.method not in backend.capabilities().methods:
        raise AmoebaError(
            f"backend {backend.name!r} supports {list(backend.capabilities().methods)}, not the {plan.method!r} method"
        )


def _meta(
    plan: BuildPlan, record: BackendRecord, protocol: TimingProtocol, device: dict[str, Any], method_reason: str
) -> TableMeta:
    return TableMeta(
        tool_version=__version__,
        device_slug=device["slug"],
        device=device,
        backend=record.name,
        backend_config=record.config,
        versions=record.versions,
        backend_env=record.environment,
        dtype=record.dtype,
        arch=plan.arch.to_dict(),
        method=plan.method,
        method_reason=method_reason,
        grid=plan.grid(),
        protocol=protocol.to_dict(),
        clock=record.clock_name,
        source="measured",
        source_config=plan.source_config,
    )


def to_stderr(message: str) -> None:
    """The default notice: one line on stderr (on a fleet worker, Ray forwards it to the driver)."""
    print(message, file=sys.stderr, flush=True)


def _existing(path: Path, meta: TableMeta) -> tuple[list[Row], TableMeta | None]:
    """Rows and sidecar of the table already at ``path``, checked to have this build's identity."""
    if not path.exists():
        return [], None
    lut = load_table(path)
    for key in _IDENTITY_KEYS:
        old, new = getattr(lut.meta, key), getattr(meta, key)
        if old == new:
            continue
        if key == "arch" and isinstance(old, dict) and old.get("name") == new["name"]:
            raise LutError(
                f"{path}: holds another model also named {new['name']!r} ({identity_difference(old, new)}); "
                f"name this one with --name (e.g. --name {new['name']}-2) or choose another --out"
            )
        raise LutError(
            f"{path}: existing table has {key} {identity_difference(old, new)}; tables with different "
            "identities are not merged - choose another --out"
        )
    return frame_rows(lut.frame), lut.meta


def identity_difference(old: Any, new: Any) -> str:
    """What differs between a table's identity field and this build's, short enough for one line:
    only the differing keys of a mapping (two whole architectures read as a wall of text)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
        return ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} here" for k in keys)
    return f"{old!r} there, {new!r} here"


def stored_backend_config(out_dir: Path, plan: BuildPlan, backend: Backend) -> dict[str, Any] | None:
    """The backend config of the unfinished journal or the table that this build would resume or
    extend, or None. A default that follows the machine's load (pytorch's threads) must not change
    the identity of a table between two runs of one build: callers adopt these values instead."""
    path = table_path(out_dir, fingerprint(backend.device)["slug"], backend.name, plan.arch.name, backend.dtype)
    return stored_config_at(path)


def stored_config_at(path: Path) -> dict[str, Any] | None:
    """The backend config of the unfinished journal or the table at ``path`` (a table's CSV), or None."""
    journal = path.with_name(path.name + ".journal.jsonl")
    if journal.is_file():
        try:  # the first line only: opening the journal itself judges the rest (and refuses what is no journal)
            first = read_bounded(journal, HEADER_BYTES, "journal", error=LutError, head=True).split(b"\n", 1)[0]
            header = json.loads(first)
        except (LutError, ValueError, RecursionError):
            header = {}
        options = header.get("options") if isinstance(header, dict) else None
        if isinstance(options, dict) and isinstance(options.get("config"), dict):
            return options["config"]
    return load_table(path).meta.backend_config if path.is_file() else None


def backend_for_build(
    name: str,
    out_dir: Path,
    plan: BuildPlan,
    device: str,
    dtype: str | None,
    threads: int | None,
    options: dict[str, Any] | None = None,
) -> tuple[Backend, str]:
    """The backend a build into ``out_dir`` measures with (``options``: further config fields), and
    a line saying its thread count and why ("" for a backend without one). Without ``threads``, a
    table or journal being resumed or extended keeps the count it was measured with
    (``stored_backend_config``)."""
    options = options or {}
    backend = get_backend(name, device=device, dtype=dtype, threads=threads, **options)
    config = backend.config_dict()
    if "threads" not in config:
        return backend, ""
    stored = stored_backend_config(out_dir, plan, backend) if threads is None else None
    adopted = _with_stored_threads(backend, stored)
    if stored is not None and adopted is not backend:
        return adopted, f"threads: {stored['threads']} (as the table or journal being resumed or extended was measured)"
    why = backend.environment().get("threads_reason")
    return backend, f"threads: {config['threads']}" + (f" ({why})" if why else "")


def _with_stored_threads(backend: Backend, stored: dict[str, Any] | None) -> Backend:
    """``backend`` rebuilt with the thread count of ``stored`` (a table's or journal's backend
    config) where the two differ; ``backend`` itself otherwise."""
    config = backend.config_dict()
    if not stored or not stored.get("threads") or "threads" not in config or stored["threads"] == config["threads"]:
        return backend
    return get_backend(backend.name, **{**config, "threads": stored["threads"]})


def adopt_stored_threads(path: Path, backend: Backend, notice: Notice) -> Backend:
    """``backend`` with the thread count of the table or unfinished journal at ``path`` (a table's
    CSV), for a build whose count was a load-dependent default. Called under the table's lock: a
    build that waited for it finds the table another build wrote meanwhile, measured with the count
    the load gave that build; a different default must not make this one refuse the table."""
    adopted = _with_stored_threads(backend, stored_config_at(path))
    if adopted is not backend:
        notice(
            f"threads: {adopted.config_dict()['threads']} instead of {backend.config_dict()['threads']}, as "
            f"{path} was measured by the build this one waited for"
        )
    return adopted


def open_journal(
    path: Path,
    plan: BuildPlan,
    record: BackendRecord,
    protocol: TimingProtocol,
    device: dict[str, Any],
    on_corrupt: str,
) -> Journal:
    """The journal of one build at ``path``: its results are checked against the plan's entries and
    rounds, and a journal of other options is refused."""
    return Journal(
        path,
        _journal_header(plan, record, protocol, device),
        on_corrupt,
        keys=(e.key for e in plan.entries()),
        max_round=protocol.rounds,
    )


def journal_rows(
    todo: list[Entry], journal: Journal, protocol: TimingProtocol, plan_method: str
) -> tuple[list[Row], list[str]]:
    """The rows of ``todo`` from the journal's results, and the labels of the entries that failed
    (out of memory, or too noisy for a positive median; an unsupported shape is not a failure)."""
    return _aggregate(todo, journal.records, protocol.cv_threshold, plan_method)


@dataclass
class TableStart:
    """One table's build between reading what is at its path and writing it. ``run_build`` and the
    fleet driver share it, so both write the same table from the same journal.

    ``meta`` is the sidecar to write (the old one extended, when the table exists); ``kept`` the
    rows already there that stay; ``todo`` the entries to measure; ``remeasured`` the keys of
    ``todo`` whose rows the table holds with fewer rounds or samples than this build's protocol
    asks (``lut.short_of``), measured again and replaced; ``nothing_new``: the build would add no
    row, fit model or grid value and re-measure nothing, so the table is left alone."""

    path: Path
    meta: TableMeta
    kept: list[Row]
    old_meta: TableMeta | None
    todo: list[Entry]
    fit_ids: set[str]
    nothing_new: bool
    remeasured: frozenset[str] = frozenset()

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(self.path.name + ".journal.jsonl")


def start_table(
    path: Path,
    plan: BuildPlan,
    record: BackendRecord,
    protocol: TimingProtocol,
    device: dict[str, Any],
    method_reason: str,
) -> TableStart:
    """Read the table at ``path`` (refused when its identity is not this build's) and work out what
    the build adds to it. A row of this build's entries measured with fewer rounds or samples than
    ``protocol`` asks (a ``--quick`` build's, under a default one) is not counted as done: its
    entry is measured again under ``protocol`` and its new row replaces the old."""
    meta = _meta(plan, record, protocol, device, method_reason)
    kept, old_meta = _existing(path, meta)
    # An entry stored as out of memory, or as an error without a single sample (no result), is tried
    # again: the memory left to a build changes from run to run, and a failure wrongly taken for
    # one must not stay in the table for good.
    entries = plan.entries()
    planned = {e.key for e in entries}
    kept = [row for row in kept if not (_retried(row) and row.key in planned)]
    fit_ids = plan.fit_ids()
    remeasured: frozenset[str] = frozenset()
    if kept:
        frame = rows_frame(kept)
        short = {row.key for row in frame_rows(frame[short_of(frame, protocol)])}
        remeasured = frozenset(short & planned)
        kept = [row for row in kept if row.key not in remeasured]
    have = {row.key for row in kept}
    todo = [e for e in entries if e.key not in have]
    nothing_new = False
    if old_meta is not None:
        old_fits = set(old_meta.fit_subnet_ids or [])
        nothing_new = not todo and fit_ids <= old_fits and not _widens_grid(old_meta.grid or Grid(), plan)
        if not nothing_new:
            meta = _extend_meta(old_meta, plan, protocol)
            fit_ids |= old_fits
    return TableStart(path, meta, kept, old_meta, todo, fit_ids, nothing_new, remeasured)


def leave_unchanged(start: TableStart, journal: Callable[[], Journal], started: float) -> BuildResult:
    """The result of a build with nothing to add: rewriting would only churn the file and log a
    build that did nothing. A journal of this build left by a crash after its table was written
    goes (``journal`` opens it, refusing another build's, which stays)."""
    if start.journal_path.exists():
        journal().path.unlink()
    return BuildResult(start.path, 0, 0, len(start.kept), [], time.perf_counter() - started, written=False)


def _retried(row: Row) -> bool:
    """A failure a later build measures again: out of memory, or an error without a sample."""
    return row.status == "oom" or (row.status == "error" and row.n == 0)


def finish_table(
    start: TableStart, rows: list[Row], failed: list[str], journal: Journal, started: float
) -> BuildResult:
    """Refit (difference), write the table atomically with ``start.meta`` (the caller has added the
    monitor and device state), then remove the journal."""
    meta = start.meta
    recompiled = [r.key for r in rows if "recompiled" in r.flags.split(";")]
    all_rows = start.kept + rows
    if start.fit_ids:
        all_rows, meta.fit = _refit(all_rows, start.fit_ids, meta.method or "")
        meta.fit_subnet_ids = sorted(start.fit_ids)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if start.old_meta is not None:
        meta.created_at, meta.updated_at = start.old_meta.created_at or created, created
    else:
        meta.created_at = created
    try:
        write_table(start.path, rows_frame(all_rows), meta)
    except OSError as exc:  # the old table, if any, is whole: write_table commits by one rename
        raise cannot_write(exc, start.path, f"the measurements are kept in the journal {journal.path}") from None
    journal.path.unlink(missing_ok=True)
    labels = {e.key: e.label for e in start.todo}
    unsupported = [labels[r.key] for r in rows if r.status == "unsupported" and r.key in labels]
    return BuildResult(
        start.path,
        *_provenance(start.todo, journal),
        len(start.kept),
        failed,
        time.perf_counter() - started,
        recompiled=recompiled,
        remeasured=len(start.remeasured),
        unsupported=unsupported,
    )


def device_out_of_memory(backend: Backend, exc: BaseException) -> bool:
    """Whether ``exc`` means the measured device ran out of memory: the one test before a failure
    is stored as an ``oom`` row. Our own errors (a refused input file among them) never are, and a
    ``MemoryError`` is the host's: on an accelerator it says nothing of whether the shape fits the
    device, so it stops the build instead of marking that shape as too large for good."""
    if isinstance(exc, AmoebaError):
        return False
    if isinstance(exc, MemoryError) and not backend.device.startswith("cpu"):
        return False
    return backend.is_out_of_memory(exc)


class UnitMeasurer:
    """Measures one unit's entries in one round: builds or loads the unit, warms up and times each
    entry with the device state around it, and hands each result to a sink. The one place results
    are made, for a local build (the sink is its journal) and a fleet worker (a list it returns)."""

    def __init__(
        self, plan: BuildPlan, backend: Backend, protocol: TimingProtocol, artifacts: ArtifactCache, load: CpuLoad
    ):
        self.plan, self.backend, self.protocol, self.artifacts = plan, backend, protocol, artifacts
        self.monitor: Monitor = monitor_for(backend.device, load=load, needed=backend.host_cores())

    def _open(self, entry: Entry):
        """(engine or component unit, compile seconds spent now) for the unit ``entry`` belongs to."""
        if not entry.runs_whole:
            return self.backend.build_component(self.plan.arch, entry), 0.0
        layers = tuple((l.heads, l.kv_heads, l.ffn) for l in entry.subnet.layers) if entry.subnet else ()
        spec = EngineSpec(self.plan.arch, layers, *self.plan.engine_limits())
        self.backend.check_spec(spec)
        artifact = self.artifacts.ensure(self.backend, spec)
        engine = self.backend.load(spec, artifact.path)
        return engine, artifact.compile_s + engine.compile_s

    def _piece(self, opened, entry: Entry):
        if not entry.runs_whole:
            return opened.workpiece(entry)
        if entry.phase == "prefill":
            return opened.ttft(entry.batch, entry.tokens)
        return opened.tpot(entry.batch, entry.context, self.plan.decode_steps)

    @staticmethod
    def _fail(entries: list[Entry], round_index: int, sink: Sink, status: str, exc: BaseException) -> None:
        for entry in entries:
            sink(entry, {"key": entry.key, "round": round_index, "status": status, "note": str(exc)[:200]})

    def measure_unit(self, entries: list[Entry], round_index: int, sink: Sink) -> bool:
        """Measure ``entries`` (one unit's) in round ``round_index``; every entry gets one result.
        False when the unit could not be built (unsupported or out of memory): later rounds skip it.
        Any other failure raises, naming the entry."""
        backend = self.backend
        t0 = time.perf_counter()
        try:
            opened, compile_s = self._open(entries[0])
        except UnsupportedShape as exc:
            self._fail(entries, round_index, sink, "unsupported", exc)
            return False
        except ArtifactError as exc:  # its message says which cache entry to delete before a rerun
            raise AmoebaError(f"building {entries[0].label} failed: {exc}; measured entries are kept") from exc
        except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
            if not device_out_of_memory(backend, exc):
                raise AmoebaError(
                    f"building {entries[0].label} failed: {exc}; measured entries are kept, rerun to resume"
                ) from exc
            self._fail(entries, round_index, sink, "oom", exc)
            return False
        build_s = time.perf_counter() - t0
        try:
            for entry in entries:
                t1 = time.perf_counter()
                try:
                    piece = self._piece(opened, entry)
                    before = self.monitor.sample()
                    warm_runs, steps = warm_up(piece, self.protocol)
                    jit_before = opened.jit_compiles() if entry.runs_whole else None
                    samples = sample(piece, self.protocol, steps)
                    recompiles = opened.jit_compiles() - jit_before if jit_before is not None else None
                    after = self.monitor.sample()
                    busy = opened.device_busy(piece) if entry.runs_whole and round_index == 0 else None
                except Exception as exc:  # any failure: classified as out of memory or re-raised below
                    if not device_out_of_memory(backend, exc):
                        raise AmoebaError(
                            f"measuring {entry.label} failed: {exc}; measured entries are kept, rerun to resume"
                        ) from exc
                    self._fail([entry], round_index, sink, "oom", exc)
                    continue
                repeat = getattr(opened, "repeat", 1)
                state = entry_state(before, after, (warm_runs + len(samples) * steps) * repeat)
                state.update(
                    {
                        k: v
                        for k, v in (("device_busy", busy), ("compile_s", compile_s), ("recompiles", recompiles))
                        if v is not None
                    }
                )
                sink(
                    entry,
                    {
                        "key": entry.key,
                        "round": round_index,
                        "status": "ok",
                        "repeat": repeat,
                        "steps": steps,
                        "wall_s": time.perf_counter() - t1 + build_s,
                        "samples_ms": [s / repeat for s in samples],
                        "state": state,
                    },
                )
                build_s = 0.0
        finally:
            opened.close()
        return True


class InlineLauncher:
    """Where a local build's units run: in this process, one after the other (``UnitMeasurer``).

    With a ``busy`` policy, the extra round first waits for a quiet CPU: the rows it re-measures
    were noisy or contended, and on a machine still busy they would be again."""

    def __init__(self, measurer: UnitMeasurer, busy: BusyPolicy | None, notice: Notice, load: CpuLoad):
        self.measurer, self.busy, self.notice, self.load = measurer, busy, notice, load

    def launch(self, groups: list[list[Entry]], round_index: int, sink: Sink) -> set[tuple]:
        measurer = self.measurer
        if round_index >= measurer.protocol.rounds and self.busy is not None:
            wait_for_quiet(self.load, measurer.backend.host_cores(), self.busy, self.notice, may_refuse=False)
        failed = set()
        for entries in groups:
            if not measurer.measure_unit(entries, round_index, sink):
                failed.add(entries[0].unit)
        return failed


class _Runner:
    """A local build: the build loop (``scheduler.run_rounds``) with every unit measured here."""

    def __init__(
        self,
        plan: BuildPlan,
        backend: Backend,
        protocol: TimingProtocol,
        artifacts: ArtifactCache,
        progress: Progress | None,
        busy: BusyPolicy | None,
        notice: Notice,
        load: CpuLoad,
    ):
        self.plan, self.backend, self.protocol, self.progress = plan, backend, protocol, progress
        measurer = UnitMeasurer(plan, backend, protocol, artifacts, load)
        self.monitor = measurer.monitor
        self.launcher = InlineLauncher(measurer, busy, notice, load)

    def measure(self, todo: list[Entry], journal: Journal) -> tuple[list[Row], list[str]]:
        """Every (entry, round) of ``todo`` the journal lacks, then ``todo``'s rows from the journal."""
        run_rounds(todo, journal, self.protocol, self.launcher, self.progress)
        return journal_rows(todo, journal, self.protocol, self.plan.method)

    def build(self, path: Path, device: dict[str, Any], method_reason: str, on_corrupt: str) -> BuildResult:
        plan, protocol = self.plan, self.protocol
        started = time.perf_counter()
        record = BackendRecord.of(self.backend)
        start = start_table(path, plan, record, protocol, device, method_reason)

        def journal() -> Journal:
            return open_journal(start.journal_path, plan, record, protocol, device, on_corrupt)

        if start.nothing_new:
            return leave_unchanged(start, journal, started)
        opened = journal()
        start.meta.monitor, start.meta.state_at_start = self.monitor.source, self.monitor.sample()
        rows, failed = self.measure(start.todo, opened)
        start.meta.state_at_end = self.monitor.sample()
        return finish_table(start, rows, failed, opened, started)


def _widens_grid(old_grid: Grid, plan: BuildPlan) -> bool:
    """Whether ``plan``'s grid lists a value the table's grid lacks (values compared as JSON)."""
    if not plan.measure_grid:
        return False
    new = plan.grid()

    def values(grid: Grid, key: str) -> set[str]:
        return {json.dumps(v) for v in getattr(grid, key)}

    return any(values(new, key) - values(old_grid, key) for key in (*GRID_LISTS, "extra_attn"))


def _extend_meta(old_meta: TableMeta, plan: BuildPlan, protocol: TimingProtocol) -> TableMeta:
    """The table's grid and protocol describe its first build; a later build adds rows, widens the
    grid to cover them, and lists itself."""
    new = plan.grid()
    grid = msgspec.structs.replace(old_meta.grid or Grid())
    if plan.measure_grid:
        for key in GRID_LISTS:
            setattr(grid, key, sorted(set(getattr(grid, key)) | set(getattr(new, key))))
        grid.extra_attn = [list(x) for x in sorted({tuple(x) for x in grid.extra_attn + new.extra_attn})]
    later = {"grid": grid_fields(new), "protocol": protocol.to_dict()}
    return msgspec.structs.replace(
        old_meta,
        grid=grid,
        later_builds=[*(old_meta.later_builds or []), later],
        # the config this build read (same sizes: the identity check passed)
        source_config=plan.source_config if plan.source_config is not None else old_meta.source_config,
        content_sha256=None,
    )


def _refit(rows: list[Row], fit_ids: set[str], method: str) -> tuple[list[Row], list[dict[str, Any]]]:
    """Replace the derived rows with a fit over every fit model in the table (the difference fit,
    or the calibration of the component rows); residuals onto model rows."""
    rows = [r for r in rows if not (r.method in ("difference", "calibrated") and r.component in ("base", "layer"))]
    models = [r for r in rows if r.component == "model"]
    if method == "calibrated":
        derived, residuals, summary = calibrate_rows(rows, fit_ids)
    else:
        derived, residuals, summary = fit_rows(models, fit_ids)
    for row in models:
        row.residual_pct = residuals.get(row.key, math.nan)
    return rows + derived, summary


def _aggregate(
    entries: list[Entry], records: list[dict[str, Any]], cv_threshold: float, plan_method: str
) -> tuple[list[Row], list[str]]:
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    rows: list[Row] = []
    failed: list[str] = []
    for entry in entries:
        results = by_key.get(entry.key, [])
        method = _row_method(entry, plan_method)
        failures = [r for r in results if r["status"] != "ok"]
        if failures or not results:
            status = failures[0]["status"] if failures else "error"
            if status != "unsupported":  # a shape the flow cannot run is skipped by design, not a failure
                failed.append(entry.label)
            rows.append(
                measured_row(
                    entry,
                    None,
                    status,
                    method=method,
                    repeat=1,
                    wall_s=0.0,
                    note=failures[0].get("note", "") if failures else "no result",
                )
            )
            continue
        measurement = Measurement.from_samples([s for r in results for s in r["samples_ms"]])
        states = [r.get("state", {}) for r in results]
        state = _summarize_state(states)
        flags = [
            f
            for f, on in (
                ("high_cv", measurement.cv > cv_threshold),
                ("throttled", any(s.get("throttled") for s in states)),
                ("host_bound", state.get("device_busy", 1.0) < HOST_BOUND_BUSY),
                ("recompiled", any(s.get("recompiles", 0) > 0 for s in states)),
                ("contended", state.get("host_contention", 0.0) > CONTENDED_SHARE),
            )
            if on
        ]
        # A decode difference noisier than its step can have a median at or below zero; an ok row
        # like that would make the loader refuse the whole table, so it is kept (samples included) as an error.
        usable = measurement.median_ms > 0
        if not usable:
            failed.append(entry.label)
        rows.append(
            measured_row(
                entry,
                measurement,
                "ok" if usable else "error",
                method=method,
                repeat=results[0]["repeat"],
                wall_s=sum(r["wall_s"] for r in results),
                rounds=len(results),
                flags=";".join(flags),
                state=state,
                note=""
                if usable
                else f"median {measurement.median_ms:.3g} ms is not positive: "
                "the samples are noisier than the step they time",
            )
        )
    return rows, failed


def _summarize_state(states: list[dict[str, Any]]) -> dict[str, float]:
    """Per-row device state over all rounds: median energy per step, hottest, slowest clock, mean
    power, device-busy fraction, engine compile time and the pooled host contention."""

    def values(key: str) -> list[float]:
        return [s[key] for s in states if s.get(key) is not None]

    out: dict[str, float] = {}
    if values("energy_mj_per_step"):
        out["energy_mj"] = float(np.median(values("energy_mj_per_step")))
    if values("temperature_c"):
        out["temperature_c"] = max(values("temperature_c"))
    if values("clock_mhz"):
        out["clock_mhz"] = min(values("clock_mhz"))
    if values("power_w"):
        out["power_w"] = float(np.mean(values("power_w")))
    if values("device_busy"):
        out["device_busy"] = float(np.median(values("device_busy")))
    if values("compile_s"):
        out["compile_s"] = max(values("compile_s"))
    contention = host_contention(states)
    if contention is not None:
        out["host_contention"] = round(contention, 4)
    return out


def add_rows(path: Path, rows: list[Row], note: dict[str, Any], notice: Notice | None = None) -> int:
    """Merge rows measured elsewhere (e.g. validation models) into a finished table, under its lock
    (``notice`` hears whom it waits for).

    Rows whose entry is already in the table are skipped; returns how many were added."""
    with table_lock(path, notice=notice):
        lut = load_table(path)
        existing = frame_rows(lut.frame)
        have = {row.key for row in existing}
        new = [row for row in rows if row.key not in have]
        if new:
            lut.meta.later_builds = [*(lut.meta.later_builds or []), note]
            lut.meta.updated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_table(path, rows_frame(existing + new), lut.meta)
    return len(new)
