"""Cross-checks: a measured table's full-model prediction against the flow's own benchmark tool,
stored in the table's sidecar. The PyTorch tool (optimum-benchmark-style generate() timing) runs
here on a tiny model; the other flows' command lines and parsers are tested in their backend files."""

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from amoeba_profile.core.errors import LutError
from amoeba_profile.core.schema import meta_fields
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.workload import Workload
from amoeba_profile.measure.crosscheck import Crosscheck, default_workload, store
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_table

CLI = [sys.executable, "-m", "amoeba_profile.cli.main"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import write_tiny_config

    root = tmp_path_factory.mktemp("crosscheck")
    out = root / "lut"
    proc = subprocess.run(
        [
            *CLI,
            "build-lut",
            "--model",
            str(write_tiny_config(root)),
            "--out",
            str(out),
            "--quick",
            "--prompt-len",
            "16",
            "--contexts",
            "16,64",
            "--widths",
            "1,1/2",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return next(out.rglob("*.csv"))


def _copy(built, tmp_path):
    folder = tmp_path / "lut"
    shutil.copytree(built.parent, folder)
    return folder / built.name


def test_pytorch_crosscheck_times_generate_and_stores_the_agreement(built, tmp_path):
    table = _copy(built, tmp_path)
    before = table.read_bytes()
    proc = subprocess.run(
        [
            *CLI,
            "crosscheck",
            "--lut",
            str(table),
            "--prompt-len",
            "16",
            "--gen-len",
            "12",
            "--repetitions",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["tool"]["tool"] == "generate() timing (optimum-benchmark style)" and data["backend"] == "pytorch"
    assert data["workload"] == {"batch": 1, "prompt_len": 16, "gen_len": 12} and data["subnet"] == "L4-w1.000"
    samples = json.loads(data["tool"]["raw"])
    assert len(samples["ttft_samples_ms"]) == len(samples["e2e_samples_ms"]) == 3 and samples["threads"] == 1
    ttft = statistics.median(samples["ttft_samples_ms"])
    assert data["tool_ms"]["ttft_ms"] == pytest.approx(ttft)
    assert data["tool_ms"]["tpot_ms"] == pytest.approx((statistics.median(samples["e2e_samples_ms"]) - ttft) / 11)
    lut = load_table(table)  # the CSV is untouched and still sealed by the sidecar
    assert table.read_bytes() == before
    full = Subnet.uniform(lut.arch, lut.arch.num_layers, 1.0)
    predicted = Predictor(lut).predict(full, Workload(1, 16, 12))
    assert data["predicted_ms"]["ttft_ms"] == pytest.approx(predicted.ttft_ms)
    assert data["predicted_ms"]["tpot_ms"] == pytest.approx(predicted.tpot_ms)
    for metric in ("ttft_ms", "tpot_ms"):
        tool = data["tool_ms"][metric]
        assert tool > 0 and data["agreement_pct"][metric] == pytest.approx(
            100 * (predicted.metric(metric) - tool) / tool
        )
    (stored,) = lut.meta.crosschecks
    assert stored == data and stored["table_sha256"] == lut.meta.content_sha256
    show = subprocess.run([*CLI, "show", "--lut", str(table)], capture_output=True, text=True, timeout=120)
    line = next(l for l in show.stdout.splitlines() if l.startswith("crosschecks:"))
    assert f"ttft {data['agreement_pct']['ttft_ms']:+.1f} %" in line


def test_default_workload_stays_inside_the_table(built):
    lut = load_table(built)
    workload = default_workload(lut)  # prompts [16], contexts [16, 64]: decode steps at 16..64
    assert (workload.batch, workload.prompt_len, workload.gen_len) == (1, 16, 50)
    Predictor(lut).predict(Subnet.uniform(lut.arch, 4, 1.0), workload)  # no OutOfRange
    without = type(lut)(lut.frame, {**meta_fields(lut.meta), "grid": {}}, lut.path)
    with pytest.raises(LutError, match="pass --prompt-len and --gen-len"):
        default_workload(without)


def test_a_check_of_a_table_changed_meanwhile_is_not_stored(built, tmp_path):
    from amoeba_profile.backends import ToolResult

    table = _copy(built, tmp_path)
    lut = load_table(table)
    tool = ToolResult("t", ("t",), 1.0, 0.5, "", "")
    check = Crosscheck(
        table,
        "0" * 64,
        "pytorch",
        lut.meta.device_slug,
        Subnet.uniform(lut.arch, 4, 1.0),
        Workload(1, 16, 12),
        "median",
        {"ttft_ms": 1.1, "tpot_ms": 0.5, "e2e_ms": 6.6},
        tool,
        {},
        "now",
    )
    with pytest.raises(LutError, match="changed while the cross-check ran"):
        store(check)
    assert load_table(table).meta.crosschecks is None
    assert check.agreement_pct == pytest.approx({"ttft_ms": 10.0, "tpot_ms": 0.0})


def test_a_roofline_table_has_no_tool_to_check():
    shipped = Path(__file__).resolve().parents[1] / "lut" / "rtx-a5000" / "tensorrt-llm" / "llama2-7b-float16.csv"
    proc = subprocess.run([*CLI, "crosscheck", "--lut", str(shipped)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "roofline table has no backend" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
