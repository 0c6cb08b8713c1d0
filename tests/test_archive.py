"""scripts/archive.sh: the one archive a device run ends with, tried by its CPU-runnable dry run on a
small synthetic table (no measurement): what it holds, its checksums, and that a table taken out of
it still passes the seal check a contributed table gets (amoeba-profile show)."""

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from amoeba_profile.table.lut import load_table, write_table

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "archive.sh"
CLI = [sys.executable, "-m", "amoeba_profile.cli.main"]


@pytest.fixture
def device_run(tmp_path, tiny_arch):
    """OUT/SLUG as a device script leaves it: a table with a cross-check in its sidecar, device.json,
    raw outputs, a cross-check JSON, and a journal and a lock that are not part of the archive."""
    from conftest import synthetic_lut

    lut = synthetic_lut(
        tiny_arch,
        lambda h, phase, c: 0.3 * h,
        lambda f, phase: 0.01 * f,
        lambda phase, c: 2.0,
        meta={
            "dtype": "float32",
            "device_slug": "cpu-test",
            "versions": {"torch": "2.13.0"},
            "crosschecks": [
                {"tool": {"tool": "generate() timing"}, "at": "now", "agreement_pct": {"ttft_ms": 3.0, "tpot_ms": -2.0}}
            ],
        },
    )
    slug = tmp_path / "lut" / "cpu-test"
    write_table(slug / "pytorch" / "tiny-float32.csv", lut.frame, lut.meta)
    (slug / "device.json").write_text(json.dumps({"slug": "cpu-test"}))
    (slug / "raw" / "llama.cpp").mkdir(parents=True)
    (slug / "raw" / "llama.cpp" / "llama-bench.jsonl").write_text('{"stdout": "[]"}\n')
    (slug / "crosscheck").mkdir()
    (slug / "crosscheck" / "pytorch-tiny.json").write_text('{"agreement_pct": {"ttft_ms": 3.0}}')
    (slug / "pytorch" / "tiny-float32.csv.journal.jsonl").write_text("{}\n")
    (slug / "pytorch" / "tiny-float32.csv.lock").write_text("")
    return tmp_path / "lut"


def _archive(*args, cwd):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_dry_run_archive_holds_tables_raw_outputs_crosschecks_and_environment(device_run, tmp_path):
    archive = tmp_path / "out" / "run.tar.gz"
    proc = _archive(
        "--dry-run", str(archive), str(device_run), "cpu-test", f"pytorch={sys.executable}", cwd=SCRIPT.parents[1]
    )
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(archive) as tar:
        names = sorted(m.name.removeprefix("amoeba-profile-cpu-test/") for m in tar.getmembers() if m.isfile())
        tar.extractall(tmp_path / "x", filter="data")
    assert names == [
        "MANIFEST.sha256",
        "archive.json",
        "crosscheck/pytorch-tiny.json",
        "env/nvidia-smi-q.txt",
        "env/pip-freeze-pytorch.txt",
        "env/uname.txt",
        "raw/llama.cpp/llama-bench.jsonl",
        "tables/device.json",
        "tables/pytorch/tiny-float32.csv",
        "tables/pytorch/tiny-float32.meta.json",
    ]
    root = tmp_path / "x" / "amoeba-profile-cpu-test"
    manifest = dict(line.split("  ./")[::-1] for line in (root / "MANIFEST.sha256").read_text().splitlines())
    assert set(manifest) == set(names) - {"MANIFEST.sha256"}
    assert all(hashlib.sha256((root / n).read_bytes()).hexdigest() == h for n, h in manifest.items())
    assert "pytest==" in (root / "env" / "pip-freeze-pytorch.txt").read_text()  # this environment's freeze
    assert "not recorded: nvidia-smi" in (root / "env" / "nvidia-smi-q.txt").read_text()
    meta = json.loads((root / "archive.json").read_text())
    assert meta["slug"] == "cpu-test" and meta["dry_run"] is True
    table = root / "tables" / "pytorch" / "tiny-float32.csv"
    assert load_table(table).meta.crosschecks[0]["agreement_pct"] == {"ttft_ms": 3.0, "tpot_ms": -2.0}
    show = subprocess.run([*CLI, "show", "--lut", str(table), "--json"], capture_output=True, text=True, timeout=120)
    assert show.returncode == 0 and json.loads(show.stdout)["versions"] == {"torch": "2.13.0"}


def test_an_archive_from_a_device_needs_its_state_and_a_real_folder(device_run, tmp_path):
    with_tools = subprocess.run(
        ["bash", "-c", "command -v nvidia-smi || test -f /etc/nv_tegra_release"], capture_output=True
    )
    if with_tools.returncode == 0:
        pytest.skip("this machine has nvidia-smi or is a Jetson: the device state is there to record")
    proc = _archive(str(tmp_path / "a.tar.gz"), str(device_run), "cpu-test", cwd=SCRIPT.parents[1])
    assert proc.returncode == 1 and "nvidia-smi not found" in proc.stderr and not (tmp_path / "a.tar.gz").exists()
    proc = _archive("--dry-run", str(tmp_path / "a.tar.gz"), str(device_run), "no-such-slug", cwd=SCRIPT.parents[1])
    assert proc.returncode == 2 and "no folder" in proc.stderr
    proc = _archive("--dry-run", str(tmp_path / "a.zip"), str(device_run), "cpu-test", cwd=SCRIPT.parents[1])
    assert proc.returncode == 2 and "must end in .tar.gz" in proc.stderr
