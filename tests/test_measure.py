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
