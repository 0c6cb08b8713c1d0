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


class _NonPositivePiece:
    """A decode difference whose samples average below zero: a loop on the samples' sum never ends."""

    max_steps = 1

    def __init__(self):
        self.calls = 0

    def sample_ms(self, steps: int) -> float:
        self.calls += 1
        return -1.0


class _SlowPiece:
    """A request that takes longer than a round's wall-time budget."""

    max_steps = 1

    def __init__(self, clock):
        self.clock = clock

    def sample_ms(self, steps: int) -> float:
        self.clock[0] += 2.0
        return 2000.0


def test_a_round_is_bounded_by_count_whatever_the_samples_sum_to():
    piece = _NonPositivePiece()
    protocol = TimingProtocol(samples_per_round=5, min_round_s=3600.0, max_round_s=3600.0, max_samples_per_round=50)
    assert sample(piece, protocol) == [-1.0] * 50 and piece.calls == 50


def test_a_long_request_stops_at_min_samples_once_the_round_budget_is_spent(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("amoeba_profile.core.timing.time.perf_counter", lambda: clock[0])
    protocol = TimingProtocol(samples_per_round=7, min_samples=3, max_round_s=4.0, warmup_max_s=3.0)
    assert len(sample(_SlowPiece(clock), protocol)) == 3
    runs, _ = warm_up(_SlowPiece(clock), protocol)
    assert runs == 2  # not warmup_min=3 requests of 2 s each


def test_journal_identity_ignores_bounds_left_at_their_defaults():
    assert TimingProtocol().identity_dict().keys() == TimingProtocol().to_dict().keys() - {
        "min_samples", "max_round_s", "max_samples_per_round", "warmup_max_s"}
    assert TimingProtocol(max_round_s=9.0).identity_dict()["max_round_s"] == 9.0
