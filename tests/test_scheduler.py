"""The one build loop (``measure/scheduler.py``) with a scripted launcher: what each round hands
the launcher, what is journaled and what progress hears. The launchers themselves run in real
builds: the local one in test_build.py, the Ray one in test_fleet.py."""

from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.measure.journal import Journal
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.measure.scheduler import group_units, run_rounds

PROTOCOL = TimingProtocol(rounds=2, cv_threshold=0.1)


class ScriptedLauncher:
    """Answers each entry at once with fixed samples, spread (CV 0.5) for ``noisy`` keys in the
    regular rounds; the units in ``broken`` cannot be built. ``calls`` lists what each launch got."""

    def __init__(self, noisy: set[str] = frozenset(), broken: set[tuple] = frozenset()):
        self.noisy, self.broken = noisy, broken
        self.calls: list[tuple[int, list[list[str]]]] = []

    def launch(self, groups, round_index, sink):
        self.calls.append((round_index, [[e.key for e in entries] for entries in groups]))
        failed = set()
        for entries in groups:
            if entries[0].unit in self.broken:
                for entry in entries:
                    sink(entry, {"key": entry.key, "round": round_index, "status": "oom", "note": "scripted"})
                failed.add(entries[0].unit)
                continue
            for entry in entries:
                spread = entry.key in self.noisy and round_index < PROTOCOL.rounds
                sink(
                    entry,
                    {
                        "key": entry.key,
                        "round": round_index,
                        "status": "ok",
                        "repeat": 1,
                        "steps": 1,
                        "wall_s": 0.0,
                        "samples_ms": [1.0, 3.0] if spread else [2.0, 2.0],
                        "state": {},
                    },
                )
        return failed


def test_rounds_interleave_units_skip_unbuilt_ones_remeasure_noisy_entries_and_resume(tmp_path, tiny_arch):
    todo = BuildPlan(tiny_arch, (1.0, 0.5), (16,), (16,)).entries()
    units = group_units(todo)
    broken, steady = list(units)[0], list(units)[1]
    noisy = units[steady][0]
    journal_path = tmp_path / "build.journal.jsonl"

    def journal() -> Journal:
        return Journal(
            journal_path, {"kind": "header", "identity": "test"}, keys=(e.key for e in todo), max_round=PROTOCOL.rounds
        )

    launcher, heard = ScriptedLauncher({noisy.key}, {broken}), []
    opened = journal()
    run_rounds(todo, opened, PROTOCOL, launcher, lambda done, total, label: heard.append((done, total, label)))
    every_unit = [[e.key for e in entries] for entries in units.values()]
    assert launcher.calls == [(0, every_unit), (1, every_unit[1:]), (2, [[noisy.key]])]
    assert len(opened.records) == len(todo) + len(todo) - len(units[broken]) + 1
    total = 2 * len(todo)
    assert heard[0] == (0, total, "starting") and heard[1] == (1, total, f"round 1/2: {units[broken][0].label}")
    assert heard[-1] == (total - len(units[broken]) + 1, total, f"extra round for a noisy row: {noisy.label}")
    # Killed after round 0: a rerun hands over only what the journal lacks, round by round.
    journal_path.write_text("\n".join(journal_path.read_text().splitlines()[: 1 + len(todo)]) + "\n")
    again, heard = ScriptedLauncher({noisy.key}), []
    run_rounds(todo, journal(), PROTOCOL, again, lambda done, total, label: heard.append((done, total, label)))
    assert again.calls == [(1, every_unit), (2, [[noisy.key]])]
    assert heard[0] == (len(todo), total, "resuming")
