"""Clocks a flow may time its work with: ``perf_counter`` on the CPU, CUDA events on a GPU stream.

Torch is imported only when a CUDA clock runs, so the CPU path needs none."""

from __future__ import annotations

import time
from typing import Any, Callable


class Clock:
    """Times a callable in milliseconds: ``perf_counter`` on CPU; on CUDA, events recorded on
    ``stream`` (the backend's own) with a synchronize before and after, so the sample covers
    exactly the device work the call enqueued."""

    def __init__(self, device: str = "cpu", stream: Any = None):
        self.device = device
        self.stream = stream

    @property
    def name(self) -> str:
        return "cuda-events" if self.device.startswith("cuda") else "perf_counter"

    def time_ms(self, fn: Callable[[], object]) -> float:
        if not self.device.startswith("cuda"):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import torch

        stream = self.stream or torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        torch.cuda.synchronize(self.device)
        return float(start.elapsed_time(end))


class ClockedPiece:
    """A Workpiece from a step and an untimed reset, timed by ``clock``.

    With ``back_to_back`` up to ``max_steps`` steps run inside one sample and the reset follows them
    (a decode step whose cache is cropped back afterwards); otherwise each sample is one step.
    """

    def __init__(
        self,
        clock: Clock,
        step: Callable[[], Any],
        reset: Callable[[], None] | None = None,
        back_to_back: bool = True,
        max_steps: int = 1 << 30,
    ):
        self.clock = clock
        self._step = step
        self._reset = reset
        self.max_steps = max_steps if back_to_back else 1

    def sample_ms(self, steps: int) -> float:
        def run() -> None:
            for _ in range(steps):
                self._step()

        ms = self.clock.time_ms(run) / steps
        if self._reset is not None:
            self._reset()
        return ms
