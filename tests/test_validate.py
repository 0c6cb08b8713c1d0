"""validate through its journal: a kill -9 loses nothing and leaves no temp folder, and a table
that cannot be written still gets the results shown, with the journal kept for the write."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from amoeba_profile.table.lut import load_table

CLI = [sys.executable, "-m", "amoeba_profile.cli.main"]
PROVENANCE = re.compile(r"(\d+) entries measured now, (\d+) taken from the journal")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import write_tiny_config

    root = tmp_path_factory.mktemp("validate")
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
            "components",  # validate's journal is counted for a components table
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(built, tmp_path):
    shutil.copytree(built, tmp_path / "lut")
    table = next((tmp_path / "lut").rglob("*.csv"))
    return table, table.with_name(table.name + ".validate.journal.jsonl")


def _validate(table, *extra):
    return [
        *CLI,
        "validate",
        "--lut",
        str(table),
        "--budget-ms",
        "1000",
        "--prompt-len",
        "16",
        "--gen-len",
        "30",
        "--quick",
        *extra,
    ]


def _ours(tmpdir):
    """What the run left in its TMPDIR, apart from torch's own compile cache."""
    return [p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor")]


def test_validate_resumes_after_kill_9_without_temp_folders(built, tmp_path):
    table, journal = _copy(built, tmp_path)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    args = _validate(table, "--top-k", "2", "--json")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (journal.exists() and len(journal.read_bytes().splitlines()) >= 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in journal.read_text().splitlines()[1:] if line.endswith("}")]
    models = [r for r in before if r["key"].startswith("model|") and r["status"] == "ok"]
    assert models, "validate journaled no model result before it was killed"
    assert _ours(scratch) == []

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert len(json.loads(rerun.stdout)["validated"]) == 2
    counts = PROVENANCE.search(rerun.stderr)
    assert counts and int(counts[1]) > 0, rerun.stderr
    assert not journal.exists() and _ours(scratch) == []
    rows = {
        r["subnet_id"] + r["phase"] + str(r["context"]): r
        for r in load_table(table).frame.to_dict("records")
        if r["component"] == "model"
    }
    for record in models:  # the killed run's samples are in the rows, and each round counted once
        component, phase, _, _, context, *_, subnet = record["key"].split("|")
        row = rows[subnet[1:] + phase + context[1:]]
        stored = json.loads(row["samples_ms"])
        assert all(any(abs(s - x) < 1e-4 for x in stored) for s in record["samples_ms"])
        assert row["rounds"] in (2, 3)


def test_read_only_table_shows_results_and_keeps_the_journal(built, tmp_path):
    table, journal = _copy(built, tmp_path)
    rows_before = len(load_table(table).frame)
    table.chmod(0o444)
    first = subprocess.run(_validate(table, "--top-k", "2"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 1
    assert "validation: predicted vs measured" in first.stdout and "device drift" in first.stdout
    error = first.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: could not write the validation rows into {table}") and "read-only" in error
    assert f"kept in {journal} - rerun the same command" in error and journal.exists()
    # Another command does not mix into the kept journal.
    other = subprocess.run(_validate(table, "--top-k", "1"), capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and "unfinished run with other options" in other.stderr

    table.chmod(0o644)
    again = subprocess.run(_validate(table, "--top-k", "2", "--json"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    counts = PROVENANCE.search(again.stderr)
    assert counts and int(counts[1]) == 0 and int(counts[2]) > 0, again.stderr
    assert not journal.exists() and len(load_table(table).frame) > rows_before
    measured = [v["measured_ms"] for v in json.loads(again.stdout)["validated"]]
    assert all(f"{m:.1f}" in first.stdout for m in measured)  # the same measurements, now written
