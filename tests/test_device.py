"""Device detection on fixture trees and recorded NVML values; slugs; the spec sheet."""

import json
from datetime import date

import pytest

from amoeba_profile.core.errors import UsageError
from amoeba_profile.device import cpu_slug, detect, gpu_slug, jetson_slug
from amoeba_profile.device.cpu import cpu_info
from amoeba_profile.device.jetson import JetsonReader
from amoeba_profile.device.monitor import JetsonMonitor, NvmlMonitor, entry_state
from amoeba_profile.device.nvml import RecordedReader, decode_reasons, describe_state
from amoeba_profile.device.specs import load_specs, match_gpu_name, shared_memory_note, validate_specs


def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def orin_nx_tree(root, module="p3767-0000", min_freq=918000000):
    """Files as on an Orin NX 16GB devkit with JetPack 6.0 (L4T 36.3), MAXN, jetson_clocks applied."""
    write(root, "proc/device-tree/model", b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00")
    write(
        root,
        "proc/device-tree/compatible",
        f"nvidia,p3768-0000+{module}\x00nvidia,{module}\x00nvidia,tegra234\x00".encode(),
    )
    write(
        root,
        "etc/nv_tegra_release",
        "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
        "DATE: Mon May  6 17:34:21 UTC 2024\n# KERNEL_VARIANT: oot\n",
    )
    write(root, "proc/meminfo", "MemTotal:       15655264 kB\nMemFree:         9000000 kB\n")
    gpu = "sys/class/devfreq/17000000.gpu/"
    write(root, gpu + "cur_freq", "918000000\n")
    write(root, gpu + "min_freq", f"{min_freq}\n")
    write(root, gpu + "max_freq", "918000000\n")
    hw = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/"
    for channel, (label, mv, ma) in enumerate(
        [("VDD_IN", 5072, 1576), ("VDD_CPU_GPU_CV", 5064, 520), ("VDD_SOC", 5064, 480)], 1
    ):
        write(root, hw + f"in{channel}_label", label + "\n")
        write(root, hw + f"in{channel}_input", f"{mv}\n")
        write(root, hw + f"curr{channel}_input", f"{ma}\n")
    write(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(root, "sys/class/thermal/thermal_zone0/temp", "47000\n")
    write(root, "sys/class/thermal/thermal_zone1/type", "gpu-thermal\n")
    write(root, "sys/class/thermal/thermal_zone1/temp", "45500\n")
    write(
        root,
        "proc/cpuinfo",
        "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
        "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nprocessor\t: 1\n",
    )
    return root


def nvpmodel(cmd):
    assert cmd == ["nvpmodel", "-q"]
    return "NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n"


def test_jetson_orin_nx_detection(tmp_path):
    reader = JetsonReader(orin_nx_tree(tmp_path), run=nvpmodel)
    assert reader.is_jetson()
    static = reader.static()
    assert static["l4t"] == "36.3.0" and static["jetpack"] == "6.0"
    assert jetson_slug(static["compatible"], static["model"]) == "orin-nx-16gb"
    state = reader.state()
    assert state["power_mode"] == "MAXN" and state["jetson_clocks"] is True
    assert state["gpu_freq_mhz"] == 918 and state["temperature_c"] == 45.5
    assert state["power_w"] == pytest.approx(5072 * 1576 / 1e6, abs=1e-3)
    assert [r["label"] for r in state["rails"]] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    report = detect(root=tmp_path, jetson=reader)
    assert report["jetson"]["slug"] == "orin-nx-16gb" and report["gpus"] == []
    assert report["cpu"]["isa"] == ["asimddp", "asimdhp", "neon"]


def test_jetson_variants(tmp_path):
    reader = JetsonReader(orin_nx_tree(tmp_path, module="p3767-0001", min_freq=306000000), run=lambda cmd: "")
    static = reader.static()
    assert jetson_slug(static["compatible"], static["model"]) == "orin-nx-8gb"
    state = reader.state()
    assert state["jetson_clocks"] is False and state["power_mode"] is None


def test_jetson_energy_integration(tmp_path):
    monitor = JetsonMonitor(JetsonReader(orin_nx_tree(tmp_path), run=nvpmodel))
    before = monitor.sample()
    after = dict(monitor.sample(), t=before["t"] + 2.0)
    state = entry_state(before, after, steps=4)
    # 7.993 W for 2 s over 4 steps = ~3997 mJ per step
    assert state["energy_mj_per_step"] == pytest.approx(5072 * 1576 / 1e6 * 2 * 1000 / 4, rel=1e-3)
    assert state["clock_mhz"] == 918 and state["throttled"] is False


A5000 = {
    "static": [
        {
            "name": "NVIDIA RTX A5000",
            "memory_total_mb": 24564,
            "compute_capability": "8.6",
            "driver_version": "550.54.15",
            "cuda_driver_version": "12.4",
            "max_sm_clock_mhz": 2100,
            "max_mem_clock_mhz": 8001,
            "power_limit_w": 230.0,
        }
    ],
    "states": [
        [
            {
                "sm_clock_mhz": 1950,
                "mem_clock_mhz": 8001,
                "temperature_c": 61,
                "power_w": 180.5,
                "energy_mj": 1_000_000,
                "clock_event_mask": 0,
            },
            {
                "sm_clock_mhz": 1695,
                "mem_clock_mhz": 8001,
                "temperature_c": 84,
                "power_w": 229.8,
                "energy_mj": 1_004_000,
                "clock_event_mask": 0x20 | 0x4,
            },
        ]
    ],
}


def test_nvml_recorded_reader_and_throttle_reasons():
    report = detect(
        gpu_reader=RecordedReader(A5000), jetson=JetsonReader(root=__import__("pathlib").Path("/nonexistent"))
    )
    gpu = report["gpus"][0]
    assert gpu["slug"] == "rtx-a5000" and gpu["compute_capability"] == "8.6" and gpu["throttled"] is False
    assert decode_reasons(0x20 | 0x4) == ["sw_power_cap", "sw_thermal_slowdown"]
    assert describe_state({"clock_event_mask": 0x1})["throttled"] is False  # idle is not throttling


def test_nvml_monitor_energy_and_throttle_flag():
    monitor = NvmlMonitor(RecordedReader(A5000), 0)
    before, after = monitor.sample(), monitor.sample()
    state = entry_state(before, after, steps=8)
    assert state["energy_mj_per_step"] == pytest.approx(500.0)
    assert state["throttled"] is True and state["temperature_c"] == 84 and state["clock_mhz"] == 1695
    assert state["clock_event_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]


def test_no_nvml_is_reported_not_raised():
    from amoeba_profile.device.nvml import NvmlUnavailable

    def missing():
        raise NvmlUnavailable("nvidia-ml-py is not installed")

    report = detect(jetson=JetsonReader(root=__import__("pathlib").Path("/nonexistent")), nvml_factory=missing)
    assert report["gpus"] == [] and any("no NVML" in n for n in report["notes"])


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA RTX A5000", "rtx-a5000"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),  # not confused with the L4
        ("NVIDIA RTX A6000", "rtx-a6000"),
    ],
)
def test_gpu_slugs_are_stable(name, slug):
    assert gpu_slug(name) == slug == gpu_slug(name)


def test_cpu_facts_and_slug(tmp_path):
    write(
        tmp_path,
        "proc/cpuinfo",
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz\n"
        "core id\t\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n"
        "processor\t: 1\ncore id\t\t: 0\n",
    )
    write(tmp_path, "proc/meminfo", "MemTotal:       32768000 kB\n")
    write(tmp_path, "sys/devices/system/cpu/cpu0/cache/index3/size", "105M\n")
    info = cpu_info(tmp_path)
    assert info["threads"] == 2 and info["cores"] == 1
    assert info["isa"] == ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f", "fma"]
    assert info["llc_bytes"] == 105 << 20 and info["memory_gb"] == 31.2
    assert cpu_slug(tmp_path) == "cpu-intel-xeon-platinum-8480" == cpu_slug(tmp_path)


REQUIRED = [
    "rtx-a5000",
    "orin-nx-8gb",
    "orin-nx-16gb",
    "agx-orin-32gb",
    "agx-orin-64gb",
    "orin-nano-8gb",
    "h100-sxm",
    "h100-pcie",
    "h200",
    "a100",
    "rtx-a6000",
    "rtx-4090",
    "l4",
]


def test_spec_sheet_is_complete_and_sourced():
    specs = load_specs()
    assert set(REQUIRED) <= set(specs)
    for spec in specs.values():
        assert spec.source and spec.mem_bw_gbps > 0 and spec.fp16_tflops >= spec.fp32_tflops
    assert specs["orin-nx-16gb"].shared_memory and not specs["rtx-a5000"].shared_memory
    assert match_gpu_name("NVIDIA RTX A5000").mem_bw_gbps == 768


def test_shared_memory_note_only_for_shared_memory_devices():
    assert shared_memory_note("orin-nx-16gb").startswith(f"{load_specs()['orin-nx-16gb'].name}: its 16 GB are shared")
    assert shared_memory_note("rtx-a5000") is None and shared_memory_note("cpu-unknown") is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mem_bw_gbps": -1}, "mem_bw_gbps must be a positive number"),
        ({"source": ""}, "source is required"),
        ({"kind": "tpu"}, "kind must be"),
        ({"fp32_tflops": 500}, "inconsistent"),
    ],
)
def test_spec_validation_names_the_field(change, message):
    entry = {
        "name": "X",
        "kind": "gpu",
        "memory_gb": 24,
        "mem_bw_gbps": 768,
        "fp32_tflops": 27.8,
        "fp16_tflops": 111.1,
        "bf16_tflops": 111.1,
        "int8_tops": 222.2,
        "source": "datasheet",
    }
    validate_specs({"devices": {"x-1": entry}})
    with pytest.raises(UsageError, match=message):
        validate_specs({"devices": {"x-1": {**entry, **change}}})
    with pytest.raises(UsageError, match="not a slug"):
        validate_specs({"devices": {"Bad Slug": entry}})


def test_microbenchmarks_report_progress():
    from amoeba_profile.core.timing import TimingProtocol
    from amoeba_profile.device.bench import run_microbenchmarks

    seen = []
    tiny = TimingProtocol(warmup_min=1, warmup_max=2, rounds=1, samples_per_round=2, min_round_s=0.0)
    run_microbenchmarks(
        "cpu",
        ("float32",),
        hidden=64,
        ffn=128,
        prompt_len=8,
        copy_mb=1,
        protocol=tiny,
        progress=lambda done, total, label: seen.append((done, total, label)),
    )
    assert seen == [
        (0, 3, "memory bandwidth (1 MB copy)"),
        (1, 3, "dispatch overhead"),
        (2, 3, "float32 GEMV and GEMM (64 x 128, 8 tokens)"),
        (3, 3, "done"),
    ]


def test_write_profile_puts_the_report_under_the_device_slug(tmp_path):
    from amoeba_profile.device.profile import write_profile

    report = {"slug": "cpu-test", "notes": [], "when": date(2024, 1, 2)}  # not JSON: written as text
    path = write_profile(report, tmp_path / "profiles")
    assert path == tmp_path / "profiles" / "cpu-test" / "device.json"
    assert json.loads(path.read_text()) == {"slug": "cpu-test", "notes": [], "when": "2024-01-02"}
