"""Plan and run a LUT build: interleaved rounds, a crash-safe journal, an atomic finish.

Every (entry, round) result is appended to ``<table>.journal.jsonl`` and fsynced before the
next one starts, so a build killed at any moment (even ``kill -9``) resumes with nothing lost or
measured twice. Entries are measured in rounds - every entry once per round, whole models
included - so slow drift of clocks or temperature spreads over all entries instead of biasing
the ones measured last. The finished table replaces the old one atomically; a file lock
serializes two builds of the same table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from . import __version__
from .arch import ModelArch
from .backends import Backend
from .device import fingerprint
from .device.monitor import Monitor, entry_context, monitor_for
from .entry import Entry
from .errors import AmoebaError, LutError
from .lut import entry_key_of_row, load_table, measured_row, rows_frame, table_path, write_table
from .measure import Clock, Measurement, TimingProtocol, sample, warm_up
from .subnet import AMOEBA_WIDTHS, DEFAULT_DROP_RULE, Subnet, width_shape

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class BuildPlan:
    """What a build measures: component grids for the predictor, whole subnets for validation."""

    arch: ModelArch
    widths: tuple[float, ...] = AMOEBA_WIDTHS
    prompt_lens: tuple[int, ...] = (128,)
    contexts: tuple[int, ...] = (128, 256, 512)
    batch: int = 1
    drop_rule: str = DEFAULT_DROP_RULE
    ffn_multiple: int = 1
    whole: tuple[Subnet, ...] = field(default=())
    components: bool = True  # False: only the whole subnets (validation runs)
    extra_attn: tuple[tuple[int, int], ...] = ()  # per-layer widths a strategy file adds to the grid
    extra_ffn: tuple[int, ...] = ()

    def attn_shapes(self) -> list[tuple[int, int]]:
        return sorted({width_shape(self.arch, w, self.ffn_multiple)[:2] for w in self.widths} | set(self.extra_attn))

    def ffn_sizes(self) -> list[int]:
        return sorted({width_shape(self.arch, w, self.ffn_multiple)[2] for w in self.widths} | set(self.extra_ffn))

    def entries(self) -> list[Entry]:
        b = self.batch
        out: list[Entry] = []
        for subnet in self.whole:
            out += [Entry("model", "prefill", b, p, 0, subnet=subnet) for p in self.prompt_lens]
            out += [Entry("model", "decode", b, 1, c, subnet=subnet) for c in self.contexts]
        if not self.components:
            return out
        out += [Entry("base", "prefill", b, p, 0) for p in self.prompt_lens]
        out += [Entry("base", "decode", b, 1, c) for c in self.contexts]
        for heads, kv in self.attn_shapes():
            out += [Entry("attn", "prefill", b, p, 0, heads, kv) for p in self.prompt_lens]
            out += [Entry("attn", "decode", b, 1, c, heads, kv) for c in self.contexts]
        for ffn in self.ffn_sizes():
            out += [Entry("mlp", "prefill", b, p, 0, ffn=ffn) for p in self.prompt_lens]
            out.append(Entry("mlp", "decode", b, 1, 0, ffn=ffn))
        return out

    def grid(self) -> dict[str, Any]:
        return {
            "widths": list(self.widths), "prompt_lens": list(self.prompt_lens), "contexts": list(self.contexts),
            "batch": self.batch, "drop_rule": self.drop_rule, "ffn_multiple": self.ffn_multiple,
            "components": self.components, "extra_attn": [list(x) for x in self.extra_attn],
            "extra_ffn": list(self.extra_ffn),
        }


class _Journal:
    """Append-only JSON lines; a torn last line (killed mid-write) is ignored on reading."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            lines = path.read_text().splitlines()
            parsed = []
            for line in lines:
                try:
                    parsed.append(json.loads(line))
                except json.JSONDecodeError:
                    break
            if parsed and parsed[0].get("kind") == "header":
                if parsed[0]["identity"] != header["identity"]:
                    raise LutError(
                        f"{path}: left by an unfinished build with other options or on another device; rerun that "
                        "build to finish it, or delete this journal to start over"
                    )
                self.records = [r for r in parsed[1:] if r.get("kind") == "result"]
                # Rewrite without any torn tail so later appends start on a clean line.
                self._rewrite([parsed[0], *self.records])
                return
        self._rewrite([header])

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        record = {"kind": "result", **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)

    def done(self) -> set[tuple[str, int]]:
        return {(r["key"], r["round"]) for r in self.records}


def _identity(plan: BuildPlan, backend: Backend, protocol: TimingProtocol, device: dict[str, Any]) -> str:
    payload = {
        "arch": plan.arch.to_dict(), "grid": plan.grid(), "whole": sorted(s.id for s in plan.whole),
        "backend": backend.name, "dtype": backend.dtype, "device": device["slug"], "protocol": protocol.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _method(entry: Entry, repeat: int) -> str:
    if entry.component == "model":
        return "whole"
    return "stacked" if repeat > 1 else "isolated"


@dataclass
class BuildResult:
    path: Path
    measured: int
    reused: int
    oom: list[str]
    wall_s: float


def run_build(
    plan: BuildPlan,
    backend: Backend,
    out_dir: Path,
    protocol: TimingProtocol = TimingProtocol(),
    progress: Progress | None = None,
    lock_timeout_s: float = -1,
) -> BuildResult:
    """Measure every entry of ``plan`` not already in the table, then write the table atomically."""
    device = fingerprint(backend.device)
    path = table_path(out_dir, device["slug"], backend.name, plan.arch.name, backend.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=lock_timeout_s)
    except Timeout:
        raise LutError(f"{path}: another build of this table holds {path}.lock; wait for it to finish") from None
    try:
        return _build_locked(plan, backend, path, device, protocol, progress)
    finally:
        lock.release()


def _existing(path: Path, identity_meta: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Rows and sidecar of the table already at ``path`` (checked to be the same device/backend/dtype/arch)."""
    if not path.exists():
        return [], None
    lut = load_table(path)
    for key in ("device_slug", "backend", "dtype", "arch"):
        if lut.meta.get(key) != identity_meta[key]:
            raise LutError(
                f"{path}: existing table has {key}={lut.meta.get(key)!r}, this build {identity_meta[key]!r}; "
                "tables with different fingerprints are not merged - choose another --out"
            )
    return lut.frame.to_dict("records"), lut.meta


def _build_locked(plan, backend, path, device, protocol, progress) -> BuildResult:
    started = time.perf_counter()
    meta = {
        "tool_version": __version__, "device_slug": device["slug"], "device": device, "backend": backend.name,
        "backend_env": backend.environment(), "dtype": backend.dtype, "arch": plan.arch.to_dict(),
        "grid": plan.grid(), "protocol": protocol.to_dict(), "clock": Clock(backend.device).name, "source": "measured",
    }
    kept, old_meta = _existing(path, meta)
    if old_meta is not None:
        # The table's grid and protocol describe its component rows; a later build (more contexts,
        # validation models) adds rows but keeps that description, and lists itself.
        grid = dict(old_meta["grid"])
        if plan.components:  # component rows were added: the grid grows to cover them
            for key in ("widths", "prompt_lens", "contexts", "extra_ffn"):
                grid[key] = sorted(set(grid.get(key, [])) | set(plan.grid()[key]))
            grid["extra_attn"] = sorted({tuple(x) for x in grid.get("extra_attn", []) + plan.grid()["extra_attn"]})
        meta = {**old_meta, "grid": grid,
                "later_builds": [*old_meta.get("later_builds", []), {"grid": plan.grid(), "protocol": protocol.to_dict()}]}
        meta.pop("content_sha256", None)
    have = {entry_key_of_row(row) for row in kept}
    todo = [e for e in plan.entries() if e.key not in have]
    journal = _Journal(path.with_name(path.name + ".journal.jsonl"),
                       {"kind": "header", "identity": _identity(plan, backend, protocol, device)})
    done = journal.done()
    units: dict[tuple, list[Entry]] = defaultdict(list)
    for entry in todo:
        units[entry.unit].append(entry)
    clock = Clock(backend.device)
    monitor = monitor_for(backend.device)
    meta["monitor"] = monitor.source
    meta["state_at_start"] = monitor.sample()
    total = len(todo) * protocol.rounds
    counter = [len({d for d in done if d[0] in {e.key for e in todo}})]

    def tick(label: str) -> None:
        counter[0] += 1
        if progress:
            progress(min(counter[0], total), total, label)

    if progress:
        progress(counter[0], total, "resuming" if counter[0] else "starting")
    failed_units: set[tuple] = set()
    for round_index in range(protocol.rounds):
        for unit_key, entries in units.items():
            pending = [e for e in entries if (e.key, round_index) not in done]
            if pending and unit_key not in failed_units:
                _measure_unit(plan.arch, backend, pending, round_index, clock, monitor, protocol, journal,
                              failed_units, tick)
    _remeasure_noisy(plan.arch, backend, units, clock, monitor, protocol, journal, failed_units, done, tick)
    rows, oom = _aggregate(todo, journal.records, protocol.cv_threshold)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["state_at_end"] = monitor.sample()
    stamps = {"created_at": old_meta.get("created_at", created), "updated_at": created} if old_meta else {"created_at": created}
    write_table(path, rows_frame(kept + rows), {**meta, **stamps})
    journal.path.unlink(missing_ok=True)
    return BuildResult(path, len(todo), len(kept), oom, time.perf_counter() - started)


def _measure_unit(arch, backend, entries, round_index, clock, monitor: Monitor, protocol, journal, failed_units,
                  tick) -> None:
    unit_key = entries[0].unit
    t0 = time.perf_counter()
    try:
        unit = backend.build(arch, entries[0])
    except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
        if not backend.is_out_of_memory(exc):
            raise AmoebaError(f"building {entries[0].key} failed: {exc}; measured entries are kept, rerun to resume") from exc
        failed_units.add(unit_key)
        for entry in entries:
            journal.append({"key": entry.key, "round": round_index, "status": "oom", "note": str(exc)[:200]})
            tick(entry.key)
        return
    build_s = time.perf_counter() - t0
    try:
        for entry in entries:
            t1 = time.perf_counter()
            try:
                piece = unit.workpiece(entry)
                before = monitor.sample()
                warm_runs = warm_up(piece, clock, protocol)
                samples = sample(piece, clock, protocol)
                after = monitor.sample()
            except Exception as exc:  # noqa: BLE001
                if not backend.is_out_of_memory(exc):
                    raise AmoebaError(f"measuring {entry.key} failed: {exc}; measured entries are kept, rerun to resume") from exc
                journal.append({"key": entry.key, "round": round_index, "status": "oom", "note": str(exc)[:200]})
                tick(entry.key)
                continue
            wall = time.perf_counter() - t1 + build_s
            build_s = 0.0
            journal.append({
                "key": entry.key, "round": round_index, "status": "ok", "repeat": unit.repeat, "wall_s": wall,
                "samples_ms": [s / unit.repeat for s in samples],
                "context": entry_context(before, after, (warm_runs + len(samples)) * unit.repeat),
            })
            tick(entry.key)
    finally:
        unit.close()


def _remeasure_noisy(arch, backend, units, clock, monitor, protocol, journal, failed_units, done, tick) -> None:
    """Entries whose CV exceeds the threshold get one extra round (the protocol's re-measure)."""
    extra = protocol.rounds
    by_key: dict[str, list[float]] = defaultdict(list)
    for record in journal.records:
        if record["status"] == "ok" and record["round"] < extra:
            by_key[record["key"]].extend(record["samples_ms"])
    for unit_key, entries in units.items():
        noisy = [
            e for e in entries
            if len(by_key.get(e.key, [])) > 1 and Measurement.from_samples(by_key[e.key]).cv > protocol.cv_threshold
            and (e.key, extra) not in done and (e.key, extra) not in journal.done()
        ]
        if noisy and unit_key not in failed_units:
            _measure_unit(arch, backend, noisy, extra, clock, monitor, protocol, journal, failed_units, tick)


def _aggregate(entries: list[Entry], records: list[dict[str, Any]], cv_threshold: float) -> tuple[list[dict[str, Any]], list[str]]:
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    rows, oom = [], []
    for entry in entries:
        results = by_key.get(entry.key, [])
        failures = [r for r in results if r["status"] != "ok"]
        if failures or not results:
            oom.append(entry.key)
            rows.append(measured_row(entry, None, "oom", method=_method(entry, 1), repeat=1, wall_s=0.0,
                                     note=failures[0].get("note", "") if failures else "no result"))
            continue
        samples = [s for r in results for s in r["samples_ms"]]
        measurement = Measurement.from_samples(samples)
        repeat = results[0]["repeat"]
        contexts = [r.get("context", {}) for r in results]
        flags = [f for f, on in (("high_cv", measurement.cv > cv_threshold),
                                 ("throttled", any(c.get("throttled") for c in contexts))) if on]
        rows.append(measured_row(entry, measurement, "ok", method=_method(entry, repeat), repeat=repeat,
                                 wall_s=sum(r["wall_s"] for r in results), rounds=len(results), flags=";".join(flags),
                                 context=_summarize_context(contexts)))
    return rows, oom


def _summarize_context(contexts: list[dict[str, Any]]) -> dict[str, float]:
    """Per-row device state over all rounds: median energy per step, hottest, slowest clock, mean power."""
    def values(key: str) -> list[float]:
        return [c[key] for c in contexts if c.get(key) is not None]

    out: dict[str, float] = {}
    if values("energy_mj_per_step"):
        out["energy_mj"] = float(sorted(values("energy_mj_per_step"))[len(values("energy_mj_per_step")) // 2])
    if values("temperature_c"):
        out["temperature_c"] = max(values("temperature_c"))
    if values("clock_mhz"):
        out["clock_mhz"] = min(values("clock_mhz"))
    if values("power_w"):
        out["power_w"] = sum(values("power_w")) / len(values("power_w"))
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
