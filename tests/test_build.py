"""Builds on a tiny architecture: resume after kill -9, locking, OOM rows, reuse of finished tables."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from amoeba_profile.backends import get_backend
from conftest import FAST_PROTOCOL

from amoeba_profile.core.arch import resolve_arch
from amoeba_profile.core.errors import LutError
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.table.lut import load_table


def _plan(arch, **kw):
    return BuildPlan(arch, (1.0, 0.5), (16,), (16, 32), **kw)


def _too_noisy(frame):
    """Rows a busy machine left without a number: a serving-loop difference (tpot) that noise drove
    below zero is stored as an error saying so, never as a latency."""
    return (frame.status == "error") & frame.note.str.contains("is not positive")


def test_build_writes_complete_table(tmp_path, tiny_arch):
    backend = get_backend("pytorch")
    whole = Subnet.uniform(tiny_arch, 3, 0.5)
    plan = _plan(tiny_arch, whole=(whole,))
    seen = []
    result = run_build(plan, backend, tmp_path, FAST_PROTOCOL, lambda d, t, label: seen.append((d, t, label)))
    lut = load_table(result.path)
    assert len(lut.frame) == len(plan.entries()) == result.measured
    assert ((lut.frame.status == "ok") | _too_noisy(lut.frame)).all()
    assert set(lut.frame.component) == {"attn", "mlp", "base", "model"}
    assert (lut.frame.n >= FAST_PROTOCOL.rounds * FAST_PROTOCOL.samples_per_round).all()
    assert lut.meta.device_slug and lut.meta.backend_env["torch"] and lut.meta.protocol["rounds"] == 2
    assert lut.frame[lut.frame.component == "model"].subnet_id.eq(whole.id).all()
    assert seen[-1][0] == seen[-1][1]
    labels = {label for _, _, label in seen}
    assert (
        "round 1/2: attn prefill 16 tok, 8 heads (4 kv)" in labels and "round 2/2: model L3 w1/2 decode @32" in labels
    )
    assert not any("|" in label for label in labels)  # internal keys stay out of the progress bar
    assert not list(tmp_path.rglob("*.journal.jsonl"))
    # A second build of the same plan measures nothing, keeps every row and leaves the files alone.
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in result.path.parent.iterdir()}
    again = run_build(plan, backend, tmp_path, FAST_PROTOCOL)
    assert again.measured == 0 and again.reused == len(plan.entries()) and again.written is False
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in result.path.parent.iterdir()} == files
    # A wider plan measures only what is new, and logs itself once however often it is rerun.
    wider = BuildPlan(tiny_arch, (1.0, 0.5), (16,), (16, 32, 64), whole=(whole,))
    third = run_build(wider, backend, tmp_path, FAST_PROTOCOL)
    assert third.reused == len(plan.entries()) and third.measured == len(wider.entries()) - len(plan.entries())
    assert third.written and len(load_table(third.path).meta.later_builds) == 1
    assert run_build(wider, backend, tmp_path, FAST_PROTOCOL).written is False
    assert len(load_table(third.path).meta.later_builds) == 1


def test_a_build_asking_more_rounds_remeasures_the_rows_a_coarser_build_left(tmp_path, tiny_arch):
    """A --quick table is not a full one: a build whose protocol asks more rounds or samples than a
    row holds measures that entry again, and its row is replaced; one asking less keeps the table."""
    from amoeba_profile.cli.report import build_protocols

    backend = get_backend("pytorch")
    plan = BuildPlan(tiny_arch, (1.0,), (16,), (16,))
    coarse = run_build(plan, backend, tmp_path, FAST_PROTOCOL)  # 2 rounds x 2 samples (3 rounds if noisy)
    fuller = TimingProtocol(warmup_min=1, warmup_max=2, rounds=3, samples_per_round=3, min_round_s=0.0)
    result = run_build(plan, backend, tmp_path, fuller)
    assert result.written and result.remeasured == len(plan.entries()) == result.measured
    assert result.reused == 0
    lut = load_table(result.path)
    measured = lut.frame[lut.frame.status == "ok"]
    assert len(lut.frame) == len(plan.entries()) and len(measured) > 0
    assert (measured.rounds >= 3).all() and (measured.n >= 9).all()
    assert build_protocols(lut.meta) == ["2 rounds x 2 samples", "3 rounds x 3 samples"]
    # Rows that hold what a build asks, or more, are done.
    assert run_build(plan, backend, tmp_path, fuller).written is False
    again = run_build(plan, backend, tmp_path, FAST_PROTOCOL)
    assert again.written is False and again.remeasured == 0 and coarse.path == again.path


# A real build process that SIGKILLs itself while it measures its 7th (entry, round): a fixed
# point, so the test does not race the build, whatever the machine's load.
_DIE_MEASURING = """
import os, signal, sys
from amoeba_profile.measure import build
from amoeba_profile.cli.main import main
measured, sample = [], build.sample
def sample_or_die(*args, **kwargs):
    measured.append(1)
    if len(measured) == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return sample(*args, **kwargs)
build.sample = sample_or_die
sys.argv[0] = "amoeba-profile"
main()
"""


def test_resume_after_kill_9(tmp_path, tiny_config_path):
    """A real build process is killed mid-way; the rerun finishes with nothing lost or duplicated."""
    args = [
        "build-lut",
        "--model",
        str(tiny_config_path),
        "--out",
        str(tmp_path),
        "--contexts",
        "16,32,64,128",
        "--prompt-len",
        "16",
        "--widths",
        "1,1/2",
        "--whole",
        "4x1,2x1/2",
        "--quick",
        "--method",
        "components",  # the plan below is rebuilt to count its entries
    ]
    # Timeouts are generous: seconds of work on an idle machine, and one thread (conftest) on a busy one.
    killed = subprocess.run([sys.executable, "-c", _DIE_MEASURING, *args], capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    journal = next(tmp_path.rglob("*.journal.jsonl"))
    before = [json.loads(line) for line in journal.read_text().splitlines() if line.strip().endswith("}")]
    done_before = {(r["key"], r["round"]) for r in before if r.get("kind") == "result"}
    assert len(done_before) == 6
    table = journal.with_name(journal.name.removesuffix(".journal.jsonl"))
    assert not table.exists()  # nothing half-written appeared

    rerun = subprocess.run(
        [sys.executable, "-m", "amoeba_profile.cli.main", *args], capture_output=True, text=True, timeout=900
    )
    assert rerun.returncode == 0, rerun.stderr
    counts = re.search(r"(\d+) entries measured now, (\d+) taken from the journal", rerun.stdout)
    resumed = {key for key, _ in done_before}
    lut = load_table(table)
    assert not journal.exists()
    arch = resolve_arch(str(tiny_config_path))
    plan = BuildPlan(
        arch, (1.0, 0.5), (16,), (16, 32, 64, 128), whole=(Subnet.uniform(arch, 4, 1.0), Subnet.uniform(arch, 2, 0.5))
    )
    assert len(lut.frame) == len(plan.entries())
    assert counts and int(counts[1]) + int(counts[2]) == len(plan.entries()), rerun.stdout
    assert int(counts[2]) <= len(resumed) and int(counts[1]) >= len(plan.entries()) - len(resumed)
    # A serving-loop decode row noisier than its step is stored as an error instead of breaking the table.
    failed = lut.frame[lut.frame.status != "ok"]
    assert ((failed.status == "error") & (failed.phase == "decode") & failed.component.isin(["base", "model"])).all()
    # every (entry, round) measured exactly once: the regular rounds, plus at most one re-measure round
    rounds = TimingProtocol.quick().rounds
    assert lut.frame["rounds"].isin([rounds, rounds + 1]).all()


def test_lock_serializes_builds(tmp_path, tiny_arch):
    from filelock import FileLock

    backend = get_backend("pytorch")
    first = run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL)
    with FileLock(str(first.path) + ".lock"):
        with pytest.raises(LutError, match="another build or validation is using it"):
            run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL, lock_timeout_s=0)


def test_a_waiting_build_says_whose_lock_it_waits_for_and_how_long(tmp_path, tiny_arch):
    from amoeba_profile.core.files import held

    backend = get_backend("pytorch")
    first = run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL)
    notes = []
    with held(Path(str(first.path) + ".lock"), "the test"):
        with pytest.raises(LutError, match=rf"locked by pid {os.getpid()} on \S+ since 20"):
            run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL, lock_timeout_s=0.2, notice=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"table {first.path} is locked by pid {os.getpid()} on ")
    assert notes[0].endswith("waiting for up to 0.2 s")
    assert not Path(str(first.path) + ".lock.holder").exists()  # the note goes with the lock
    assert not Path(str(first.path) + ".lock").exists()  # and so does the lock file


def test_no_lock_file_stays_beside_a_table(tmp_path, tiny_arch):
    result = run_build(_plan(tiny_arch), get_backend("pytorch"), tmp_path, FAST_PROTOCOL)
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["tiny-float32.csv", "tiny-float32.meta.json"]


def test_a_lock_file_removed_under_a_waiter_is_not_held_on_the_removed_file(tmp_path, monkeypatch):
    """A waiter that opened the lock file just before its holder removed it wins the flock on a
    file nobody else opens; it must take the file at the path instead, or two processes hold it."""
    import fcntl

    from amoeba_profile.core import files as lockfile

    lock = tmp_path / "t.csv.lock"
    with lockfile.held(lock, "the table"):
        stale = os.open(lock, os.O_RDWR)  # the waiter's open, before the holder lets go
    assert not lock.exists()
    opened, real = [stale], lockfile._open_lock_file
    monkeypatch.setattr(lockfile, "_open_lock_file", lambda path: opened.pop() if opened else real(path))
    with lockfile.held(lock, "the table", timeout_s=0):
        assert not opened and lock.exists()  # it opened the stale file first, then took the one at the path
        other = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # and holds that: nobody else can
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert not lock.exists()


def test_cli_build_prints_the_lock_it_waits_for(tmp_path, tiny_config_path):
    from amoeba_profile.core.files import held
    from amoeba_profile.device import fingerprint
    from amoeba_profile.table.lut import table_path

    path = table_path(tmp_path, fingerprint("cpu")["slug"], "pytorch", "tiny", "float32")
    path.parent.mkdir(parents=True)
    stderr = tmp_path / "stderr.txt"
    with held(Path(str(path) + ".lock"), "the test"), stderr.open("w") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amoeba_profile.cli.main",
                "build-lut",
                "--model",
                str(tiny_config_path),
                "--out",
                str(tmp_path),
                "--quick",
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "waiting" not in stderr.read_text() and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    text = " ".join(stderr.read_text().split())
    assert f"is locked by pid {os.getpid()} on " in text and "waiting until it is released" in text, text


def test_journal_of_other_plan_is_not_mixed(tmp_path, tiny_arch):
    backend = get_backend("pytorch")
    path = run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL).path
    journal = path.with_name(path.name + ".journal.jsonl")
    journal.write_text(json.dumps({"kind": "header", "identity": "someone-else"}) + "\n")
    with pytest.raises(LutError, match="unfinished run with other options"):
        run_build(BuildPlan(tiny_arch, (1.0,), (16,), (16, 48)), backend, tmp_path, FAST_PROTOCOL)


class _OomOnWideMlp:
    """Wraps the real backend; building the widest MLP fails like an allocator would."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def build_component(self, arch, entry):
        if entry.component == "mlp" and entry.ffn == arch.ffn_size:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
        return self.inner.build_component(arch, entry)


def test_out_of_memory_is_recorded_not_fatal(tmp_path, tiny_arch):
    backend = _OomOnWideMlp(get_backend("pytorch"))
    result = run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL)
    lut = load_table(result.path)
    oom = lut.frame[lut.frame.status == "oom"]
    assert set(oom.component) == {"mlp"} and set(oom.ffn) == {tiny_arch.ffn_size}
    assert "allocate" in oom.note.iloc[0]
    assert (lut.frame[lut.frame.status == "ok"].median_ms > 0).all()
    assert ((lut.frame.status == "ok") | (lut.frame.status == "oom") | _too_noisy(lut.frame)).all()
    assert sorted(l for l in result.failed if l.startswith("mlp")) == [
        "mlp decode, ffn 128",
        "mlp prefill 16 tok, ffn 128",
    ]
    assert len(result.failed) == 2 + _too_noisy(lut.frame).sum()  # labels, for people, not keys


def test_unexpected_error_keeps_journal(tmp_path, tiny_arch):
    class Broken(_OomOnWideMlp):
        def build_component(self, arch, entry):
            if entry.component == "mlp":
                raise ValueError("driver exploded")
            return self.inner.build_component(arch, entry)

    from amoeba_profile.core.errors import AmoebaError

    with pytest.raises(AmoebaError, match="driver exploded.*rerun to resume"):
        run_build(_plan(tiny_arch), Broken(get_backend("pytorch")), tmp_path, FAST_PROTOCOL)
    journal = next(tmp_path.rglob("*.journal.jsonl"))
    assert sum(1 for line in journal.open() if '"result"' in line) > 0


def test_a_rerun_keeps_the_threads_of_the_table_it_extends(tmp_path, tiny_arch):
    """The default thread count follows the machine's load; a rerun into the same folder keeps the
    count of the table or unfinished journal there, or it would be refused as another identity."""
    from amoeba_profile.measure.build import backend_for_build, stored_backend_config

    backend = get_backend("pytorch")  # 1 thread (conftest)
    assert stored_backend_config(tmp_path, _plan(tiny_arch), backend) is None
    path = run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL).path
    assert stored_backend_config(tmp_path, _plan(tiny_arch), backend) == backend.config_dict()  # the sidecar's
    # An unfinished build there was measured with 2 threads: its journal header says so.
    journal = path.with_name(path.name + ".journal.jsonl")
    config = {**backend.config_dict(), "threads": 2}
    journal.write_text(json.dumps({"kind": "header", "identity": "x", "options": {"config": config}}) + "\n")
    again, line = backend_for_build("pytorch", tmp_path, _plan(tiny_arch), "cpu", None, None)
    assert again.config_dict() == config
    assert line == "threads: 2 (as the table or journal being resumed or extended was measured)"
    given, line = backend_for_build("pytorch", tmp_path, _plan(tiny_arch), "cpu", None, 1)
    assert given.config_dict()["threads"] == 1 and line == "threads: 1 (given)"


def test_an_entry_without_a_result_is_an_error_measured_again():
    """An entry the journal holds nothing for is stored as an error (not as out of memory), and
    the next build measures it again, as it does an out-of-memory row."""
    from types import SimpleNamespace

    from amoeba_profile.core.entry import Entry
    from amoeba_profile.measure.build import _retried, journal_rows

    entry = Entry("mlp", "prefill", 1, 16, 0, ffn=64)
    rows, failed = journal_rows([entry], SimpleNamespace(records=[]), FAST_PROTOCOL, "components")
    assert [(r.status, r.note, r.n) for r in rows] == [("error", "no result", 0)]
    assert failed == [entry.label]
    assert _retried(rows[0])
    assert not _retried(msgspec.structs.replace(rows[0], status="error", n=7))  # a measured error keeps its samples
