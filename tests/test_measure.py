import math

from amoeba_profile.measure import Clock, Measurement, TimingProtocol, sample, warm_up


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


def test_every_step_is_followed_by_a_reset():
    piece, clock = Counter(), Clock("cpu")
    protocol = TimingProtocol(warmup_min=3, warmup_max=5, samples_per_round=4, min_round_s=0.0)
    runs = warm_up(piece, clock, protocol)
    assert 3 <= runs <= 5
    samples = sample(piece, clock, protocol)
    assert len(samples) == 4 and all(s >= 0 for s in samples)
    assert piece.steps == piece.resets == runs + 4
    assert clock.name == "perf_counter"
