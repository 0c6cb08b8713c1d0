"""select --verify K: the final answer measured whole, without writing the table unless asked."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from amoeba_profile.table.lut import load_table

CLI = [sys.executable, "-m", "amoeba_profile.cli.main"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import write_tiny_config

    root = tmp_path_factory.mktemp("verify")
    config = write_tiny_config(root)
    out = root / "lut"
    proc = subprocess.run(
        [
            *CLI,
            "build-lut",
            "--model",
            str(config),
            "--out",
            str(out),
            "--quick",
            "--prompt-len",
            "16",
            "--contexts",
            "16,64",
            "--widths",
            "1,1/2",
            "--method",
            "components",  # no whole-model rows yet: what --write-back adds is all there is
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return next(out.rglob("*.csv"))


def _select(table, *extra):
    return subprocess.run(
        [
            *CLI,
            "select",
            "--lut",
            str(table),
            "--budget-ms",
            "1000",
            "--prompt-len",
            "16",
            "--gen-len",
            "30",
            "--quick",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_verify_measures_the_best_candidates_and_leaves_the_table_alone(built, tmp_path):
    table = tmp_path / built.name
    shutil.copy(built, table)
    shutil.copy(built.with_name(built.stem + ".meta.json"), table.with_name(table.stem + ".meta.json"))
    before = hashlib.sha256(table.read_bytes()).hexdigest()
    proc = _select(table, "--verify", "2")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    verified = data["verified"]
    assert len(verified["candidates"]) == 2 and verified["measured_entries"] == 2 * 3  # ttft + 2 decode contexts
    assert all(c["measured_ms"] > 0 and c["fits"] for c in verified["candidates"])  # 1000 ms: every shape fits
    assert verified["pick"] == verified["candidates"][0]["subnet_id"] == data["subnet_id"]
    assert hashlib.sha256(table.read_bytes()).hexdigest() == before
    assert not table.with_name(table.name + ".verify.journal.jsonl").exists()


def test_write_back_adds_the_measured_models(built, tmp_path):
    table = tmp_path / built.name
    shutil.copy(built, table)
    shutil.copy(built.with_name(built.stem + ".meta.json"), table.with_name(table.stem + ".meta.json"))
    proc = _select(table, "--verify", "1", "--write-back")
    assert proc.returncode == 0, proc.stderr
    pick = json.loads(proc.stdout)["verified"]["pick"]
    lut = load_table(table)
    assert set(lut.frame[lut.frame.component == "model"].subnet_id) == {pick}
    assert "verify" in lut.meta.later_builds[-1]


def test_write_back_without_verify_is_a_usage_error(built):
    proc = _select(built, "--write-back")
    assert proc.returncode == 2 and "--verify" in proc.stderr
