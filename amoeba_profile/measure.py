"""Timing protocol and statistics, shared by every backend.

The tracker wraps a backend's work: a backend hands over a ``Workpiece`` (one timed step plus
an untimed reset), and this module warms it up, synchronizes the device around every timed
region and keeps every sample. On CPU the clock is ``time.perf_counter``; on CUDA it is a pair
of CUDA events recorded on the current stream, with a full synchronize before and after.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import numpy as np


class Workpiece(Protocol):
    def step(self) -> None:
        """The timed region: one prefill or decode forward."""

    def reset(self) -> None:
        """Untimed: restore state (e.g. crop the KV cache) so every step sees the same inputs."""


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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


@dataclass
class Clock:
    """Times one call of ``fn`` in milliseconds with the right clock for the device."""

    device: str = "cpu"
    _sync: Callable[[], None] = field(default=lambda: None, repr=False)

    def __post_init__(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            self._sync = torch.cuda.synchronize

    @property
    def name(self) -> str:
        return "cuda-events" if self.device.startswith("cuda") else "perf_counter"

    def time_ms(self, fn: Callable[[], None]) -> float:
        if self.device.startswith("cuda"):
            import torch

            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            self._sync()
            start.record()
            fn()
            end.record()
            self._sync()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def warm_up(piece: Workpiece, clock: Clock, protocol: TimingProtocol) -> int:
    """Run until three consecutive steps agree within the tolerance (or warmup_max); returns runs."""
    times: list[float] = []
    for run in range(1, protocol.warmup_max + 1):
        times.append(clock.time_ms(piece.step))
        piece.reset()
        if run >= protocol.warmup_min and len(times) >= 3:
            last = times[-3:]
            if (max(last) - min(last)) <= protocol.warmup_tolerance * min(last):
                return run
    return protocol.warmup_max


def sample(piece: Workpiece, clock: Clock, protocol: TimingProtocol) -> list[float]:
    """One round: at least samples_per_round steps and at least min_round_s of timed work."""
    samples: list[float] = []
    while len(samples) < protocol.samples_per_round or sum(samples) < protocol.min_round_s * 1e3:
        samples.append(clock.time_ms(piece.step))
        piece.reset()
    return samples
