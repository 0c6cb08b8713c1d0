"""Timing protocol and statistics, shared by every backend.

A backend owns its clock (``device.clock.Clock`` for PyTorch: ``time.perf_counter`` on CPU, CUDA
events on the backend's own stream on a GPU; a library's own timers for compiled flows) and hands over
``Workpiece`` objects that return one sample's time. This module decides how long and how often to
measure: warm-up until steps agree, enough back-to-back steps per sample that a short step is not
lost in timer and launch jitter, and every sample kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np


class Workpiece(Protocol):
    """One measurable step (a prefill, a decode step, a serving-loop request).

    ``max_steps`` is how many steps may run back to back inside one timed sample (1 when every
    step needs its state restored first, e.g. a prefill into an empty cache).
    """

    max_steps: int

    def sample_ms(self, steps: int) -> float:
        """Run ``steps`` steps back to back; return milliseconds per step by the backend's clock.
        Restoring state afterwards (cropping a KV cache) is untimed."""


_BOUNDS = ("min_samples", "max_round_s", "max_samples_per_round", "warmup_max_s", "max_remeasures")


@dataclass(frozen=True)
class TimingProtocol:
    """How long and how often to measure; stored in every table's sidecar."""

    warmup_min: int = 3
    warmup_max: int = 30
    warmup_tolerance: float = 0.05
    rounds: int = 3
    samples_per_round: int = 7
    min_round_s: float = 0.05
    cv_threshold: float = 0.10
    min_sample_ms: float = 2.0  # a sample runs back-to-back steps until it lasts this long (GPU decode steps)
    max_steps_per_sample: int = 256
    # Bounds, so that long requests (a whole model on a CPU takes seconds) cost what they must and a
    # round always ends, whatever its samples say (a sample may be <= 0, a difference of two
    # requests, or absurd, the process was paused in it): once ``max_round_s`` of wall time is spent
    # a round stops at ``min_samples``; it never takes more than ``max_samples_per_round``; warm-up
    # stops after ``warmup_max_s`` (at least two runs: the first request after a load is not a
    # steady one); a sample the process was paused in is measured again, ``max_remeasures`` times
    # at most per round.
    min_samples: int = 3
    max_round_s: float = 4.0
    max_samples_per_round: int = 100
    warmup_max_s: float = 3.0
    max_remeasures: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity_dict(self) -> dict[str, Any]:
        """What a journal's identity hashes: every field, except bounds left at their defaults, so a
        journal written before the bounds existed still resumes."""
        defaults = TimingProtocol()
        return {k: v for k, v in asdict(self).items() if k not in _BOUNDS or v != getattr(defaults, k)}

    @classmethod
    def quick(cls) -> "TimingProtocol":
        return cls(warmup_min=2, warmup_max=10, rounds=2, samples_per_round=4, min_round_s=0.0)


@dataclass(frozen=True)
class Measurement:
    """Summary of one entry's timing samples, in milliseconds; raw samples kept."""

    samples_ms: tuple[float, ...]
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    cv: float
    n: int

    @classmethod
    def from_samples(cls, samples_ms: list[float] | tuple[float, ...]) -> "Measurement":
        arr = np.asarray(samples_ms, dtype=float)
        if arr.size == 0:
            raise ValueError("no samples")
        mean = float(arr.mean())
        std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
        return cls(
            samples_ms=tuple(float(x) for x in arr),
            median_ms=float(np.median(arr)),
            p10_ms=float(np.percentile(arr, 10)),
            p90_ms=float(np.percentile(arr, 90)),
            mean_ms=mean,
            std_ms=std,
            cv=std / mean if mean > 0 else math.inf,
            n=int(arr.size),
        )


def warm_up(piece: Workpiece, protocol: TimingProtocol) -> tuple[int, int]:
    """Run until three consecutive steps agree within the tolerance (or warmup_max).

    Returns (warm-up runs, steps per sample): enough back-to-back steps that one sample lasts at
    least ``min_sample_ms``, within what the piece allows."""
    times: list[float] = []
    start = time.perf_counter()
    for run in range(1, protocol.warmup_max + 1):
        times.append(piece.sample_ms(1))
        if run >= protocol.warmup_min and len(times) >= 3:
            last = times[-3:]
            if (max(last) - min(last)) <= protocol.warmup_tolerance * min(last):
                break
        if run >= 2 and time.perf_counter() - start >= protocol.warmup_max_s:
            break
    step_ms = float(np.median(times[-3:]))
    wanted = math.ceil(protocol.min_sample_ms / step_ms) if step_ms > 0 else protocol.max_steps_per_sample
    return len(times), max(1, min(piece.max_steps, protocol.max_steps_per_sample, wanted))


# A sample was paused in (SIGSTOP, a laptop lid, a preempted VM) when its call took this much longer
# than the round's typical sample, in wall time, and its value stands out from the others by as much
# (robust spread: median absolute deviation). Both are needed: a flow that times outside the call
# (llama-bench runs all its repetitions in the first call) has long calls with ordinary values.
PAUSE_FACTOR = 5.0  # times the median wall time of a sample
PAUSE_MIN_S = 0.05  # and at least this much longer than it
OUTLIER_MADS = 10.0  # the value further than this many (scaled) MADs from the median


def paused_sample(samples: list[float], walls_s: list[float]) -> int | None:
    """The index of the sample most likely paused in (see ``PAUSE_FACTOR``), or None."""
    if len(samples) < 3:
        return None
    values, walls = np.asarray(samples, dtype=float), np.asarray(walls_s, dtype=float)
    deviation = np.abs(values - np.median(values))
    spread = 1.4826 * float(np.median(deviation))  # the standard deviation, for normal noise
    typical_wall = float(np.median(walls))
    long_call = walls - typical_wall > max(PAUSE_FACTOR * typical_wall, PAUSE_MIN_S)
    suspects = np.flatnonzero(long_call & (deviation > OUTLIER_MADS * spread))
    return int(suspects[np.argmax(walls[suspects])]) if suspects.size else None


def sample(piece: Workpiece, protocol: TimingProtocol, steps: int = 1) -> list[float]:
    """One round: ``samples_per_round`` samples over at least ``min_round_s`` of wall time, or, once
    ``max_round_s`` is spent, ``min_samples``; never more than ``max_samples_per_round``. Then a
    sample the process was paused in (``paused_sample``) is measured again, at most
    ``max_remeasures`` times.

    Bounded by count and wall time, never by the samples' sum: a decode sample is a difference of
    two requests and may be <= 0, so a loop on the sum need not end."""
    samples: list[float] = []
    walls: list[float] = []

    def take() -> tuple[float, float]:
        t0 = time.perf_counter()
        value = piece.sample_ms(steps)
        return value, time.perf_counter() - t0

    start = time.perf_counter()
    while len(samples) < protocol.max_samples_per_round:
        elapsed = time.perf_counter() - start
        if len(samples) >= protocol.samples_per_round and elapsed >= protocol.min_round_s:
            break
        if len(samples) >= protocol.min_samples and elapsed >= protocol.max_round_s:
            break
        value, wall = take()
        samples.append(value)
        walls.append(wall)
    for _ in range(protocol.max_remeasures):
        index = paused_sample(samples, walls)
        if index is None:
            break
        samples[index], walls[index] = take()
    return samples
