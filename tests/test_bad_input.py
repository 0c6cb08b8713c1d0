"""Hostile and bad input is refused up front, in one line, with exit 2 (usage) or 1 (a bad table).

The CLI calls run in-process through ``cli.main`` (the console entry point), so a handful of them
stay quick; every one fails before anything is measured or written.
"""

import json
import subprocess
import sys

import pytest
from conftest import TINY_CONFIG, synthetic_lut

from amoeba_profile.cli import main as cli
from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.inputs import finite_float, positive_float, positive_int, read_bounded
from amoeba_profile.core.workload import Workload
from amoeba_profile.device import resolve_device
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.table.lut import write_table


def run_main(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of ``amoeba-profile ARGS`` run through the entry point in-process."""
    monkeypatch.setattr(sys, "argv", ["amoeba-profile", *args])
    monkeypatch.setitem(cli._state, "debug", False)
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    arch = ModelArch("tiny", 64, 4, 8, 4, 8, 128, 256, max_position=512)
    lut = synthetic_lut(
        arch,
        lambda h, p, c: 1 + 0.1 * h + 0.001 * c,
        lambda f, p: 1 + 0.01 * f,
        lambda p, c: 2 + 0.001 * c,
        meta={"dtype": "float32", "device_slug": "cpu-test", "backend": "pytorch"},
    )
    path = tmp_path_factory.mktemp("bad") / "tiny-float32.csv"
    write_table(path, lut.frame, lut.meta)
    return path


def _config(tmp_path, name="cfg", **change):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, **change}))
    return str(folder / "config.json")


def test_bad_input_is_one_line_and_exit_2(tmp_path, table, monkeypatch, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    quality = tmp_path / "q.csv"
    quality.write_text("num_layers,width_ratio,score\n4,1,inf\n")
    zeros = tmp_path / "importance.csv"
    zeros.write_text("layer,importance\n0,0\n1,0\n2,0\n3,0\n")
    lut = str(table)
    select = ["select", "--lut", lut, "--prompt-len", "16", "--gen-len", "20"]
    out = str(tmp_path / "lut")
    cases = {
        "budget inf": ([*select, "--budget-ms", "inf"], "--budget-ms must be a finite number, got inf"),
        "budget nan": ([*select, "--budget-ms", "nan"], "--budget-ms must be a finite number, got nan"),
        "budget 0": ([*select, "--budget-ms", "0"], "--budget-ms must be a positive number, got 0.0"),
        "memory nan": ([*select, "--budget-ms", "100", "--memory-gb", "nan"], "--memory-gb must be a finite number"),
        "batch 0": (
            [*select, "--budget-ms", "100", "--batch", "0"],
            "workload batch must be a positive integer, got 0",
        ),
        "budget text": ([*select, "--budget-ms", "abc"], "Invalid value for '--budget-ms'"),
        "quality inf": ([*select, "--budget-ms", "100", "--quality", str(quality)], "score must be a finite number"),
        "importance zeros": (
            [*select, "--budget-ms", "100", "--per-layer", "--importance", str(zeros)],
            "every importance is 0",
        ),
        "importance without per-layer": (
            [*select, "--budget-ms", "100", "--importance", str(zeros)],
            "--importance weighs the layers of the per-layer optimum: add --per-layer",
        ),
        "strategy /dev/zero": ([*select, "--budget-ms", "100", "--strategy", "/dev/zero"], "not a regular file"),
        "validate inf": (["validate", "--lut", lut, "--budget-ms", "inf"], "--budget-ms must be a finite number"),
        "plot nan": (
            ["plot", "--lut", lut, "--budget-ms", "nan", "--out", str(tmp_path / "p")],
            "--budget-ms must be a finite number, got nan",
        ),
        "plot out is a file": (["plot", "--lut", lut, "--out", str(a_file)], f"--out {a_file}: a file is in the way"),
        "build out is a file": (
            ["build-lut", "--model", _config(tmp_path), "--out", str(a_file), "--prompt-len", "16", "--contexts", "16"],
            f"--out {a_file}: a file is in the way",
        ),
        "device tpu": (
            ["build-lut", "--model", _config(tmp_path), "--out", out, "--device", "tpu"],
            "unknown device 'tpu'",
        ),
        "context above max": (
            ["build-lut", "--model", _config(tmp_path), "--out", out, "--contexts", "1000000"],
            "contexts [1000000] are above cfg's max_position_embeddings 512",
        ),
        "prompt outside contexts": (
            ["build-lut", "--model", _config(tmp_path), "--out", out, "--prompt-len", "32", "--contexts", "64,128"],
            "--prompt-len 32: outside the decode contexts [64, 128]; a request's first decode "
            "step runs at context = its prompt length",
        ),
        "predict prompt outside contexts": (
            [
                "build-lut",
                "--predict",
                "--device",
                "rtx-a5000",
                "--model",
                _config(tmp_path),
                "--out",
                out,
                "--prompt-len",
                "256",
                "--contexts",
                "64,128",
            ],
            "add one of 256 or more to --contexts",
        ),
        "depths under components": (
            ["build-lut", "--model", _config(tmp_path), "--out", out, "--method", "components", "--depths", "1,2,4"],
            "--depths sets the model depths the difference method fits; "
            "this build uses the components method (--method components)",
        ),
        "batch 0 option": (
            ["build-lut", "--model", _config(tmp_path), "--out", out, "--batch", "0"],
            "Invalid value for '--batch'",
        ),
        "threads 0": (
            ["build-lut", "--model", _config(tmp_path), "--out", out, "--threads", "0"],
            "--threads must be a positive integer, got 0",
        ),
        "hidden 1e7": (
            ["build-lut", "--model", _config(tmp_path, "wide", hidden_size=10**7), "--out", out],
            "available; lower --contexts",
        ),
        "hidden 1e40": (
            ["build-lut", "--model", _config(tmp_path, "huge", hidden_size=10**40), "--out", out],
            "field 'hidden_size'=10000000000000000000000000000000000000000 is above the maximum",
        ),
        "kv heads 0": (
            ["build-lut", "--model", _config(tmp_path, "nokv", num_key_value_heads=0), "--out", out],
            "field 'num_key_value_heads' must be a positive integer, got 0",
        ),
        "profile tpu": (["profile-device", "--device", "tpu", "--no-bench"], "unknown device 'tpu'"),
    }
    for name, (args, message) in cases.items():
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert code == 2, f"{name}: exit {code}: {err}"
        assert err.startswith("error: ") and message in err, f"{name}: {err}"
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, f"{name}: {err}"
    assert not (tmp_path / "lut").exists()  # no journal, lock or folder from any refused build


def test_a_bad_table_is_one_line_and_exit_1(tmp_path, table, monkeypatch, capsys):
    import hashlib

    from amoeba_profile.table.lut import sidecar_path

    copy = tmp_path / table.name
    text = table.read_text()
    lines = text.splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    cells[header.index("median_ms")] = "inf"
    copy.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    meta = json.loads(sidecar_path(table).read_text())
    meta["content_sha256"] = hashlib.sha256(copy.read_bytes()).hexdigest()
    sidecar_path(copy).write_text(json.dumps(meta))
    code, _, err = run_main(monkeypatch, capsys, "select", "--lut", str(copy), "--budget-ms", "100")
    assert code == 1 and err.startswith(f"error: {copy}: row 1 (line 2): latency stats median=inf")
    assert len(err.strip().splitlines()) == 1


def test_profile_device_cuda_without_cuda_is_one_line(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_main(monkeypatch, capsys, "profile-device", "--device", "cuda", "--no-bench")
    assert code == 2 and err.startswith(
        "error: device 'cuda' requested but torch sees 0 CUDA device(s); use --device cpu"
    )
    assert err.count("\n") == 1


def test_multi_line_messages_render_as_one_line(monkeypatch, capsys):
    def broken(*_args, **_kwargs):
        raise UsageError("first line\n  second line\n")

    monkeypatch.setattr(cli, "load_one", broken)
    code, _, err = run_main(monkeypatch, capsys, "show", "--lut", "x")
    assert code == 2 and err == "error: first line second line\n"


def test_entry_point_in_a_real_process(table):
    """The console script itself: a parser error and one of ours, each one line."""
    for args in (
        ["select", "--lut", str(table), "--budget-ms", "abc"],
        ["select", "--lut", str(table), "--budget-ms", "inf"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "amoeba_profile.cli.main", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "amoeba_profile.cli.main"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "build-lut" in proc.stdout


def test_one_validator_per_concept():
    assert positive_int(3, "n") == 3 and positive_float(0.5, "x") == 0.5 and finite_float(-1, "y") == -1.0
    for bad in (0, -1, True, 1.0, "2"):
        with pytest.raises(UsageError, match="must be a positive integer"):
            positive_int(bad, "n")
    for bad in (0, -1.0, float("inf"), float("nan"), "1", False):
        with pytest.raises(UsageError, match="x must be a"):
            positive_float(bad, "x")


def test_devices_are_checked_before_anything_runs():
    assert resolve_device("cpu") == ("cpu", "requested")
    for bad in ("tpu", "cpu:0", "cuda:x", "", "cuda:0:1"):
        with pytest.raises(UsageError, match="unknown device"):
            resolve_device(bad)
    with pytest.raises(UsageError, match="spec-sheet entry.*--predict"):
        resolve_device("rtx-a5000")


def test_plan_and_workload_refuse_bad_sizes(tiny_arch):
    with pytest.raises(UsageError, match=r"contexts \[1024\] are above tiny's max_position_embeddings 512"):
        BuildPlan(tiny_arch, contexts=(16, 1024))
    with pytest.raises(UsageError, match=r"prompt lengths \[513\] are above"):
        BuildPlan(tiny_arch, prompt_lens=(513,), contexts=(16,))
    with pytest.raises(UsageError, match="batch must be a positive integer, got 0"):
        BuildPlan(tiny_arch, contexts=(16,), batch=0)
    with pytest.raises(UsageError, match="workload gen_len must be a positive integer, got 2.5"):
        Workload(1, 16, 2.5)


def test_read_bounded_refuses_what_is_not_a_small_regular_file(tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", fifo, tmp_path):
        with pytest.raises(UsageError, match="not a regular file"):
            read_bounded(path, 100, "thing")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(UsageError, match="101 bytes, over the 100 bytes limit"):
        read_bounded(big, 100, "thing")
    assert read_bounded(big, 101, "thing") == b"x" * 101
    with pytest.raises(UsageError, match="cannot read thing"):
        read_bounded(tmp_path / "missing", 100, "thing")
