from dataclasses import replace

import pytest
from amoeba_profile.backends.flows import roofline_profiles

from amoeba_profile.core.arch import BUILTIN_ARCHS
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import LutError
from amoeba_profile.device.specs import get_spec
from amoeba_profile.measure.build import BuildPlan
from amoeba_profile.table.lut import Lut, load_table, rows_frame
from amoeba_profile.table.roofline import (
    Efficiency,
    calibrate,
    component_ms,
    component_ops,
    get_flow,
    roofline_rows,
    whole_model_bounds,
    write_roofline_table,
)

LLAMA2 = BUILTIN_ARCHS["llama2-7b"]


def ops_by_name(entry, **kw):
    return {op.name: op for op in component_ops(LLAMA2, entry, "float16", kv_cache_copy=kw.get("copy", False))}


def test_mlp_decode_flops_and_bytes_by_hand():
    ops = ops_by_name(Entry("mlp", "decode", 1, 1, 0, ffn=11008))
    assert ops["gate_up"].flops == 2 * 4096 * 2 * 11008 == 180_355_072
    assert ops["gate_up"].bytes == (2 * 4096 * 11008 + 4096 + 2 * 11008) * 2 == 180_407_296
    assert ops["down"].flops == 90_177_536 and ops["down"].bytes == 90_207_744


def test_attention_decode_flops_and_bytes_by_hand():
    ops = ops_by_name(Entry("attn", "decode", 1, 1, 1024, 32, 32))
    assert ops["qkv"].flops == 2 * 4096 * 96 * 128 == 100_663_296
    assert ops["qkv"].bytes == 100_696_064
    # scores and weighted sum over 1025 keys (1024 cached + the new token)
    assert ops["attention"].flops == 4 * 32 * 1025 * 128 == 16_793_600
    assert ops["attention"].bytes == (2 * 32 * 1025 * 128 + 2 * 32 * 128) * 2 == 16_809_984
    assert ops["o_proj"].flops == 33_554_432 and ops["o_proj"].bytes == 33_570_816
    assert ops["kv_append"].bytes == 2 * 32 * 128 * 2
    # eager torch.cat rewrites the cache: read + write of 1025 tokens of K and V
    copy = ops_by_name(Entry("attn", "decode", 1, 1, 1024, 32, 32), copy=True)
    assert copy["kv_append"].bytes == 2 * 32 * 128 * 2 + 2 * 2 * 32 * 1025 * 128 * 2


def test_prefill_attention_is_causal():
    ops = ops_by_name(Entry("attn", "prefill", 1, 128, 0, 32, 32))
    assert ops["attention"].flops == pytest.approx(4 * 32 * 128 * (129 / 2) * 128)


def test_component_time_is_the_roofline(tiny_arch):
    spec, entry = get_spec("rtx-a5000"), Entry("mlp", "decode", 1, 1, 0, ffn=11008)
    ideal = Efficiency(1.0, 1.0, 0.0)
    ops = component_ops(LLAMA2, entry, "float16", False)
    ms = component_ms(ops, 3, spec, "float16", ideal)
    total_bytes = 180_407_296 + 90_207_744 + 3 * 11008 * 2
    assert ms == pytest.approx(total_bytes / 768e9 * 1e3)  # decode GEMV is memory bound
    # a GPU's host dispatches while the device computes: the longer of the two counts
    assert component_ms(ops, 3, spec, "float16", Efficiency(1.0, 1.0, 2.0)) == pytest.approx(ms)
    assert component_ms(ops, 3, spec, "float16", Efficiency(1.0, 1.0, 200.0)) == pytest.approx(0.6)
    # on a CPU the host is the device: dispatch adds
    cpu = replace(spec, kind="cpu", slug="cpu-test")
    assert component_ms(ops, 3, cpu, "float16", Efficiency(1.0, 1.0, 2.0)) == pytest.approx(ms + 0.006)


def test_whole_model_bounds():
    spec = get_spec("rtx-a5000")
    bounds = whole_model_bounds(LLAMA2, [(32, 32, 11008)] * 32, spec, "float16", "decode", 1, 128)
    # ~6.7 G parameters x 2 bytes streamed once per token at 768 GB/s
    assert 16.0 < bounds["bandwidth_bound_ms"] < 18.5
    assert bounds["compute_bound_ms"] < bounds["bandwidth_bound_ms"] / 50


def test_calibration_recovers_known_efficiencies(tiny_arch):
    spec, flow = get_spec("rtx-a5000"), get_flow("pytorch", roofline_profiles())
    plan = BuildPlan(LLAMA2, (1.0, 0.75, 0.5), (128, 512), (128, 1024, 2048))
    truth = Efficiency(0.6, 0.4, 5.0)
    lut = Lut(
        rows_frame(roofline_rows(LLAMA2, plan.entries(), spec, flow, "float16", truth)), {"arch": LLAMA2.to_dict()}
    )
    lut.frame["source"] = "measured"
    eff, report = calibrate(Lut(lut.frame, lut.meta), spec, flow, "float16")
    assert eff.eff_bw == pytest.approx(0.6, abs=0.02)
    assert eff.eff_compute == pytest.approx(0.4, rel=0.06)
    assert report["median_abs_pct"] < 1.0


def test_roofline_table_says_so_in_every_row(tmp_path):
    plan = BuildPlan(LLAMA2, prompt_lens=(128,), contexts=(128, 512))
    path, meta = write_roofline_table(
        plan, get_spec("orin-nx-16gb"), get_flow("mlc-llm", roofline_profiles()), "float16", tmp_path
    )
    lut = load_table(path)
    assert path.parts[-3:] == ("orin-nx-16gb", "mlc-llm", "llama2-7b-float16.csv")
    assert (lut.frame.source == "roofline").all() and (lut.frame.method == "computed").all()
    assert lut.is_roofline and meta["calibration"] is None and meta["efficiency"]["eff_bw"] == 0.75


def _synthetic(spec, eff, flow_name="pytorch"):
    plan = BuildPlan(LLAMA2, (1.0, 0.75, 0.5), (128, 512), (128, 1024, 2048))
    frame = rows_frame(
        roofline_rows(LLAMA2, plan.entries(), spec, get_flow(flow_name, roofline_profiles()), "float16", eff)
    )
    frame["source"] = "measured"
    return Lut(frame, {"arch": LLAMA2.to_dict()})


def test_host_bound_table_calibrates_to_dispatch_not_to_impossible_bandwidth():
    """Launch-bound rows (as eager decode on an H100) are explained by per-op dispatch, with
    efficiencies that stay physical."""
    spec, flow = get_spec("h100-sxm"), get_flow("pytorch", roofline_profiles())
    eff, report = calibrate(_synthetic(spec, Efficiency(0.8, 0.6, 20.0)), spec, flow, "float16")
    assert eff.eff_bw <= 1 and eff.eff_compute <= 1
    assert eff.launch_us == pytest.approx(20.0, rel=0.06) and report["median_abs_pct"] < 2
    assert report["host_overlaps_device"] is True


def test_unphysical_calibration_is_refused():
    """A table faster than the device's peaks would need efficiencies above 1: refused, not fitted."""
    spec, flow = get_spec("rtx-a5000"), get_flow("pytorch", roofline_profiles())
    too_fast = _synthetic(spec, Efficiency(2.5, 2.5, 0.0))
    with pytest.raises(LutError, match="calibration refused"):
        calibrate(too_fast, spec, flow, "float16")


def test_calibration_works_on_a_difference_table():
    """Fitted ``layer`` rows are calibrated as attention + MLP operations."""
    from amoeba_profile.core.entry import Entry as E
    from amoeba_profile.core.timing import Measurement
    from amoeba_profile.table.lut import measured_row
    from amoeba_profile.table.roofline import entry_kernels, entry_ops

    spec, flow, truth = get_spec("rtx-a5000"), get_flow("tensorrt-llm", roofline_profiles()), Efficiency(0.7, 0.5, 3.0)
    rows = []
    for c in (128, 1024, 2048):
        for heads, ffn in ((32, 11008), (16, 11008), (32, 5504)):
            entry = E("layer", "decode", 1, 1, c, heads, heads, ffn)
            ms = component_ms(
                entry_ops(LLAMA2, entry, "float16", False), entry_kernels(flow, "layer"), spec, "float16", truth
            )
            rows.append(
                measured_row(entry, Measurement.from_samples([ms]), "ok", method="difference", repeat=1, wall_s=0)
            )
    for p in (128, 512):
        entry = E("layer", "prefill", 1, p, 0, 32, 32, 11008)
        ms = component_ms(
            entry_ops(LLAMA2, entry, "float16", False), entry_kernels(flow, "layer"), spec, "float16", truth
        )
        rows.append(measured_row(entry, Measurement.from_samples([ms]), "ok", method="difference", repeat=1, wall_s=0))
    eff, report = calibrate(Lut(rows_frame(rows), {"arch": LLAMA2.to_dict()}), spec, flow, "float16")
    assert eff.eff_bw == pytest.approx(0.7, abs=0.02) and report["median_abs_pct"] < 1.5


def test_device_profile_gives_peaks_and_dispatch(tmp_path):
    """What `build-lut --predict --device-profile` reads, from Python: measured peaks (a dtype not
    benchmarked takes the requested one's) and the per-op dispatch."""
    import json

    from amoeba_profile.core.errors import UsageError
    from amoeba_profile.table.roofline import load_device_profile

    report = {
        "slug": "cpu-test",
        "device": "cpu",
        "cpu": {"model": "Test CPU", "memory_gb": 16.0},
        "microbench": {
            "memory_bw_gbps": 20.0,
            "dispatch_overhead_us": 7.5,
            "matmul": {
                "float32": {"gemm_tflops": 0.5, "gemv_bw_gbps": 25.0},
                "bfloat16": {"gemm_tflops": 1.5, "gemv_bw_gbps": 18.0},
            },
        },
    }
    path = tmp_path / "device.json"
    path.write_text(json.dumps(report))
    spec, dispatch_us = load_device_profile(path, "float32")
    assert dispatch_us == 7.5 and (spec.slug, spec.kind, spec.name, spec.memory_gb) == (
        "cpu-test",
        "cpu",
        "Test CPU",
        16.0,
    )
    assert (spec.fp32_tflops, spec.fp16_tflops, spec.bf16_tflops, spec.mem_bw_gbps) == (0.5, 0.5, 1.5, 25.0)
    with pytest.raises(UsageError, match="no float16 micro-benchmark"):
        load_device_profile(path, "float16")
    path.write_text("{")
    with pytest.raises(UsageError, match="not a readable profile-device JSON"):
        load_device_profile(path, "float32")


def test_calibration_warning_and_whole_models_refused(tmp_path):
    from amoeba_profile.core.errors import UsageError
    from amoeba_profile.core.subnet import Subnet
    from amoeba_profile.table.roofline import calibration_warning

    spec, flow = get_spec("rtx-a5000"), get_flow("tensorrt-llm", roofline_profiles())
    same = Lut(rows_frame([]), {"device_slug": "rtx-a5000", "backend": "tensorrt-llm"})
    other = Lut(rows_frame([]), {"device_slug": "cpu-x", "backend": "pytorch"})
    assert calibration_warning(same, spec, flow) is None
    assert calibration_warning(other, spec, flow) == (
        "calibrating rtx-a5000/tensorrt-llm from a table measured on cpu-x/pytorch: efficiencies may not transfer"
    )
    plan = BuildPlan(LLAMA2, prompt_lens=(128,), contexts=(128,), whole=(Subnet.uniform(LLAMA2, 32, 1.0),))
    with pytest.raises(UsageError, match="whole subnets"):
        write_roofline_table(plan, spec, flow, "float16", tmp_path)
    assert not list(tmp_path.rglob("*.csv"))
