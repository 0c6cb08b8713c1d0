"""The CLI end to end on a tiny architecture, through the real console entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "amoeba_profile.cli.main"]


def run(*args, check_rc=None):
    # Generous: a CLI build here takes seconds on an idle machine and must not time out on a busy one.
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr + proc.stdout
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import write_tiny_config

    root = tmp_path_factory.mktemp("cli")
    config = write_tiny_config(root)
    out = root / "lut"
    proc = run(
        "build-lut",
        "--backend",
        "pytorch",
        "--model",
        str(config),
        "--out",
        str(out),
        "--quick",
        "--prompt-len",
        "16",
        "--contexts",
        "16,64",
        "--whole",
        "4x1",
        "--method",
        "components",  # the rows below are counted for a components table; calibrated has its own tests
        check_rc=0,
    )
    assert "table:" in proc.stdout
    assert "threads: 1 (torch's default under OMP_NUM_THREADS=1)" in proc.stderr  # pinned by conftest
    return out


def test_show_json(built):
    data = json.loads(run("show", "--lut", str(built), "--json", check_rc=0).stdout)
    assert data["backend"] == "pytorch" and data["model"] == "tiny" and data["dtype"] == "float32"
    assert data["grid"]["contexts"] == [16, 64]
    assert data["rows"]["model/ok"] == 3 and data["device"]["cpu_count"] >= 1
    assert all(row["median_ms"] > 0 for row in data["table"])


def test_select_json_and_text(built):
    data = json.loads(
        run(
            "select",
            "--lut",
            str(built),
            "--budget-ms",
            "1000",
            "--metric",
            "tpot",
            "--prompt-len",
            "16",
            "--gen-len",
            "30",
            "--json",
            check_rc=0,
        ).stdout
    )
    assert data["subnet"]["num_layers"] == 4 and data["subnet"]["kept_layers"] == [0, 1, 2, 3]
    assert data["predicted_ms"]["source"] in ("measured", "interpolated")
    assert data["metric"] == "tpot_ms" and data["budget_ms"] == 1000 and data["top_k"]
    assert data["predicted_ms"]["value"] <= 1000
    text = run(
        "select", "--lut", str(built), "--budget-ms", "1000", "--prompt-len", "16", "--gen-len", "30", check_rc=0
    ).stdout
    assert "pick:" in text and "top " in text and "Pareto" not in text
    assert (
        "Pareto"
        in run(
            "select",
            "--lut",
            str(built),
            "--budget-ms",
            "1000",
            "--prompt-len",
            "16",
            "--gen-len",
            "30",
            "--pareto",
            check_rc=0,
        ).stdout
    )


def test_select_defaults_to_a_request_the_table_covers(built):
    """The table holds prompt 16 and contexts 16..64: 128/128 would be outside it, so select asks
    for a 16-token prompt and as many tokens as the contexts cover, and says so."""
    proc = run("select", "--lut", str(built), "--budget-ms", "1000", "--json", check_rc=0)
    data = json.loads(proc.stdout)
    assert data["workload"] == {"batch": 1, "prompt_len": 16, "gen_len": 50}  # decode contexts 16..64
    assert "a request of 16 prompt tokens and 50 generated" in proc.stderr
    given = json.loads(
        run("select", "--lut", str(built), "--budget-ms", "1000", "--gen-len", "20", "--json", check_rc=0).stdout
    )
    assert given["workload"]["gen_len"] == 20 and given["workload"]["prompt_len"] == 16


def test_select_json_lists_each_subnet_once(built):
    proc = run(
        "select",
        "--lut",
        str(built),
        "--budget-ms",
        "1000",
        "--prompt-len",
        "16",
        "--gen-len",
        "30",
        "--top-k",
        "20",
        "--pareto",
        "--json",
        check_rc=0,
    )
    data = json.loads(proc.stdout)
    assert proc.stdout.count('"arch"') == 1  # the pick's full subnet; every other shape by id
    assert all(entry["subnet_id"] in data["subnets"] for entry in data["top_k"] + data["pareto"])
    assert len(proc.stdout) < 2000 * (len(data["subnets"]) + 1)


def test_show_labels_model_rows_and_prints_no_reprs(built):
    text = run("show", "--lut", str(built), check_rc=0).stdout
    assert "versions: torch=" in text and "{'" not in text and "[1.0" not in text
    model_rows = [line for line in text.splitlines() if "│ model" in line]
    assert model_rows and all("w1" in line for line in model_rows)  # --whole 4x1: 4 layers at width 1
    assert "protocol: 2 rounds x 4 samples (--quick)" in text.splitlines()  # built with --quick
    data = json.loads(run("show", "--lut", str(built), "--json", check_rc=0).stdout)
    assert data["protocols"] == ["2 rounds x 4 samples (--quick)"]


def test_version_and_plain_flags_in_help():
    from amoeba_profile import __version__

    assert run("--version", check_rc=0).stdout.strip() == f"amoeba-profile {__version__}"
    for command in ("select", "show", "build-lut", "profile-device", "validate", "reseal", "backends"):
        text = run(command, "--help", check_rc=0).stdout
        assert "<bool>" not in text and "--help" in text, command


def test_bad_measuring_options_write_nothing(tmp_path):
    from conftest import TINY_CONFIG

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "lut"
    proc = run("build-lut", "--model", str(config), "--device", "rtx-a5000", "--out", str(out), check_rc=2)
    assert "add --predict" in proc.stderr and not out.exists()
    proc = run(
        "build-lut", "--model", str(config), "--backend", "mlc-llm", "--device", "cpu", "--out", str(out), check_rc=2
    )
    assert "runs on ['cuda']" in proc.stderr and not out.exists()
    proc = run(
        "build-lut",
        "--model",
        str(config),
        "--predict",
        "--device",
        "rtx-a5000",
        "--quick",
        "--out",
        str(out),
        check_rc=2,
    )
    assert "--quick" in proc.stderr and not out.exists()


def test_default_out_is_not_the_shipped_folder(tmp_path):
    proc = subprocess.run(
        [
            *CLI,
            "build-lut",
            "--predict",
            "--device",
            "rtx-a5000",
            "--backend",
            "tensorrt-llm",
            "--model",
            "tinyllama-1.1b",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "lut" / "rtx-a5000" / "tensorrt-llm" / "tinyllama-1.1b-float16.csv").is_file()


def test_reseal_command(built, tmp_path):
    import shutil

    import pandas as pd

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    table = next(copy.rglob("*.csv"))
    pd.read_csv(table).to_csv(table)
    assert "amoeba-profile reseal --lut" in run("show", "--lut", str(table), check_rc=1).stderr
    assert "re-sealed" in run("reseal", "--lut", str(table), check_rc=0).stdout
    assert run("show", "--lut", str(table), "--json", check_rc=0).stdout


def test_impossible_budget_exits_1_with_one_line(built):
    proc = run(
        "select", "--lut", str(built), "--budget-ms", "0.0001", "--prompt-len", "16", "--gen-len", "30", check_rc=1
    )
    assert proc.stderr.startswith("error: no shape fits") and "fastest is" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_out_of_range_workload_exits_1(built):
    proc = run(
        "select", "--lut", str(built), "--budget-ms", "100", "--prompt-len", "16", "--gen-len", "500", check_rc=1
    )
    assert "outside the measured range" in proc.stderr


def test_usage_errors_exit_2(built, tmp_path):
    assert run("select", "--lut", str(built), "--budget-ms", "abc").returncode == 2
    assert run("select", "--lut", str(built), "--budget-ms", "5", "--metric", "speed").returncode == 2
    proc = run("build-lut", "--model", "llama9", "--out", str(tmp_path), check_rc=2)
    assert "unknown model 'llama9'" in proc.stderr
    assert run("build-lut", "--model", "tinyllama-1.1b", "--backend", "vllm", "--out", str(tmp_path)).returncode == 2
    proc = run("build-lut", "--model", "tinyllama-1.1b", "--busy", "sometimes", "--out", str(tmp_path), check_rc=2)
    assert "--busy takes one of wait, warn, refuse" in proc.stderr


def test_corrupt_table_is_one_line(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    table = next(copy.rglob("*.csv"))
    table.write_text(table.read_text()[:200])
    proc = run("show", "--lut", str(copy), check_rc=1)
    assert proc.stderr.startswith(f"error: {table}") and len(proc.stderr.strip().splitlines()) == 1


def test_backends_lists_every_flow():
    data = {b["name"]: b for b in json.loads(run("backends", "--json", check_rc=0).stdout)}
    assert {name: b["status"] for name, b in data.items() if name not in ("llama.cpp", "tensorrt-llm", "mlc-llm")} == {
        "pytorch": "measuring",
        "pytorch-compiled": "measuring",
        "onnxruntime": "measuring",
    }
    assert data["llama.cpp"]["status"] in ("measuring", "unavailable")  # measuring where llama-bench is built
    assert data["tensorrt-llm"]["status"] in ("measuring", "unavailable")  # measuring with TensorRT-LLM and a GPU
    assert data["pytorch"]["available"] is True and data["pytorch"]["per_layer_ffn"] is True
    assert (data["tensorrt-llm"]["per_layer_heads"], data["tensorrt-llm"]["per_layer_ffn"]) == (False, True)
    assert data["mlc-llm"]["install_hint"] and not data["mlc-llm"]["available"]
    assert {name: b["maturity"] for name, b in data.items()} == {
        "pytorch": "verified on cpu, cuda",
        "llama.cpp": "verified on cpu",
        "pytorch-compiled": "verified on cpu",
        "onnxruntime": "verified on cpu",
        "tensorrt-llm": "experimental: not yet run on hardware",
        "mlc-llm": "experimental: not yet run on hardware",
    }
    assert "samples constructed from that source" in data["tensorrt-llm"]["maturity_note"]
    assert data["mlc-llm"]["verified"] is False and data["pytorch"]["maturity_note"] == ""
    text = " ".join(run("backends", check_rc=0).stdout.split())  # lines wrap at the console width
    for word in (
        "pytorch",
        "tensorrt-llm",
        "mlc-llm",
        "unavailable",
        "uniform only",
        "pip install tensorrt-llm",
        "tensorrt-llm: tensorrt_llm is not installed. Experimental: not yet run on hardware (written against",
    ):
        assert word in text


def test_profile_device_reports_cpu_and_benchmarks(tmp_path):
    data = json.loads(run("profile-device", "--no-bench", "--json", check_rc=0).stdout)
    assert data["device"] == "cpu" and data["slug"].startswith("cpu-") and data["cpu"]["threads"] >= 1
    assert "microbench" not in data
    data = json.loads(run("profile-device", "--quick", "--json", "--out", str(tmp_path), check_rc=0).stdout)
    bench = data["microbench"]
    assert bench["memory_bw_gbps"] > 0 and bench["dispatch_overhead_us"] > 0
    assert bench["matmul"]["float32"]["gemm_tflops"] > 0 and bench["matmul"]["float32"]["gemv_bw_gbps"] > 0
    assert (tmp_path / data["slug"] / "device.json").is_file()


def test_predicted_table_and_roofline_warning(tmp_path):
    run(
        "build-lut",
        "--predict",
        "--device",
        "rtx-a5000",
        "--backend",
        "tensorrt-llm",
        "--model",
        "llama2-7b",
        "--out",
        str(tmp_path),
        check_rc=0,
    )
    table = tmp_path / "rtx-a5000" / "tensorrt-llm" / "llama2-7b-float16.csv"
    assert table.is_file()
    proc = run("select", "--lut", str(table), "--budget-ms", "20", "--metric", "tpot", "--json", check_rc=0)
    assert "roofline" in proc.stderr and json.loads(proc.stdout)["predicted_ms"]["source"] == "roofline"
    assert json.loads(proc.stdout)["warning"].startswith("computed (roofline)")
    assert (
        run(
            "build-lut",
            "--predict",
            "--device",
            "rtx-9999",
            "--backend",
            "tensorrt-llm",
            "--model",
            "llama2-7b",
            "--out",
            str(tmp_path),
        ).returncode
        == 2
    )
    assert (
        run(
            "build-lut",
            "--predict",
            "--device",
            "rtx-a5000",
            "--backend",
            "tensorrt-llm",
            "--model",
            "llama2-7b",
            "--whole",
            "32x1",
            "--out",
            str(tmp_path),
        ).returncode
        == 2
    )


def test_validate_writes_model_rows_back(built):
    before = json.loads(run("show", "--lut", str(built), "--json", check_rc=0).stdout)["rows"]["model/ok"]
    data = json.loads(
        run(
            "validate",
            "--lut",
            str(built),
            "--budget-ms",
            "1000",
            "--top-k",
            "3",
            "--quick",
            "--prompt-len",
            "16",
            "--gen-len",
            "30",
            "--json",
            check_rc=0,
        ).stdout
    )
    assert len(data["validated"]) == 3 and data["kendall_tau"] is not None and data["device_drift"] > 0
    for row in data["validated"]:
        assert row["measured_ms"] > 0 and row["breaks_budget"] is False and abs(row["error_pct"]) < 200
        assert row["fresh_predicted_ms"] > 0 and abs(row["composition_error_pct"]) < 200
    after = json.loads(run("show", "--lut", str(built), "--json", check_rc=0).stdout)["rows"]["model/ok"]
    assert after > before


def test_plot_writes_pngs(built, tmp_path):
    proc = run(
        "plot",
        "--lut",
        str(built),
        "--out",
        str(tmp_path),
        "--budget-ms",
        "1",
        "--prompt-len",
        "16",
        "--gen-len",
        "30",
        check_rc=0,
    )
    for name in ("pareto.png", "heatmap_prefill.png", "heatmap_decode.png", "validation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stdout


def test_select_per_layer_memory_and_export(built, tmp_path):
    data = json.loads(
        run(
            "select",
            "--lut",
            str(built),
            "--budget-ms",
            "1000",
            "--prompt-len",
            "16",
            "--gen-len",
            "30",
            "--per-layer",
            "--memory-gb",
            "1",
            "--export",
            str(tmp_path / "pick"),
            "--json",
            check_rc=0,
        ).stdout
    )
    assert data["per_layer"]["quality"] >= data["quality"] - 1e-9 and data["memory_gb"] <= 1
    assert [f["name"] for f in data["exported"]["files"]] == [
        "subnet.json",
        "config.json",
        "mlc-chat-config.json",
        "export.json",
    ]
    assert all((tmp_path / "pick" / f["name"]).is_file() for f in data["exported"]["files"])
    assert set(data["per_layer"]["predicted_ms"]) == {"value", "source"}
    assert set(data["predicted_ms"]) == {"value", "source", "se", "interval_90", "p_within_budget"}
    text = run(
        "select",
        "--lut",
        str(built),
        "--budget-ms",
        "1000",
        "--prompt-len",
        "16",
        "--gen-len",
        "30",
        "--per-layer",
        check_rc=0,
    ).stdout
    per_layer = data["per_layer"]["subnet"]["layers"]
    assert f"layers {per_layer[0]['index']}" in text and f"{per_layer[0]['heads']} heads" in text
    proc = run(
        "select",
        "--lut",
        str(built),
        "--budget-ms",
        "1000",
        "--prompt-len",
        "16",
        "--gen-len",
        "30",
        "--memory-gb",
        "0.000001",
        check_rc=1,
    )
    assert "smallest needs" in proc.stderr


def test_difference_method_end_to_end(tmp_path):
    """build-lut --method difference fits layer rows from whole models; select and validate use them."""
    from conftest import TINY_CONFIG

    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "lut"
    proc = run(
        "build-lut",
        "--model",
        str(config),
        "--out",
        str(out),
        "--quick",
        "--method",
        "difference",
        "--depths",
        "1,2,4",
        "--widths",
        "1,1/2",
        "--prompt-len",
        "16",
        "--contexts",
        "16,64",
        check_rc=0,
    )
    assert "method: difference (requested with --method)" in proc.stderr
    data = json.loads(run("show", "--lut", str(out), "--json", check_rc=0).stdout)
    assert data["method"] == "difference" and data["rows"]["layer/ok"] == 9 and data["rows"]["base/ok"] == 3
    assert data["versions"]["torch"] and data["backend_config"]["device"] == "cpu" and data["fit"]
    methods = {row["component"]: row["method"] for row in data["table"]}
    assert methods == {"layer": "difference", "base": "difference", "model": "whole"}
    pick = json.loads(
        run(
            "select",
            "--lut",
            str(out),
            "--budget-ms",
            "1000",
            "--prompt-len",
            "16",
            "--gen-len",
            "30",
            "--json",
            check_rc=0,
        ).stdout
    )
    assert pick["subnet"]["num_layers"] == 4
    checked = json.loads(
        run(
            "validate",
            "--lut",
            str(out),
            "--budget-ms",
            "1000",
            "--top-k",
            "1",
            "--quick",
            "--prompt-len",
            "16",
            "--gen-len",
            "30",
            "--json",
            check_rc=0,
        ).stdout
    )
    assert checked["validated"][0]["measured_ms"] > 0
    assert run("build-lut", "--model", str(config), "--out", str(out), "--method", "guess").returncode == 2


def test_backend_options_are_checked(tmp_path):
    proc = run("build-lut", "--model", "tinyllama-1.1b", "--out", str(tmp_path), "--backend-option", "mode", check_rc=2)
    assert "KEY=VALUE" in proc.stderr
    proc = run(
        "build-lut", "--model", "tinyllama-1.1b", "--out", str(tmp_path), "--backend-option", "mode=default", check_rc=2
    )
    assert "backend 'pytorch' has no option ['mode']" in proc.stderr
    proc = run(
        "build-lut",
        "--model",
        "tinyllama-1.1b",
        "--out",
        str(tmp_path),
        "--backend",
        "pytorch-compiled",
        "--backend-option",
        "mode=reduce-overhead",
        check_rc=2,
    )
    assert "CUDA graphs" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_compiled_flow_end_to_end(tmp_path):
    """build-lut --backend pytorch-compiled: its own table folder, difference by default, mode in the sidecar."""
    from conftest import TINY_CONFIG

    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "lut"
    proc = run(
        "build-lut",
        "--backend",
        "pytorch-compiled",
        "--backend-option",
        "mode=default",
        "--model",
        str(config),
        "--out",
        str(out),
        "--quick",
        "--depths",
        "1,2,4",
        "--widths",
        "1",
        "--prompt-len",
        "16",
        "--contexts",
        "16,32",
        check_rc=0,
    )
    assert "method: difference (the compiled flow has no lone components" in proc.stderr
    assert "/pytorch-compiled/tiny-float32.csv" in proc.stdout and "recompiled" not in proc.stderr
    data = json.loads(run("show", "--lut", str(out), "--json", check_rc=0).stdout)
    assert data["backend"] == "pytorch-compiled" and data["backend_config"]["mode"] == "default"
    assert data["rows"]["layer/ok"] == 3 and data["rows"]["model/unsupported"] == 3


def test_select_says_when_the_pick_rests_on_flagged_rows(tmp_path, tiny_arch):
    from conftest import synthetic_lut

    from amoeba_profile.table.lut import write_table

    lut = synthetic_lut(
        tiny_arch,
        lambda h, phase, c: 0.3 * h,
        lambda f, phase: 0.01 * f,
        lambda phase, c: 2.0,
        meta={"dtype": "float32"},
    )
    noisy = (lut.frame.component == "attn") & (lut.frame.heads == 8) & (lut.frame.phase == "decode")
    lut.frame.loc[noisy, "flags"] = "high_cv;contended"
    lut.frame.loc[noisy, "host_contention"] = 0.8
    table = tmp_path / "t.csv"
    write_table(table, lut.frame, lut.meta)
    args = ("select", "--lut", str(table), "--budget-ms", "1000", "--prompt-len", "16", "--gen-len", "20")
    proc = run(*args, "--json", check_rc=0)
    data = json.loads(proc.stdout)
    pick = data["flagged_rows"]["pick"]
    assert data["subnet"]["num_layers"] == 4 and len(pick) == 2  # decode attention at contexts 16 and 64
    assert {r["row"].split("|")[4] for r in pick} == {"c16", "c64"}
    assert all(r["flags"] == ["high_cv", "contended"] and r["host_contention"] == 0.8 for r in pick)
    assert data["warning"] == data["measurement_warning"]
    assert data["warning"].startswith("the pick rests on 2 disturbed rows (contended 2, high_cv 2)")
    assert "build-lut --busy wait" in data["warning"] and "build-lut --busy wait" in proc.stderr
    proc = run(*args, check_rc=0)
    assert proc.stderr.startswith("warning: the pick rests on 2 disturbed rows")
    assert "flagged table rows behind the answer" in proc.stdout and "attn|decode|b1|t1|c64|h8" in proc.stdout
    assert "high_cv, contended" in proc.stdout and "80%" in proc.stdout


def test_readme_synopsis_lists_every_measuring_backend_and_option():
    """The README's CLI synopsis of build-lut names each measuring backend and every option of
    ``build-lut --help``."""
    import re

    from amoeba_profile.backends import REGISTRY

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    synopsis = readme.split("## CLI", 1)[1].split("```text", 1)[1].split("amoeba-profile select", 1)[0]
    assert sorted(re.search(r"--backend (\S+)", synopsis).group(1).split("|")) == sorted(REGISTRY)
    options = set(re.findall(r"(--[a-z][a-z-]+)", run("build-lut", "--help", check_rc=0).stdout)) - {"--help"}
    predict_only = {"--predict", "--calibrate", "--device-profile"}  # the --predict synopsis line has them
    missing = sorted(o for o in options - predict_only if o not in synopsis)
    assert not missing, missing
