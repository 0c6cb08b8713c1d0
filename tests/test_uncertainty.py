"""Every prediction carries a standard error; select shows intervals, probabilities and ties."""

from __future__ import annotations

import math

import pytest

from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.subnet import DesignSpace, Subnet
from amoeba_profile.core.timing import Measurement
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.picker import select
from amoeba_profile.selection.predict import Predictor, normal_quantile
from amoeba_profile.table.lut import Lut, measured_row, rows_frame


def test_normal_quantile():
    assert normal_quantile(0.5) == pytest.approx(0.0, abs=1e-9)
    assert normal_quantile(0.95) == pytest.approx(1.6448536, abs=1e-6)
    assert normal_quantile(0.01) == pytest.approx(-2.3263479, abs=1e-6)
    with pytest.raises(UsageError):
        normal_quantile(1.0)


def _table(arch, std: float, n: int, fit=None, by_width: bool = False) -> Lut:
    """Every row 1 ms (with ``by_width``: attn heads / 8 ms, mlp ffn / 128 ms), base 2 ms, with
    ``std`` spread over ``n`` samples."""
    rows = []

    def add(entry: Entry, value: float) -> None:
        m = Measurement((value,), value, value, value, value, std, std / value, n)
        rows.append(measured_row(entry, m, "ok", method="components", repeat=1, wall_s=0.0, rounds=2))

    for heads in range(arch.group_size, arch.num_heads + 1, arch.group_size):
        value = heads / arch.num_heads if by_width else 1.0
        add(Entry("attn", "prefill", 1, 16, 0, heads, heads // arch.group_size), value)
        for c in (16, 64):
            add(Entry("attn", "decode", 1, 1, c, heads, heads // arch.group_size), value)
    for ffn in (arch.ffn_size // 2, arch.ffn_size):
        value = ffn / arch.ffn_size if by_width else 1.0
        add(Entry("mlp", "prefill", 1, 16, 0, ffn=ffn), value)
        add(Entry("mlp", "decode", 1, 1, 0, ffn=ffn), value)
    add(Entry("base", "prefill", 1, 16, 0), 2.0)
    for c in (16, 64):
        add(Entry("base", "decode", 1, 1, c), 2.0)
    meta = {
        "arch": arch.to_dict(),
        "backend": "pytorch",
        "source": "measured",
        "grid": {"widths": [1.0, 0.5], "batch": 1},
    }
    if fit:
        meta["fit"] = fit
    return Lut(rows_frame(rows), meta)


def test_errors_compose_from_rows_rounds_and_layer_counts(tiny_arch):
    table = _table(tiny_arch, std=0.2, n=4)  # every row: se = 0.2 / sqrt(4) = 0.1 ms
    prediction = Predictor(table).predict(Subnet.uniform(tiny_arch, 3, 1.0), Workload(1, 16, 2))
    # base 0.1 in quadrature with 3 layers of one (attn + mlp) shape: 3 * sqrt(0.1^2 + 0.1^2)
    expected = math.sqrt(0.1**2 + (3 * math.sqrt(0.02)) ** 2)
    assert prediction.se_of("ttft") == pytest.approx(expected)
    assert prediction.ttft_ms == pytest.approx(8.0)
    low, high = prediction.interval("ttft", 0.9)
    assert (high - low) / 2 == pytest.approx(1.6448536 * expected, rel=1e-6)
    assert prediction.p_within("ttft", 8.0) == pytest.approx(0.5)
    assert not prediction.model_error_known


def test_a_fit_residual_widens_the_interval(tiny_arch):
    fit = [{"phase": "prefill", "rms_residual_pct": 3.0}, {"phase": "decode", "rms_residual_pct": 1.0}]
    plain = Predictor(_table(tiny_arch, 0.2, 4)).predict(Subnet.uniform(tiny_arch, 3, 1.0), Workload(1, 16, 2))
    fitted = Predictor(_table(tiny_arch, 0.2, 4, fit)).predict(Subnet.uniform(tiny_arch, 3, 1.0), Workload(1, 16, 2))
    assert fitted.model_error_known
    assert fitted.se_of("ttft") == pytest.approx(math.hypot(plain.se_of("ttft"), 0.03 * 8.0))


@pytest.fixture
def near_budget(tiny_arch):
    """A table whose rows are noisy enough that shapes near a budget overlap."""
    table = _table(tiny_arch, std=0.15, n=1, by_width=True)
    space = list(DesignSpace.amoeba(tiny_arch, (1.0, 0.5)).subnets())
    return table, space


def test_confidence_picks_a_shape_whose_quantile_fits(near_budget, tiny_arch):
    table, space = near_budget
    predictor, workload = Predictor(table), Workload(1, 16, 2)
    plain = select(predictor, space, workload, "ttft", 8.1)
    sure = select(predictor, space, workload, "ttft", 8.1, confidence=0.95)
    assert plain.pick.latency_ms <= 8.1 and plain.pick.p_fit < 0.95
    assert sure.pick.prediction.quantile("ttft", 0.95) <= 8.1
    assert sure.pick.quality <= plain.pick.quality and sure.pick.subnet != plain.pick.subnet
    # what --confidence passed over is tied with its pick: it ranks higher and may fit
    assert plain.pick.subnet in [c.subnet for c in sure.tied]
    assert all(c.p_fit >= 0.05 and c.quality >= sure.pick.quality for c in sure.tied)
    with pytest.raises(UsageError):
        select(predictor, space, workload, "ttft", 8.1, confidence=1.5)


def test_selection_json_carries_interval_probability_and_ties(near_budget):
    table, space = near_budget
    result = select(Predictor(table), space, Workload(1, 16, 2), "ttft", 8.1, confidence=0.9).to_dict()
    predicted = result["predicted_ms"]
    assert predicted["interval_90"][0] < predicted["value"] < predicted["interval_90"][1]
    assert 0.9 <= predicted["p_within_budget"] <= 1.0 and predicted["se"] > 0
    assert result["confidence"] == 0.9 and result["tied"]
    assert all(t["subnet_id"] in result["subnets"] for t in result["tied"])


def test_verify_always_measures_the_pick_and_the_tied_shapes_most_likely_to_fit(near_budget):
    from amoeba_profile.measure.verify import candidates_to_verify

    table, space = near_budget
    selection = select(Predictor(table), space, Workload(1, 16, 2), "ttft", 8.1, confidence=0.95)
    assert selection.tied
    chosen = candidates_to_verify(selection, 2)
    assert len(chosen) == 2 and selection.pick in chosen
    best_tied = max(selection.tied, key=lambda c: c.p_fit)
    assert best_tied in chosen and chosen[0] is best_tied  # rank order: the tied shape ranks above the pick
    assert candidates_to_verify(selection, 1) == [selection.pick]
