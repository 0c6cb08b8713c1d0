import math

from amoeba_profile.core.timing import Measurement, TimingProtocol, sample, warm_up
from amoeba_profile.device.clock import Clock, ClockedPiece


def test_statistics():
    m = Measurement.from_samples([1.0, 2.0, 3.0, 4.0, 10.0])
    assert m.median_ms == 3.0 and m.n == 5
    assert m.p10_ms <= m.median_ms <= m.p90_ms
    assert math.isclose(m.mean_ms, 4.0)
    assert math.isclose(m.cv, m.std_ms / 4.0)
    assert m.samples_ms == (1.0, 2.0, 3.0, 4.0, 10.0)


class Counter:
    def __init__(self):
        self.steps = self.resets = 0

    def step(self):
        self.steps += 1

    def reset(self):
        self.resets += 1


def test_every_sample_is_followed_by_a_reset():
    counter, clock = Counter(), Clock("cpu")
    piece = ClockedPiece(clock, counter.step, counter.reset, back_to_back=False)
    protocol = TimingProtocol(warmup_min=3, warmup_max=5, samples_per_round=4, min_round_s=0.0)
    runs, steps = warm_up(piece, protocol)
    assert 3 <= runs <= 5 and steps == 1  # a piece that needs a reset per step never runs back to back
    samples = sample(piece, protocol, steps)
    assert len(samples) == 4 and all(s >= 0 for s in samples)
    assert counter.steps == counter.resets == runs + 4
    assert clock.name == "perf_counter"


class FakeClock:
    """A clock whose every step lasts exactly ``step_ms``: what the protocol sees from a fast GPU step."""

    name = "fake"

    def __init__(self, counter, step_ms):
        self.counter, self.step_ms = counter, step_ms

    def time_ms(self, fn):
        before = self.counter.steps
        fn()
        return (self.counter.steps - before) * self.step_ms


def test_short_steps_run_back_to_back_in_one_sample():
    counter = Counter()
    piece = ClockedPiece(FakeClock(counter, 0.05), counter.step, counter.reset)
    protocol = TimingProtocol(warmup_min=3, warmup_max=5, samples_per_round=3, min_round_s=0.0, min_sample_ms=2.0)
    runs, steps = warm_up(piece, protocol)
    assert steps == 40  # 2 ms / 0.05 ms per step
    samples = sample(piece, protocol, steps)
    assert samples == [0.05, 0.05, 0.05]  # per step, not per sample
    assert counter.steps == runs + 3 * 40 and counter.resets == runs + 3  # one reset after each sample


class NeverPositive:
    """A serving-loop decode piece whose differences average below zero (a step shorter than the
    noise of the two requests): their sum never reaches any round time."""

    max_steps = 1

    def __init__(self):
        self.calls = 0

    def sample_ms(self, steps):
        self.calls += 1
        if self.calls > 10_000:  # without a bound the round would spin here for ever
            raise RuntimeError("the round never ended")
        return -1.0 if self.calls % 2 else 0.5


def test_a_round_of_samples_that_never_sum_up_ends_at_its_caps():
    protocol = TimingProtocol(samples_per_round=7, min_round_s=0.05, max_samples_per_round=40)
    samples = sample(NeverPositive(), protocol)
    assert len(samples) == 40 and sum(samples) < 0
    # A round that outlived its wall-time cap takes no new sample, even below samples_per_round.
    assert sample(NeverPositive(), TimingProtocol(samples_per_round=7, min_samples=1, max_round_s=0.0)) == [-1.0]


_PAUSED_CHILD = """
import json, os, signal, sys, time
from amoeba_profile.core.timing import TimingProtocol, sample

def busy(ms):
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass

class Decode:
    # (e2e(1 + n) - e2e(1)) / n with n = 4: 1 ms and 3 ms requests, 0.5 ms per step
    max_steps = 1
    calls = 0

    def request(self, ms, pause):
        t0 = time.perf_counter()
        if pause:  # stopped inside the first request, as by a closed lid or a preempted VM
            print("stopping", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        busy(ms)
        return (time.perf_counter() - t0) * 1e3

    def sample_ms(self, steps):
        self.calls += 1
        first = self.request(1.0, pause=self.calls == 3)
        return (self.request(3.0, False) - first) / 4

print(json.dumps(sample(Decode(), TimingProtocol(samples_per_round=7, min_round_s=0.05))))
"""


def test_a_sample_the_process_was_stopped_in_is_measured_again():
    """SIGSTOP in the middle of a decode sample's first request: without a check it is a sample of
    about -pause/4 ms, and a round that waits for its sum to recover takes hundreds more."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    child = subprocess.Popen([sys.executable, "-c", _PAUSED_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "stopping"
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 30
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":  # wait until it is stopped
            assert time.monotonic() < deadline, "the child never stopped"
            time.sleep(0.01)
        time.sleep(0.5)  # the pause itself: half a second in which the child does not run
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    samples = json.loads(out)
    assert 7 <= len(samples) <= 40
    assert all(0.2 < s < 1.0 for s in samples), samples  # ~0.5 ms each; the paused one (~ -125 ms) re-measured


class _SlowPiece:
    """A request that takes longer than a round's wall-time budget."""

    max_steps = 1

    def __init__(self, clock):
        self.clock = clock

    def sample_ms(self, steps: int) -> float:
        self.clock[0] += 2.0
        return 2000.0


def test_a_long_request_stops_at_min_samples_once_the_round_budget_is_spent(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("amoeba_profile.core.timing.time.perf_counter", lambda: clock[0])
    protocol = TimingProtocol(samples_per_round=7, min_samples=3, max_round_s=4.0, warmup_max_s=3.0)
    assert len(sample(_SlowPiece(clock), protocol)) == 3
    runs, _ = warm_up(_SlowPiece(clock), protocol)
    assert runs == 2  # not warmup_min=3 requests of 2 s each


def test_journal_identity_ignores_bounds_left_at_their_defaults():
    assert TimingProtocol().identity_dict().keys() == TimingProtocol().to_dict().keys() - {
        "min_samples",
        "max_round_s",
        "max_samples_per_round",
        "warmup_max_s",
        "max_remeasures",
    }
    assert TimingProtocol(max_round_s=9.0).identity_dict()["max_round_s"] == 9.0
