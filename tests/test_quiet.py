"""A busy machine never ruins a table silently: the load reader, the busy policy, the
machine-wide measurement lock, and contended rows flagged in a real build."""

import json
import os
import shutil
import socket

import pytest
from amoeba_profile.backends import get_backend
from conftest import SimulatedLoad

from amoeba_profile.core.errors import MachineBusy
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.device import device_slug
from amoeba_profile.device.load import CpuLoad, contention_share, idle_cores, others_cpu_s
from amoeba_profile.device.lock import MeasurementLock, measuring_pids
from amoeba_profile.device.monitor import MIN_JUDGED_S, Monitor, entry_state, host_contention
from amoeba_profile.device.quiet import BusyPolicy, wait_for_quiet
from amoeba_profile.measure.artifacts import ArtifactCache
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.table.lut import load_table

PROTOCOL = TimingProtocol(warmup_min=1, warmup_max=2, rounds=2, samples_per_round=3, min_round_s=0.0)


def _proc(root, cpus, processes):
    """A /proc tree: cpu -> (user, system, steal) ticks in /proc/stat, and pid -> (ppid, utime,
    stime, cutime, cstime) in /proc/<pid>/stat."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    line = "{} {} 0 {} 9000 10 0 0 {} 0 0\n"
    total = [sum(ticks[i] for ticks in cpus.values()) for i in range(3)]
    (root / "proc/stat").write_text(
        line.format("cpu ", *total) + "".join(line.format(f"cpu{n}", *ticks) for n, ticks in cpus.items())
    )
    for gone in [d for d in (root / "proc").iterdir() if d.name.isdigit() and int(d.name) not in processes]:
        shutil.rmtree(gone)
    for pid, (ppid, utime, stime, cutime, cstime) in processes.items():
        (root / "proc" / str(pid)).mkdir(exist_ok=True)
        fields = ["S", ppid] + [0] * 9 + [utime, stime, cutime, cstime] + [0] * 5
        (root / "proc" / str(pid) / "stat").write_text(f"{pid} (python (x) y) " + " ".join(map(str, fields)) + "\n")


def test_others_are_machine_time_minus_our_whole_process_tree(tmp_path):
    tick = 1 / os.sysconf("SC_CLK_TCK")
    clock = iter([10.0, 12.0])
    load = CpuLoad(tmp_path, pids=(100,), cpus=(0, 1), clock=lambda: next(clock))
    # 100 is us, 101 our child (a serving process), 200 a stranger; CPU 2 is not ours to run on.
    _proc(
        tmp_path,
        {0: (600, 300, 0), 1: (400, 200, 0), 2: (5000, 0, 0)},
        {100: (1, 50, 10, 0, 0), 101: (100, 5, 0, 0, 0), 200: (1, 7, 0, 0, 0)},
    )
    before = load.read()
    # Over 2 s our CPUs ran 400 + 100 + 20 (steal) ticks; we 100 + 20, our child 60 (then reaped:
    # cutime). What ran on CPU 2 cannot disturb us.
    _proc(
        tmp_path,
        {0: (800, 350, 10), 1: (600, 250, 10), 2: (9000, 0, 0)},
        {100: (1, 150, 30, 65, 0), 200: (1, 300, 0, 0, 0)},
    )
    after = load.read()
    assert before["own_s"] == pytest.approx(65 * tick) and after["own_s"] == pytest.approx(245 * tick)
    assert others_cpu_s(before, after) == pytest.approx((520 - 180) * tick)
    assert after["t"] - before["t"] == 2.0 and after["cores"] == 2


def test_contention_share_counts_only_what_the_measurement_needs():
    assert contention_share(1.0, cores=2, needed=1) == 0.0  # the other process has the spare core
    assert contention_share(1.5, cores=2, needed=1) == 0.5
    assert contention_share(2.0, cores=2, needed=1) == 1.0
    assert contention_share(0.5, cores=2, needed=2) == 0.25
    assert contention_share(9.0, cores=2, needed=2) == 1.0


@pytest.mark.parametrize("others, idle", [(0.0, 4), (0.2, 4), (1.3, 2), (2.9, 1), (7.0, 1)])
def test_idle_cores(others, idle):
    free, sample = idle_cores(SimulatedLoad(lambda t: others, cores=4, step_s=0.0), window_s=0.5)
    assert free == idle and sample.others_cores == pytest.approx(others)


def test_monitor_records_contention_and_rows_pool_it():
    load = SimulatedLoad(lambda t: 1.5, cores=2, step_s=0.2)
    monitor = Monitor()
    monitor.load, monitor.needed = load, 1
    context = entry_state(monitor.sample(), monitor.sample(), steps=4)
    assert context["others_cpu_s"] == pytest.approx(0.3) and context["window_s"] == pytest.approx(0.2)
    assert context["cores"] == 2 and context["cores_needed"] == 1
    # One 0.2 s window is too short to judge; pooled over three it is judged: 1.5 of 2 cores, 1 needed.
    assert MIN_JUDGED_S > 0.2 and host_contention([context]) is None
    assert host_contention([context] * 3) == pytest.approx(0.5)


class _Notices(list):
    def __call__(self, message):
        self.append(message)


def test_wait_for_quiet_waits_then_measures():
    notices = _Notices()
    load = SimulatedLoad(lambda t: 2.0 if t < 10 else 0.0, cores=2, step_s=0.0)  # busy for 10 s
    quiet = wait_for_quiet(load, 2, BusyPolicy("wait", max_wait_s=60), notices)
    assert quiet.share == 0.0 and 10 <= load.t < 12
    assert notices[0].startswith("waiting up to 60 s for a quiet CPU: other processes kept 2.0 of 2 cores busy")
    assert "needs 2" in notices[0] and notices[1].startswith("CPU quiet now")


def test_busy_policy_bounds_warns_and_refuses():
    busy = lambda: SimulatedLoad(lambda t: 2.0, cores=2, step_s=0.0)  # busy for good
    notices = _Notices()
    load = busy()
    assert wait_for_quiet(load, 1, BusyPolicy("wait", max_wait_s=5), notices).share == 1.0
    assert 5 <= load.t < 6 and len(notices) == 2 and notices[1].startswith("warning: measuring on a busy machine")
    notices.clear()
    load = busy()
    wait_for_quiet(load, 1, BusyPolicy("warn"), notices)
    assert load.t == 0.5 and len(notices) == 1 and "flagged 'contended'" in notices[0]
    with pytest.raises(MachineBusy, match="stayed busy: other processes kept 2.0 of 2 cores"):
        wait_for_quiet(busy(), 1, BusyPolicy("refuse", max_wait_s=5), notices)
    # A re-measure round never refuses: it waits, then measures with a warning.
    assert wait_for_quiet(busy(), 1, BusyPolicy("refuse", max_wait_s=5), notices, may_refuse=False).share == 1.0
    with pytest.raises(Exception, match="--busy takes one of wait, warn, refuse"):
        BusyPolicy("sometimes")


def test_lock_says_whom_it_waits_for(tmp_path):
    first = MeasurementLock("cpu", "cpu-test", tmp_path)
    first.acquire("/tables/a.csv", _Notices())
    assert measuring_pids(tmp_path) == []  # our own holding is not "another measurement"
    assert first.holder()["pid"] == os.getpid() and first.holder()["target"] == "/tables/a.csv"
    second = MeasurementLock("cpu", "cpu-test", tmp_path)
    with pytest.raises(MachineBusy, match=rf"pid {os.getpid()} \(.*\) measuring /tables/a.csv since"):
        second.acquire("/tables/b.csv", _Notices(), timeout_s=0)
    notices = _Notices()
    with pytest.raises(MachineBusy, match="still holds"):
        second.acquire("/tables/b.csv", notices, timeout_s=0.1)
    assert notices == [f"waiting for the cpu-test measurement lock (up to 0.1 s): held by {first.describe_holder()}"]
    first.release()
    assert first.holder() is None
    second.acquire("/tables/b.csv", _Notices(), timeout_s=0)
    second.release()
    # Another device has its own lock; a GPU index is part of the name.
    assert MeasurementLock("cuda:1", "h100-sxm", tmp_path).path.name == "measure-h100-sxm-1.lock"


def test_a_stale_holder_is_ignored(tmp_path):
    lock = MeasurementLock("cpu", "cpu-test", tmp_path)
    lock.folder.mkdir(exist_ok=True)
    lock.holder_path.write_text('{"pid": 999999999, "target": "gone"}')
    assert lock.holder() is None and measuring_pids(tmp_path) == []
    assert lock.describe_holder() == "another measurement (holder unknown)"


def test_a_table_lock_and_a_measurement_lock_leave_one_kind_of_note(tmp_path):
    """Both are one primitive (``core.files.NotedLock``): the same note - pid, host, since, and
    what each adds - and a note left by a dead process of this host names nobody."""
    from amoeba_profile.core.files import describe_holder, held

    table = tmp_path / "t.csv.lock"
    with held(table, "table t"):
        table_note = json.loads((tmp_path / "t.csv.lock.holder").read_text())
    lock = MeasurementLock("cpu", "cpu-test", tmp_path)
    lock.acquire("/tables/a.csv", _Notices())
    try:
        measure_note = lock.holder()
    finally:
        lock.release()
    assert set(table_note) == {"pid", "host", "since"}
    assert set(measure_note) == {"pid", "host", "since", "command", "target"}
    assert (
        (measure_note["pid"], measure_note["host"])
        == (table_note["pid"], table_note["host"])
        == (os.getpid(), socket.gethostname())
    )
    (tmp_path / "t.csv.lock.holder").write_text(
        json.dumps({"pid": 999999999, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00"})
    )
    assert describe_holder(table) == "another process"


def _plan(arch):
    return BuildPlan(arch, (1.0, 0.5), (16,), (16, 64), method="difference", depths=(1, 2, 4))


def test_a_second_measurement_on_the_device_waits_for_the_first(tmp_path, tiny_arch, fake_backend):
    backend = get_backend("fake-engine")
    held = MeasurementLock(backend.device, device_slug(backend.device))
    held.acquire("/elsewhere/other-table.csv", _Notices())
    try:
        with pytest.raises(MachineBusy, match="measuring /elsewhere/other-table.csv"):
            run_build(
                _plan(tiny_arch),
                backend,
                tmp_path / "b",
                PROTOCOL,
                lock_timeout_s=0,
                artifacts=ArtifactCache(tmp_path / "artifacts"),
            )
    finally:
        held.release()
    assert not list((tmp_path / "b").rglob("*.journal.jsonl"))  # it measured nothing


def test_contended_rows_are_remeasured_after_a_wait_then_flagged(tmp_path, tiny_arch, fake_backend):
    notices = _Notices()
    load = SimulatedLoad(lambda t: 2.0, cores=2)  # another process keeps both cores busy throughout
    path = run_build(
        _plan(tiny_arch),
        get_backend("fake-engine"),
        tmp_path,
        PROTOCOL,
        busy=BusyPolicy(max_wait_s=30),
        notice=notices,
        load=load,
        artifacts=ArtifactCache(tmp_path / "artifacts"),
    ).path
    lut = load_table(path)
    models = lut.frame[lut.frame.component == "model"]
    assert (models.host_contention == 1.0).all() and models["flags"].str.contains("contended").all()
    assert (models.rounds == PROTOCOL.rounds + 1).all()  # one more round, measured after the wait
    layers = lut.frame[lut.frame.component == "layer"]
    assert layers["flags"].str.contains("contended").all()  # a fit over contended models inherits the flag
    waits = [n for n in notices if n.startswith("waiting up to 30 s")]
    assert len(waits) == 2  # before the build and before the re-measure round
    assert sum(n.startswith("warning: measuring on a busy machine") for n in notices) == 2


def test_quiet_build_has_no_contention(tmp_path, tiny_arch, fake_backend):
    notices = _Notices()
    load = SimulatedLoad(lambda t: 1.0, cores=2)  # one core busy elsewhere; the build needs the other
    path = run_build(
        _plan(tiny_arch),
        get_backend("fake-engine"),
        tmp_path,
        PROTOCOL,
        busy=BusyPolicy(),
        notice=notices,
        load=load,
        artifacts=ArtifactCache(tmp_path / "artifacts"),
    ).path
    lut = load_table(path)
    assert (lut.frame[lut.frame.component == "model"].host_contention == 0.0).all()
    assert not lut.frame["flags"].str.contains("contended").any() and notices == []


def test_refuse_measures_nothing_on_a_busy_machine(tmp_path, tiny_arch, fake_backend):
    with pytest.raises(MachineBusy, match="rerun when it is idle"):
        run_build(
            _plan(tiny_arch),
            get_backend("fake-engine"),
            tmp_path,
            PROTOCOL,
            busy=BusyPolicy("refuse", max_wait_s=10),
            notice=_Notices(),
            load=SimulatedLoad(lambda t: 2.0, cores=2),
            artifacts=ArtifactCache(tmp_path / "artifacts"),
        )
    assert not list(tmp_path.rglob("*.journal.jsonl")) and not list(tmp_path.rglob("*.csv"))
