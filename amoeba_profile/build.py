"""Run a LUT build: interleaved rounds, a crash-safe journal, an atomic finish.

Every (entry, round) result goes to the journal (``journal.py``) before the next one starts, so a
build killed at any moment (even ``kill -9``) resumes with nothing lost or measured twice. Entries
are measured in rounds - every entry once per round, whole models included - so slow drift of
clocks or temperature spreads over all entries instead of biasing the ones measured last. Whole
models run through the backend's serving loop from engines compiled once (``artifacts.py``) and
loaded per round. A ``difference`` build then fits base + per-layer costs (``fit.py``). The
finished table replaces the old one atomically; a file lock serializes two builds of one table.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from filelock import FileLock, Timeout

from . import __version__
from .artifacts import ArtifactCache
from .backends import Backend
from .backends.base import EngineSpec
from .device import available_memory_bytes, fingerprint
from .device.monitor import Monitor, entry_context, monitor_for
from .entry import Entry
from .errors import AmoebaError, LutError, UnsupportedShape
from .fit import fit_rows, residual_key
from .inputs import output_dir
from .journal import Journal
from .lut import entry_key_of_row, load_table, measured_row, rows_frame, table_path, write_table
from .measure import Measurement, TimingProtocol, sample, warm_up
from .memory import check_fits
from .plan import BuildPlan

Progress = Callable[[int, int, str], None]
HOST_BOUND_BUSY = 0.5  # accelerator busy less than half of a sample: the host is the bottleneck
_IDENTITY_KEYS = ("device_slug", "backend", "versions", "backend_config", "dtype", "arch", "method")


def _identity(plan: BuildPlan, backend: Backend, protocol: TimingProtocol, device: dict[str, Any]) -> str:
    payload = {
        "arch": plan.arch.to_dict(), "grid": plan.grid(), "whole": sorted(s.id for s in plan.whole),
        "backend": backend.name, "config": backend.config_dict(), "versions": backend.versions(),
        "device": device["slug"], "protocol": protocol.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _row_method(entry: Entry, plan_method: str) -> str:
    return "whole" if entry.component == "model" else plan_method


@dataclass
class BuildResult:
    path: Path
    measured: int
    reused: int
    oom: list[str]
    wall_s: float


def preflight(plan: BuildPlan, backend: Backend, out_dir: Path) -> None:
    """Everything a build refuses before it writes a byte: a method the backend lacks, a largest
    engine or component chain that cannot fit the memory the device has available
    (``memory.check_fits``), an output folder that cannot be one. ``run_build`` calls it; a caller
    that reports progress calls it first, so a refusal is the only thing it prints."""
    if plan.method not in backend.capabilities().methods:
        raise AmoebaError(f"backend {backend.name!r} supports {list(backend.capabilities().methods)}, "
                          f"not the {plan.method!r} method")
    check_fits(plan, backend.dtype, available_memory_bytes(backend.device), backend.device,
               lambda component, h, kv, f: backend.chain_length(plan.arch, component, h, kv, f))
    output_dir(out_dir, "--out")


def run_build(
    plan: BuildPlan,
    backend: Backend,
    out_dir: Path,
    protocol: TimingProtocol = TimingProtocol(),
    progress: Progress | None = None,
    lock_timeout_s: float = -1,
    artifacts: ArtifactCache | None = None,
    method_reason: str = "",
) -> BuildResult:
    """Measure every entry of ``plan`` not already in the table, then write the table atomically."""
    preflight(plan, backend, out_dir)
    device = fingerprint(backend.device)
    path = table_path(out_dir, device["slug"], backend.name, plan.arch.name, backend.dtype)
    output_dir(path.parent, "--out")
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=lock_timeout_s)
    except Timeout:
        raise LutError(f"{path}: another build of this table holds {path}.lock; wait for it to finish") from None
    try:
        runner = _Runner(plan, backend, protocol, artifacts or ArtifactCache(), progress)
        return runner.build(path, device, method_reason)
    finally:
        lock.release()


def _existing(path: Path, meta: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Rows and sidecar of the table already at ``path``, checked to have this build's identity."""
    if not path.exists():
        return [], None
    lut = load_table(path)
    for key in _IDENTITY_KEYS:
        if lut.meta.get(key) != meta[key]:
            raise LutError(
                f"{path}: existing table has {key}={lut.meta.get(key)!r}, this build {meta[key]!r}; "
                "tables with different identities are not merged - choose another --out"
            )
    return lut.frame.to_dict("records"), lut.meta


class _Runner:
    def __init__(self, plan: BuildPlan, backend: Backend, protocol: TimingProtocol, artifacts: ArtifactCache,
                 progress: Progress | None):
        self.plan, self.backend, self.protocol, self.artifacts = plan, backend, protocol, artifacts
        self.progress = progress
        self.monitor: Monitor = monitor_for(backend.device)
        self.failed_units: set[tuple] = set()
        self.counter = 0
        self.total = 0

    def tick(self, label: str) -> None:
        self.counter += 1
        if self.progress:
            self.progress(min(self.counter, self.total), self.total, label)

    def build(self, path: Path, device: dict[str, Any], method_reason: str) -> BuildResult:
        plan, backend, protocol = self.plan, self.backend, self.protocol
        started = time.perf_counter()
        meta = {
            "tool_version": __version__, "device_slug": device["slug"], "device": device, "backend": backend.name,
            "backend_config": backend.config_dict(), "versions": backend.versions(),
            "backend_env": backend.environment(), "dtype": backend.dtype, "arch": plan.arch.to_dict(),
            "method": plan.method, "method_reason": method_reason, "grid": plan.grid(),
            "protocol": protocol.to_dict(), "clock": backend.clock_name, "source": "measured",
        }
        kept, old_meta = _existing(path, meta)
        fit_ids = plan.fit_ids() if plan.method == "difference" and plan.measure_grid else set()
        if old_meta is not None:
            meta = _extend_meta(old_meta, plan, protocol)
            fit_ids |= set(old_meta.get("fit_subnet_ids", []))
        have = {entry_key_of_row(row) for row in kept}
        todo = [e for e in plan.entries() if e.key not in have]
        journal = Journal(path.with_name(path.name + ".journal.jsonl"),
                          {"kind": "header", "identity": _identity(plan, backend, protocol, device)})
        done = journal.done()
        units: dict[tuple, list[Entry]] = defaultdict(list)
        for entry in todo:
            units[entry.unit].append(entry)
        meta["monitor"] = self.monitor.source
        meta["state_at_start"] = self.monitor.sample()
        self.total = len(todo) * protocol.rounds
        todo_keys = {e.key for e in todo}
        self.counter = len({d for d in done if d[0] in todo_keys})
        if self.progress:
            self.progress(self.counter, self.total, "resuming" if self.counter else "starting")
        for round_index in range(protocol.rounds):
            for unit_key, entries in units.items():
                pending = [e for e in entries if (e.key, round_index) not in done]
                if pending and unit_key not in self.failed_units:
                    self._measure_unit(pending, round_index, journal)
        self._remeasure_noisy(units, journal, done)
        rows, oom = _aggregate(todo, journal.records, protocol.cv_threshold, plan.method)
        all_rows = kept + rows
        if fit_ids:
            all_rows, meta["fit"] = _refit(all_rows, fit_ids)
            meta["fit_subnet_ids"] = sorted(fit_ids)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta["state_at_end"] = self.monitor.sample()
        stamps = {"created_at": old_meta.get("created_at", created), "updated_at": created} if old_meta \
            else {"created_at": created}
        write_table(path, rows_frame(all_rows), {**meta, **stamps})
        journal.path.unlink(missing_ok=True)
        return BuildResult(path, len(todo), len(kept), oom, time.perf_counter() - started)

    def _open(self, entry: Entry):
        """(engine or component unit, compile seconds spent now) for the unit ``entry`` belongs to."""
        if not entry.runs_whole:
            return self.backend.build_component(self.plan.arch, entry), 0.0
        layers = tuple((l.heads, l.kv_heads, l.ffn) for l in entry.subnet.layers) if entry.subnet else ()
        spec = EngineSpec(self.plan.arch, layers, *self.plan.engine_limits())
        self.backend.check_spec(spec)
        artifact = self.artifacts.ensure(self.backend, spec)
        return self.backend.load(spec, artifact.path), artifact.compile_s

    def _piece(self, opened, entry: Entry):
        if not entry.runs_whole:
            return opened.workpiece(entry)
        if entry.phase == "prefill":
            return opened.ttft(entry.batch, entry.tokens)
        return opened.tpot(entry.batch, entry.context, self.plan.decode_steps)

    def _fail(self, entries: list[Entry], round_index: int, journal: Journal, status: str, exc: BaseException) -> None:
        for entry in entries:
            journal.append({"key": entry.key, "round": round_index, "status": status, "note": str(exc)[:200]})
            self.tick(entry.key)

    def _measure_unit(self, entries: list[Entry], round_index: int, journal: Journal) -> None:
        backend = self.backend
        unit_key = entries[0].unit
        t0 = time.perf_counter()
        try:
            opened, compile_s = self._open(entries[0])
        except UnsupportedShape as exc:
            self.failed_units.add(unit_key)
            return self._fail(entries, round_index, journal, "unsupported", exc)
        except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
            if not backend.is_out_of_memory(exc):
                raise AmoebaError(f"building {entries[0].key} failed: {exc}; measured entries are kept, rerun to "
                                  "resume") from exc
            self.failed_units.add(unit_key)
            return self._fail(entries, round_index, journal, "oom", exc)
        build_s = time.perf_counter() - t0
        try:
            for entry in entries:
                t1 = time.perf_counter()
                try:
                    piece = self._piece(opened, entry)
                    before = self.monitor.sample()
                    warm_runs, steps = warm_up(piece, self.protocol)
                    samples = sample(piece, self.protocol, steps)
                    after = self.monitor.sample()
                    busy = opened.device_busy(piece) if entry.runs_whole and round_index == 0 else None
                except Exception as exc:  # noqa: BLE001
                    if not backend.is_out_of_memory(exc):
                        raise AmoebaError(f"measuring {entry.key} failed: {exc}; measured entries are kept, rerun to "
                                          "resume") from exc
                    self._fail([entry], round_index, journal, "oom", exc)
                    continue
                repeat = getattr(opened, "repeat", 1)
                context = entry_context(before, after, (warm_runs + len(samples) * steps) * repeat)
                context.update({k: v for k, v in (("device_busy", busy), ("compile_s", compile_s)) if v is not None})
                journal.append({
                    "key": entry.key, "round": round_index, "status": "ok", "repeat": repeat, "steps": steps,
                    "wall_s": time.perf_counter() - t1 + build_s, "samples_ms": [s / repeat for s in samples],
                    "context": context,
                })
                build_s = 0.0
                self.tick(entry.key)
        finally:
            opened.close()

    def _remeasure_noisy(self, units: dict[tuple, list[Entry]], journal: Journal, done: set) -> None:
        """Entries whose CV exceeds the threshold get one extra round; still noisy, they are flagged."""
        extra = self.protocol.rounds
        by_key: dict[str, list[float]] = defaultdict(list)
        for record in journal.records:
            if record["status"] == "ok" and record["round"] < extra:
                by_key[record["key"]].extend(record["samples_ms"])
        for unit_key, entries in units.items():
            noisy = [
                e for e in entries
                if len(by_key.get(e.key, [])) > 1
                and Measurement.from_samples(by_key[e.key]).cv > self.protocol.cv_threshold
                and (e.key, extra) not in done and (e.key, extra) not in journal.done()
            ]
            if noisy and unit_key not in self.failed_units:
                self._measure_unit(noisy, extra, journal)


def _extend_meta(old_meta: dict[str, Any], plan: BuildPlan, protocol: TimingProtocol) -> dict[str, Any]:
    """The table's grid and protocol describe its first build; a later build adds rows, widens the
    grid to cover them, and lists itself."""
    grid = dict(old_meta["grid"])
    if plan.measure_grid:
        for key in ("widths", "prompt_lens", "contexts", "extra_ffn", "depths"):
            grid[key] = sorted(set(grid.get(key, [])) | set(plan.grid()[key]))
        grid["extra_attn"] = sorted({tuple(x) for x in grid.get("extra_attn", []) + plan.grid()["extra_attn"]})
    meta = {**old_meta, "grid": grid,
            "later_builds": [*old_meta.get("later_builds", []), {"grid": plan.grid(), "protocol": protocol.to_dict()}]}
    meta.pop("content_sha256", None)
    return meta


def _refit(rows: list[dict[str, Any]], fit_ids: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Replace the derived rows with a fit over every fit model in the table; residuals onto model rows."""
    rows = [r for r in rows if not (r["method"] == "difference" and r["component"] in ("base", "layer"))]
    models = [r for r in rows if r["component"] == "model"]
    derived, residuals, summary = fit_rows(models, fit_ids)
    for row in models:
        row["residual_pct"] = residuals.get(residual_key(row), math.nan)
    return rows + derived, summary


def _aggregate(entries: list[Entry], records: list[dict[str, Any]], cv_threshold: float,
               plan_method: str) -> tuple[list[dict[str, Any]], list[str]]:
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    rows, failed = [], []
    for entry in entries:
        results = by_key.get(entry.key, [])
        method = _row_method(entry, plan_method)
        failures = [r for r in results if r["status"] != "ok"]
        if failures or not results:
            failed.append(entry.key)
            status = failures[0]["status"] if failures else "oom"
            rows.append(measured_row(entry, None, status, method=method, repeat=1, wall_s=0.0,
                                     note=failures[0].get("note", "") if failures else "no result"))
            continue
        measurement = Measurement.from_samples([s for r in results for s in r["samples_ms"]])
        contexts = [r.get("context", {}) for r in results]
        state = _summarize_context(contexts)
        flags = [f for f, on in (("high_cv", measurement.cv > cv_threshold),
                                 ("throttled", any(c.get("throttled") for c in contexts)),
                                 ("host_bound", state.get("device_busy", 1.0) < HOST_BOUND_BUSY)) if on]
        rows.append(measured_row(entry, measurement, "ok", method=method, repeat=results[0]["repeat"],
                                 wall_s=sum(r["wall_s"] for r in results), rounds=len(results), flags=";".join(flags),
                                 context=state))
    return rows, failed


def _summarize_context(contexts: list[dict[str, Any]]) -> dict[str, float]:
    """Per-row device state over all rounds: median energy per step, hottest, slowest clock, mean
    power, device-busy fraction and engine compile time."""
    def values(key: str) -> list[float]:
        return [c[key] for c in contexts if c.get(key) is not None]

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
    return out


def add_rows(path: Path, rows: list[dict[str, Any]], note: dict[str, Any]) -> int:
    """Merge rows measured elsewhere (e.g. validation models) into a finished table, under its lock.

    Rows whose entry is already in the table are skipped; returns how many were added."""
    with FileLock(str(path) + ".lock"):
        lut = load_table(path)
        have = {entry_key_of_row(row) for row in lut.frame.to_dict("records")}
        new = [row for row in rows if entry_key_of_row(row) not in have]
        if new:
            meta = {k: v for k, v in lut.meta.items() if k != "content_sha256"}
            meta["later_builds"] = [*meta.get("later_builds", []), note]
            meta["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_table(path, rows_frame(lut.frame.to_dict("records") + new), meta)
    return len(new)
