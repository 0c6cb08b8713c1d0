"""Measure on a quiet machine, or say loudly that it was not.

A build on a CPU that another process loads times the other process as much as the model: seen on
the 2-core host, a small build took 30x longer with rows 10-60x off, bimodal, CV up to 1.5. Two
guards, both before any timing starts:
- our own measurements take turns: a machine-wide lock per device (``device/lock.py``);
- everyone else's load is sampled (``device/load.py``). ``BusyPolicy.mode`` says what to do when
  other processes take more than ``threshold`` of the cores the backend needs: ``wait`` for a
  quiet window (bounded by ``max_wait_s``, saying what it waits for) and then measure with a
  warning; ``warn`` and measure at once; ``refuse`` after the same bounded wait.
During the build every entry records the load around it (``Monitor``) and rows measured under
contention are flagged ``contended``; their re-measure round waits for quiet first.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from amoeba_profile.core.errors import MachineBusy, UsageError
from amoeba_profile.core.files import Notice
from amoeba_profile.device.load import Contention, CpuLoad, sample_contention
from amoeba_profile.device.lock import MeasurementLock

BUSY_MODES = ("wait", "warn", "refuse")
# A row is flagged ``contended`` when other processes took more than this share of the cores it
# needed; a quarter of one core already stalls a barrier-synchronized kernel (see ``load.idle_cores``).
CONTENDED_SHARE = 0.25


@dataclass(frozen=True)
class BusyPolicy:
    """What a measurement does about other processes' CPU load (see the module docstring).

    ``threshold`` is the share of the needed cores others may take (0.25: a quarter of one core
    for a 1-thread build); ``window_s`` is one load sample, long enough to resolve about a tenth of
    a core at the kernel's 10 ms accounting tick.
    """

    mode: str = "wait"
    max_wait_s: float = 120.0
    threshold: float = CONTENDED_SHARE
    window_s: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in BUSY_MODES:
            raise UsageError(f"--busy takes one of {', '.join(BUSY_MODES)}, got {self.mode!r}")
        if self.max_wait_s < 0 or not 0 <= self.threshold <= 1 or self.window_s <= 0:
            raise UsageError("the busy policy needs max_wait_s >= 0, 0 <= threshold <= 1 and window_s > 0")


def wait_for_quiet(
    load: CpuLoad, needed: int, policy: BusyPolicy, notice: Notice, *, may_refuse: bool = True
) -> Contention:
    """Sample the load; while others take too much, keep sampling (that is the wait) up to
    ``max_wait_s`` unless the mode is ``warn``. Still busy: ``refuse`` raises ``MachineBusy``
    (when ``may_refuse``), otherwise one warning line and the caller measures anyway."""
    contention = sample_contention(load, needed, policy.window_s)
    if contention.share <= policy.threshold:
        return contention
    if policy.mode != "warn" and policy.max_wait_s > 0:
        notice(
            f"waiting up to {policy.max_wait_s:g} s for a quiet CPU: {contention.describe()} "
            "(--busy warn measures at once)"
        )
        deadline = load.clock() + policy.max_wait_s
        while contention.share > policy.threshold and load.clock() < deadline:
            contention = sample_contention(load, needed, policy.window_s)
        if contention.share <= policy.threshold:
            notice(f"CPU quiet now ({contention.others_cores:.1f} cores busy elsewhere); measuring")
            return contention
    if policy.mode == "refuse" and may_refuse:
        raise MachineBusy(
            f"the machine stayed busy: {contention.describe()}; rerun when it is idle, "
            "or with --busy warn to measure anyway"
        )
    notice(
        f"warning: measuring on a busy machine: {contention.describe()}; rows measured under contention "
        "are flagged 'contended' - rebuild on an idle machine for trustworthy numbers"
    )
    return contention


@contextmanager
def quiet_machine(
    device: str,
    slug: str,
    needed: int,
    target: str,
    policy: BusyPolicy | None,
    notice: Notice,
    lock_timeout_s: float = -1,
    load: CpuLoad | None = None,
) -> Iterator[None]:
    """Hold the device's measurement lock for the block; with a policy, check the load first.

    The lock is taken before the load check, so a build waiting for another of ours does not
    count that build as foreign load."""
    lock = MeasurementLock(device, slug)
    lock.acquire(target, notice, lock_timeout_s)
    try:
        if policy is not None:
            wait_for_quiet(load if load is not None else CpuLoad(), needed, policy, notice)
        yield
    finally:
        lock.release()
