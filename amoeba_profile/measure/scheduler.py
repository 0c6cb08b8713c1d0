"""The build loop: interleaved rounds over units, wherever a unit runs.

Entries that share a built module or engine form a unit (``group_units``). A build measures every
unit once per round, for ``protocol.rounds`` rounds - whole models included - so slow drift of
clocks or temperature spreads over all entries instead of biasing the ones measured last. Entries
whose samples over those rounds are noisy (CV above the threshold) or were taken under contention
get one extra round (index ``protocol.rounds``); still noisy or contended, their rows are flagged.
A unit that could not be built (unsupported, out of memory) is skipped in later rounds. Every
result goes to the journal the moment it arrives, so a build killed at any point resumes with
nothing lost or measured twice.

This loop is the same for every build; only where a unit runs differs, and that is a
``Launcher`` (as optimum-benchmark's launchers run one benchmark inline or in another process):
``build.InlineLauncher`` measures in this process, one unit after the other; the fleet's
``RayLauncher`` (``fleet/driver.py``) sends every unit of a round to a node of the device as a Ray
task and hands over each task's results as it finishes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Protocol

from amoeba_profile.core.entry import Entry
from amoeba_profile.core.timing import Measurement, TimingProtocol
from amoeba_profile.device.monitor import host_contention
from amoeba_profile.device.quiet import CONTENDED_SHARE
from amoeba_profile.measure.journal import Journal

Progress = Callable[[int, int, str], None]  # (results done, results planned, what was measured last)
# Where one (entry, round) result goes: the build's journal, or the list a fleet worker returns.
Sink = Callable[[Entry, dict[str, Any]], None]


class Launcher(Protocol):
    """Runs units somewhere: the one thing a local build and a fleet build do differently."""

    def launch(self, groups: list[list[Entry]], round_index: int, sink: Sink) -> set[tuple]:
        """Measure every group (one unit's pending entries) in round ``round_index`` and give each
        (entry, result) to ``sink`` as soon as it exists; every entry gets one result. Returns the
        units (``Entry.unit``) that could not be built, which later rounds skip."""
        ...


def group_units(entries: list[Entry]) -> dict[tuple, list[Entry]]:
    """Entries by the unit (built module or engine) they share, in plan order."""
    units: dict[tuple, list[Entry]] = defaultdict(list)
    for entry in entries:
        units[entry.unit].append(entry)
    return units


def round_groups(
    units: dict[tuple, list[Entry]], done: set[tuple[str, int]], failed: set[tuple], round_index: int
) -> list[list[Entry]]:
    """Per unit, the entries still to measure in round ``round_index``; units that could not be
    built in an earlier round are skipped."""
    groups = [
        [e for e in entries if (e.key, round_index) not in done]
        for unit_key, entries in units.items()
        if unit_key not in failed
    ]
    return [group for group in groups if group]


def noisy_groups(
    units: dict[tuple, list[Entry]], journal: Journal, failed: set[tuple], protocol: TimingProtocol
) -> list[list[Entry]]:
    """Per unit, the entries that get the extra round (index ``protocol.rounds``): CV over the
    normal rounds above the threshold, or measured under contention; those already re-measured are
    left out."""
    extra = protocol.rounds
    by_key: dict[str, list[float]] = defaultdict(list)
    states: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in journal.records:
        if record["status"] == "ok" and record["round"] < extra:
            by_key[record["key"]].extend(record["samples_ms"])
            states[record["key"]].append(record.get("state", {}))

    def disturbed(key: str) -> bool:
        samples = by_key.get(key, [])
        noisy = len(samples) > 1 and Measurement.from_samples(samples).cv > protocol.cv_threshold
        return noisy or (host_contention(states.get(key, [])) or 0.0) > CONTENDED_SHARE

    done = journal.done()
    groups = [
        [e for e in entries if disturbed(e.key) and (e.key, extra) not in done]
        for unit_key, entries in units.items()
        if unit_key not in failed
    ]
    return [group for group in groups if group]


def run_rounds(
    todo: list[Entry], journal: Journal, protocol: TimingProtocol, launcher: Launcher, progress: Progress | None = None
) -> None:
    """Measure every (entry, round) of ``todo`` that ``journal`` lacks, through ``launcher``: the
    regular rounds, then the extra round for disturbed entries (see the module docstring). Each
    result is appended to the journal as it arrives, then ``progress`` hears of it."""
    units = group_units(todo)
    total = len(todo) * protocol.rounds
    todo_keys = {e.key for e in todo}
    done = len({d for d in journal.done() if d[0] in todo_keys})
    failed: set[tuple] = set()
    if progress:
        progress(done, total, "resuming" if done else "starting")

    def journaled(round_index: int) -> Sink:
        which = (
            f"round {round_index + 1}/{protocol.rounds}"
            if round_index < protocol.rounds
            else "extra round for a noisy row"
        )

        def sink(entry: Entry, result: dict[str, Any]) -> None:
            nonlocal done
            journal.append(result)
            done += 1
            if progress:
                progress(min(done, total), total, f"{which}: {entry.label}")

        return sink

    for round_index in range(protocol.rounds):
        groups = round_groups(units, journal.done(), failed, round_index)
        if groups:
            failed |= launcher.launch(groups, round_index, journaled(round_index))
    redo = noisy_groups(units, journal, failed, protocol)
    if redo:
        launcher.launch(redo, protocol.rounds, journaled(protocol.rounds))
