"""How much CPU other processes use: the machine-wide busy time minus our own process tree's.

A timing is only as good as the machine is quiet. ``/proc/stat`` counts, per CPU, the time every
process used (user, nice, system, irq, softirq, and steal: time a hypervisor gave our vCPUs to
another guest); only the CPUs this process may run on count, so a container pinned to 4 cores of a
busy 64-core host does not see the other 60 as contention. ``/proc/<pid>/stat`` counts ours (utime, stime, and the reaped children's cutime, cstime)
for the measuring process and every live descendant, so a backend whose serving loop runs in a
child process is not mistaken for an intruder. The difference over a window is the number of cores
other processes kept busy. Both counters tick at USER_HZ (10 ms), so a window of a few hundred ms
resolves about a tenth of a core; shorter windows are pooled before they are judged. Without
``/proc/stat`` (macOS) the 1-minute load average less our own use is a coarse stand-in.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

# USER_HZ: the unit of /proc/stat and /proc/<pid>/stat times.
_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
# A core counts as taken once other processes use more than this share of one (see ``idle_cores``).
BUSY_CORE_SLACK = 0.25


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _stat_fields(text: str) -> list[str]:
    """Fields of a /proc/<pid>/stat line after the command name, which may hold spaces and ')'."""
    return text.rsplit(")", 1)[1].split() if ")" in text else []


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _busy_ticks(parts: list[str]) -> int:
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in (parts[1:9] + ["0"] * 8)[:8])
    return user + nice + system + irq + softirq + steal


class CpuLoad:
    """Reads CPU time through ``root`` (tests use fixture trees) for ``pids`` and their descendants
    ("ours") and for ``cpus`` (default: this process's affinity). ``clock`` (monotonic seconds) and
    ``sleep`` are how it waits for a window to pass; tests replace them with a simulated clock."""

    def __init__(
        self,
        root: Path = Path("/"),
        pids: Iterable[int] | None = None,
        cpus: Iterable[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.root = root
        self.pids = tuple(pids) if pids is not None else (os.getpid(),)
        self.cpus = set(cpus) if cpus is not None else _affinity()
        self.clock, self.sleep = clock, sleep
        self._parents: dict[int, int] = {}

    def cores(self) -> int:
        """Cores this process may run on, at least 1."""
        return max(1, len(self.cpus))

    def machine_busy_s(self) -> float | None:
        """CPU-seconds all processes used on our CPUs since boot (all CPUs where /proc/stat has no
        per-CPU lines), or None without /proc/stat."""
        total, ours, seen = None, 0, False
        for line in _read(self.root / "proc/stat").splitlines():
            parts = line.split()
            if parts and parts[0] == "cpu":
                total = _busy_ticks(parts)
            elif parts and parts[0].startswith("cpu") and parts[0][3:].isdigit() and int(parts[0][3:]) in self.cpus:
                ours, seen = ours + _busy_ticks(parts), True
        if seen:
            return ours * _TICK_S
        return total * _TICK_S if total is not None else None

    def _stat(self, pid: int) -> list[str]:
        return _stat_fields(_read(self.root / "proc" / str(pid) / "stat"))

    def _tree(self) -> set[int]:
        """``pids`` and their live descendants. Parents are learnt once per new pid, so a reading
        costs a folder listing plus the stat files of new processes and of our own tree."""
        proc = self.root / "proc"
        live = {int(name) for name in os.listdir(proc) if name.isdigit()} if proc.is_dir() else set()
        for gone in set(self._parents) - live:
            del self._parents[gone]
        for pid in live - set(self._parents):
            fields = self._stat(pid)
            if len(fields) > 1:
                self._parents[pid] = int(fields[1])
        tree = {pid for pid in self.pids if pid in self._parents}
        grew = bool(tree)
        while grew:
            children = {pid for pid, parent in self._parents.items() if parent in tree} - tree
            grew = bool(children)
            tree |= children
        return tree

    def own_s(self) -> float:
        """CPU-seconds used by ``pids`` and all their live descendants (plus their reaped children)."""
        used = 0.0
        tree = self._tree()
        for pid in tree:
            fields = self._stat(pid)
            # After the command name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
            if len(fields) >= 15:
                used += sum(int(x) for x in fields[11:15]) * _TICK_S
        if tree:
            return used
        times = os.times()  # no /proc: this process and its reaped children only
        return times.user + times.system + times.children_user + times.children_system

    def loadavg(self) -> float | None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return None

    def read(self) -> dict[str, Any]:
        """One reading: ``t`` (s), ``busy_s`` (machine, since boot) or ``loadavg``, ``own_s``, ``cores``."""
        reading: dict[str, Any] = {"t": self.clock(), "own_s": self.own_s(), "cores": self.cores()}
        busy = self.machine_busy_s()
        if busy is not None:
            reading["busy_s"] = busy
        else:
            reading["loadavg"] = self.loadavg()
        return reading


def others_cpu_s(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """CPU-seconds other processes used between two readings (None when neither source worked)."""
    window = after["t"] - before["t"]
    own = after["own_s"] - before["own_s"]
    if before.get("busy_s") is not None and after.get("busy_s") is not None:
        return max(0.0, after["busy_s"] - before["busy_s"] - own)
    if after.get("loadavg") is not None:  # coarse: runnable threads over the last minute, less ours
        return max(0.0, after["loadavg"] * window - own)
    return None


@dataclass(frozen=True)
class Contention:
    """Other processes' CPU use over a window, against what the measured work needs.

    ``share`` is the fraction of the needed cores others took: 0 while their use fits in the
    cores the work leaves free (``cores - needed``), 1 when they kept every needed core busy.
    """

    others_cores: float  # cores other processes kept busy, on average over the window
    cores: int
    needed: int
    window_s: float

    @property
    def share(self) -> float:
        return contention_share(self.others_cores, self.cores, self.needed)

    def describe(self) -> str:
        return (
            f"other processes kept {self.others_cores:.1f} of {self.cores} cores busy over {self.window_s:.1f} s "
            f"and the measurement needs {self.needed}"
        )


def contention_share(others_cores: float, cores: int, needed: int) -> float:
    """Fraction of ``needed`` cores that ``others_cores`` of load takes on a ``cores``-core machine."""
    needed = max(1, min(needed, cores))
    return min(1.0, max(0.0, others_cores - (cores - needed)) / needed)


def sample_contention(load: CpuLoad, needed: int, window_s: float) -> Contention:
    """Other processes' use over the next ``window_s`` seconds (this process sleeps meanwhile)."""
    before = load.read()
    load.sleep(window_s)
    after = load.read()
    window = max(after["t"] - before["t"], 1e-9)
    others = others_cpu_s(before, after)
    return Contention((others or 0.0) / window, after["cores"], needed, window)


def idle_cores(load: CpuLoad, window_s: float = 0.5) -> tuple[int, Contention]:
    """Whole cores other processes leave free over ``window_s`` (at least 1), and the sample.

    A core counts as taken once others use more than ``BUSY_CORE_SLACK`` of one: a thread of a
    barrier-synchronized parallel kernel (OpenMP) that shares its core stalls every other thread
    at the next barrier, so one contended thread costs more than the share it loses.
    """
    sample = sample_contention(load, 1, window_s)
    taken = max(0, math.ceil(sample.others_cores - BUSY_CORE_SLACK))
    return max(1, sample.cores - taken), sample
