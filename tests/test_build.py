"""Builds on a tiny architecture: resume after kill -9, locking, OOM rows, reuse of finished tables."""

import json
import os
import signal
import subprocess
import sys
import pytest

from amoeba_profile.arch import resolve_arch
from amoeba_profile.backends import get_backend
from amoeba_profile.build import run_build
from amoeba_profile.errors import LutError
from amoeba_profile.lut import load_table
from amoeba_profile.measure import TimingProtocol
from amoeba_profile.plan import BuildPlan
from amoeba_profile.subnet import Subnet

from conftest import FAST_PROTOCOL


def _plan(arch, **kw):
    return BuildPlan(arch, (1.0, 0.5), (16,), (16, 32), **kw)


def _too_noisy(frame):
    """Rows a busy machine left without a number: a serving-loop difference (tpot) that noise drove
    below zero is stored as an error saying so, never as a latency."""
    return (frame.status == "error") & frame.note.str.contains("timing noise exceeds the value")


def test_build_writes_complete_table(tmp_path, tiny_arch):
    backend = get_backend("pytorch")
    whole = Subnet.uniform(tiny_arch, 3, 0.5)
    plan = _plan(tiny_arch, whole=(whole,))
    seen = []
    result = run_build(plan, backend, tmp_path, FAST_PROTOCOL, lambda d, t, label: seen.append((d, t)))
    lut = load_table(result.path)
    assert len(lut.frame) == len(plan.entries()) == result.measured
    assert ((lut.frame.status == "ok") | _too_noisy(lut.frame)).all()
    assert set(lut.frame.component) == {"attn", "mlp", "base", "model"}
    assert (lut.frame.n >= FAST_PROTOCOL.rounds * FAST_PROTOCOL.samples_per_round).all()
    assert lut.meta["device_slug"] and lut.meta["backend_env"]["torch"] and lut.meta["protocol"]["rounds"] == 2
    assert lut.frame[lut.frame.component == "model"].subnet_id.eq(whole.id).all()
    assert seen[-1][0] == seen[-1][1]
    assert not list(tmp_path.rglob("*.journal.jsonl"))
    # A second build of the same plan measures nothing and keeps every row.
    again = run_build(plan, backend, tmp_path, FAST_PROTOCOL)
    assert again.measured == 0 and again.reused == len(plan.entries())
    # A wider plan measures only what is new.
    wider = BuildPlan(tiny_arch, (1.0, 0.5), (16,), (16, 32, 64), whole=(whole,))
    third = run_build(wider, backend, tmp_path, FAST_PROTOCOL)
    assert third.reused == len(plan.entries()) and third.measured == len(wider.entries()) - len(plan.entries())


# A real build process that SIGKILLs itself while it measures its 7th (entry, round): a fixed
# point, so the test does not race the build, whatever the machine's load.
_DIE_MEASURING = """
import os, signal, sys
from amoeba_profile import build
from amoeba_profile.cli import main
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
    args = ["build-lut", "--model", str(tiny_config_path), "--out", str(tmp_path), "--contexts", "16,32,64,128",
            "--prompt-len", "16", "--widths", "1,1/2", "--whole", "4x1,2x1/2", "--quick"]
    # Timeouts are generous: seconds of work on an idle machine, and one thread (conftest) on a busy one.
    killed = subprocess.run([sys.executable, "-c", _DIE_MEASURING, *args], capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    journal = next(tmp_path.rglob("*.journal.jsonl"))
    before = [json.loads(line) for line in journal.read_text().splitlines() if line.strip().endswith("}")]
    done_before = {(r["key"], r["round"]) for r in before if r.get("kind") == "result"}
    assert len(done_before) == 6
    table = journal.with_name(journal.name.removesuffix(".journal.jsonl"))
    assert not table.exists()  # nothing half-written appeared

    rerun = subprocess.run([sys.executable, "-m", "amoeba_profile.cli", *args], capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    lut = load_table(table)
    assert not journal.exists()
    arch = resolve_arch(str(tiny_config_path))
    plan = BuildPlan(arch, (1.0, 0.5), (16,), (16, 32, 64, 128),
                     whole=(Subnet.uniform(arch, 4, 1.0), Subnet.uniform(arch, 2, 0.5)))
    assert len(lut.frame) == len(plan.entries())
    assert ((lut.frame.status == "ok") | _too_noisy(lut.frame)).all()
    # every (entry, round) measured exactly once: the regular rounds, plus at most one re-measure round
    rounds = TimingProtocol.quick().rounds
    assert lut.frame["rounds"].isin([rounds, rounds + 1]).all()


def test_lock_serializes_builds(tmp_path, tiny_arch):
    from filelock import FileLock

    backend = get_backend("pytorch")
    first = run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL)
    with FileLock(str(first.path) + ".lock"):
        with pytest.raises(LutError, match="another build"):
            run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL, lock_timeout_s=0)


def test_journal_of_other_plan_is_not_mixed(tmp_path, tiny_arch):
    backend = get_backend("pytorch")
    path = run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL).path
    journal = path.with_name(path.name + ".journal.jsonl")
    journal.write_text(json.dumps({"kind": "header", "identity": "someone-else"}) + "\n")
    with pytest.raises(LutError, match="unfinished build with other options"):
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
    assert len(result.oom) == 2 + _too_noisy(lut.frame).sum()


def test_unexpected_error_keeps_journal(tmp_path, tiny_arch):
    class Broken(_OomOnWideMlp):
        def build_component(self, arch, entry):
            if entry.component == "mlp":
                raise ValueError("driver exploded")
            return self.inner.build_component(arch, entry)

    from amoeba_profile.errors import AmoebaError

    with pytest.raises(AmoebaError, match="driver exploded.*rerun to resume"):
        run_build(_plan(tiny_arch), Broken(get_backend("pytorch")), tmp_path, FAST_PROTOCOL)
    journal = next(tmp_path.rglob("*.journal.jsonl"))
    assert sum(1 for line in journal.open() if '"result"' in line) > 0


def test_a_difference_that_noise_drove_below_zero_never_breaks_the_table(tmp_path, tiny_arch):
    """On a loaded CPU one preempted short request makes (e2e(1 + n) - e2e(1)) / n negative. A row
    with p10 <= 0 may not be stored (the whole table would be unloadable): the median stands with
    p10 set to it and a note, and a row whose median is <= 0 is an error, not a latency."""
    from amoeba_profile.build import _aggregate
    from amoeba_profile.entry import Entry
    from amoeba_profile.lut import rows_frame, write_table

    entries = [Entry("base", "decode", 1, 1, c) for c in (16, 32, 64)]
    samples = {16: [0.5, -0.3, 0.6, 0.4], 32: [0.5, 0.6, 0.55, 0.4], 64: [-0.5, -0.2, 0.1, -0.4]}
    records = [{"key": e.key, "round": r, "status": "ok", "repeat": 1, "wall_s": 0.1, "samples_ms": samples[e.context]}
               for e in entries for r in range(2)]
    rows, failed = _aggregate(entries, records, 0.1, "components")
    some, fine, most = rows
    assert some["status"] == "ok" and some["median_ms"] == pytest.approx(0.45) == some["p10_ms"]
    assert some["note"] == "2 of 8 samples <= 0 ms: timing noise exceeds the value; p10 set to the median"
    assert "high_cv" in some["flags"] and some["n"] == 8
    assert fine["status"] == "ok" and fine["median_ms"] == pytest.approx(0.525) and fine["note"] == ""
    assert most["status"] == "error" and most["median_ms"] != most["median_ms"] and failed == [entries[2].key]
    assert most["note"] == "6 of 8 samples <= 0 ms: timing noise exceeds the value; rebuild on an idle machine"
    write_table(tmp_path / "t.csv", rows_frame(rows), {"arch": tiny_arch.to_dict()})
    assert list(load_table(tmp_path / "t.csv").frame.status) == ["ok", "ok", "error"]


def test_a_rerun_keeps_the_threads_of_the_table_it_extends(tmp_path, tiny_arch):
    """The default thread count follows the machine's load; a rerun into the same folder keeps the
    count of the table or unfinished journal there, or it would be refused as another identity."""
    from amoeba_profile.build import backend_for_build, stored_backend_config

    backend = get_backend("pytorch")  # 1 thread (conftest)
    assert stored_backend_config(tmp_path, _plan(tiny_arch), backend) is None
    path = run_build(_plan(tiny_arch), backend, tmp_path, FAST_PROTOCOL).path
    assert stored_backend_config(tmp_path, _plan(tiny_arch), backend) == backend.config_dict()  # the sidecar's
    # An unfinished build there was measured with 2 threads: its journal header says so.
    journal = path.with_name(path.name + ".journal.jsonl")
    header = {"kind": "header", "identity": "x", "backend_config": {**backend.config_dict(), "threads": 2}}
    journal.write_text(json.dumps(header) + "\n")
    again, line = backend_for_build("pytorch", tmp_path, _plan(tiny_arch), "cpu", None, None)
    assert again.config_dict() == header["backend_config"]
    assert line == "threads: 2 (as the table or journal being resumed or extended was measured)"
    given, line = backend_for_build("pytorch", tmp_path, _plan(tiny_arch), "cpu", None, 1)
    assert given.config_dict()["threads"] == 1 and line == "threads: 1 (given)"
