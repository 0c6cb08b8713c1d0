import numpy as np
import pytest
from conftest import synthetic_lut

from amoeba_profile.core.errors import OutOfRange, UsageError
from amoeba_profile.core.subnet import LayerShape, Subnet
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.predict import Predictor


def attn(heads, phase, context):
    return 0.1 * heads if phase == "prefill" else 0.01 * heads + 0.001 * context


def mlp(ffn, phase):
    return 0.02 * ffn if phase == "prefill" else 0.002 * ffn


def base(phase, context):
    return 5.0 if phase == "prefill" else 1.0 + 0.01 * context


@pytest.fixture
def lut(tiny_arch):
    return synthetic_lut(tiny_arch, attn, mlp, base, contexts=(16, 64), prompt_len=16)


def test_exact_grid_point_is_measured(tiny_arch, lut):
    subnet = Subnet.uniform(tiny_arch, 4, 1.0)
    p = Predictor(lut).predict(subnet, Workload(1, 16, 2))
    assert p.source == "measured"
    assert p.ttft_ms == pytest.approx(5.0 + 4 * (0.1 * 8 + 0.02 * 128))
    # one decode step at context 16
    assert p.tpot_ms == pytest.approx(1.16 + 4 * (0.08 + 0.016 + 0.256))
    assert p.e2e_ms == pytest.approx(p.ttft_ms + p.tpot_ms)


def test_integrates_decode_over_contexts(tiny_arch, lut):
    subnet = Subnet.uniform(tiny_arch, 2, 1.0)
    workload = Workload(1, 16, 40)  # contexts 16..54
    p = Predictor(lut).predict(subnet, workload)
    contexts = np.arange(16, 55)
    per_step = (1.0 + 0.01 * contexts) + 2 * (0.08 + 0.001 * contexts + 0.256)
    assert p.tpot_ms == pytest.approx(per_step.mean())
    assert p.e2e_ms == pytest.approx(p.ttft_ms + per_step.sum())
    assert p.source == "interpolated"  # contexts between 16 and 64 are interpolated


def test_interpolates_between_widths(tiny_arch, lut):
    # heads 6 (kv 3) is measured; ffn 96 lies between 64 and 128
    subnet = Subnet(tiny_arch, (LayerShape(0, 6, 3, 96),))
    p = Predictor(lut).predict(subnet, Workload(1, 16, 2))
    assert p.ttft_ms == pytest.approx(5.0 + 0.6 + 0.02 * 96)
    assert p.source == "interpolated"


def test_refuses_to_extrapolate(tiny_arch, lut):
    predictor = Predictor(lut)
    with pytest.raises(OutOfRange, match=r"context.*outside the measured range \[16, 64\]"):
        predictor.predict(Subnet.uniform(tiny_arch, 4, 1.0), Workload(1, 16, 60))
    with pytest.raises(OutOfRange, match="ffn"):
        predictor.predict(Subnet(tiny_arch, (LayerShape(0, 8, 4, 10),)), Workload(1, 16, 2))
    with pytest.raises(OutOfRange, match="tokens"):
        predictor.predict(Subnet.uniform(tiny_arch, 4, 1.0), Workload(1, 32, 2))
    with pytest.raises(OutOfRange, match="batch 2"):
        predictor.predict(Subnet.uniform(tiny_arch, 4, 1.0), Workload(2, 16, 2))


def test_p90_and_roofline_tags(tiny_arch):
    lut = synthetic_lut(tiny_arch, attn, mlp, base)
    lut.frame["source"] = "roofline"
    from amoeba_profile.table.lut import Lut

    p = Predictor(Lut(lut.frame, lut.meta)).predict(Subnet.uniform(tiny_arch, 4, 1.0), Workload(1, 16, 2), "p90")
    assert p.source == "roofline" and p.stat == "p90"


def test_ttft_at_a_measured_prompt_length_is_measured(tiny_arch, lut):
    """Decode contexts between grid points make tpot interpolated; ttft reads prefill rows only."""
    p = Predictor(lut).predict(Subnet.uniform(tiny_arch, 4, 1.0), Workload(1, 16, 40))
    assert p.source_of("ttft") == "measured" and p.ttft_source == "measured"
    assert p.source_of("tpot_ms") == "interpolated" and p.source_of("e2e") == "interpolated" == p.source
    assert p.to_dict()["sources"] == {"ttft_ms": "measured", "tpot_ms": "interpolated", "e2e_ms": "interpolated"}


def test_metric_accepts_the_cli_spellings(tiny_arch, lut):
    from amoeba_profile.core.errors import UsageError

    p = Predictor(lut).predict(Subnet.uniform(tiny_arch, 4, 1.0), Workload(1, 16, 2))
    assert p.metric("tpot") == p.metric("tpot_ms") == p.metric("TPOT") == p.tpot_ms
    with pytest.raises(UsageError, match="unknown metric 'speed': use one of ttft, tpot, e2e"):
        p.metric("speed")


def test_huge_gen_len_is_refused_before_contexts_are_allocated(tiny_arch, lut):
    import tracemalloc

    subnet = Subnet.uniform(tiny_arch, 4, 1.0)
    predictor = Predictor(lut)
    workload = Workload(1, 16, 10**8)
    tracemalloc.start()
    try:
        for call in (
            lambda: predictor.predict(subnet, workload),
            lambda: predictor.base_metric(workload, "tpot_ms"),
            lambda: predictor.layer_metric(8, 4, 128, workload, "tpot_ms"),
        ):
            with pytest.raises(OutOfRange, match="1e\\+08 is outside the measured range"):
                call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20  # the 10^8 contexts alone would be 800 MB


def test_metrics_are_composed_in_one_place():
    """workload.compose: ttft, mean step, ttft + sum of steps; no step leaves tpot undefined."""
    from amoeba_profile.core.errors import UsageError
    from amoeba_profile.core.workload import compose

    m = compose(5.0, np.array([1.0, 2.0, 3.0]))
    assert (m.ttft_ms, m.tpot_ms, m.e2e_ms) == (5.0, 2.0, 11.0) and m.metric("tpot") == 2.0
    none = compose(5.0, np.array([]))
    assert np.isnan(none.tpot_ms) and none.e2e_ms == 5.0 and none.metric("e2e") == 5.0
    with pytest.raises(UsageError, match="tpot needs --gen-len >= 2"):
        none.metric("tpot")


def test_prediction_and_its_parts_and_measured_models_compose_alike(tiny_arch, lut):
    """predict, base + layers (the optimizer's view) and validation's measured model rows all give
    the same metrics from the same per-step values."""
    from amoeba_profile.core.entry import Entry
    from amoeba_profile.core.timing import Measurement
    from amoeba_profile.measure.validate import measured_metric
    from amoeba_profile.table.lut import Lut, measured_row, rows_frame

    subnet, workload = Subnet.uniform(tiny_arch, 2, 1.0), Workload(1, 16, 40)
    predictor = Predictor(lut)
    p = predictor.predict(subnet, workload)
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        parts = predictor.base_metric(workload, metric) + 2 * predictor.layer_metric(8, 4, 128, workload, metric)
        assert parts == pytest.approx(p.metric(metric))
    # model rows holding the predictor's own per-step values at the table's contexts
    rows = [
        measured_row(
            Entry("model", "prefill", 1, 16, 0, subnet=subnet),
            Measurement.from_samples([p.ttft_ms]),
            "ok",
            method="whole",
            repeat=1,
            wall_s=0.0,
        )
    ]
    for context in (16, 64):
        step, _ = predictor.phase_ms(subnet, "decode", 1, 1, context)
        rows.append(
            measured_row(
                Entry("model", "decode", 1, 1, context, subnet=subnet),
                Measurement.from_samples([step]),
                "ok",
                method="whole",
                repeat=1,
                wall_s=0.0,
            )
        )
    models = Lut(rows_frame(rows), lut.meta)
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):  # decode is linear in context here: interpolation is exact
        assert measured_metric(models, subnet, workload, metric) == pytest.approx(p.metric(metric))


def test_a_statistic_reads_the_same_column_when_predicted_and_when_measured(tiny_arch, lut):
    """median / p90 map to their row columns once (``predict.stat_column``): validation's measured
    metric reads the column the predictor reads, and refuses what the predictor refuses."""
    from amoeba_profile.core.entry import Entry
    from amoeba_profile.core.timing import Measurement
    from amoeba_profile.measure.validate import measured_metric
    from amoeba_profile.selection.predict import stat_column
    from amoeba_profile.table.lut import Lut, measured_row, rows_frame

    subnet, workload = Subnet.uniform(tiny_arch, 2, 1.0), Workload(1, 16, 40)
    prefill = Measurement.from_samples([float(s) for s in range(1, 11)])
    row = measured_row(
        Entry("model", "prefill", 1, 16, 0, subnet=subnet), prefill, "ok", method="whole", repeat=1, wall_s=0.0
    )
    models = Lut(rows_frame([row]), lut.meta)
    assert (stat_column("median"), stat_column("p90")) == ("median_ms", "p90_ms")
    assert measured_metric(models, subnet, workload, "ttft_ms", "p90") == pytest.approx(prefill.p90_ms)
    assert measured_metric(models, subnet, workload, "ttft_ms") == pytest.approx(prefill.median_ms)
    assert prefill.p90_ms > prefill.median_ms
    with pytest.raises(UsageError, match="unknown statistic 'mean': use median or p90"):
        measured_metric(models, subnet, workload, "ttft_ms", "mean")
