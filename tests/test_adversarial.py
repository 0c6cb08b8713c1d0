"""Hostile files and faults, each used as such: a FIFO, a link to /dev/zero, a sparse 3 GB file, a
malformed cache entry, ``ulimit -f``, a build that waited for another's lock.

Builds run the pure-Python fake engine (tests/fake_engine.py) on one whole model, so each takes a
fraction of a second; an alarm turns a hang (what a FIFO used to cause) into a failure.
"""

from __future__ import annotations

import json
import os
import resource
import signal
from contextlib import contextmanager

import pytest
from amoeba_profile.backends import get_backend

from amoeba_profile.core.errors import AmoebaError, LutError
from amoeba_profile.core.schema import meta_fields
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.measure.artifacts import ArtifactCache
from amoeba_profile.measure.build import device_out_of_memory, run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.table.lut import load_table

PROTOCOL = TimingProtocol(warmup_min=1, warmup_max=2, rounds=2, samples_per_round=3, min_round_s=0.0)


@contextmanager
def no_hang(seconds: int = 30):
    """Fail, instead of waiting for ever, if the block takes longer than ``seconds``."""

    def alarm(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _plan(arch):
    """Two whole models only (prefill and decode rows each): two engines, no grid."""
    return BuildPlan(
        arch,
        (1.0,),
        (16,),
        (16,),
        method="difference",
        measure_grid=False,
        whole=(Subnet.uniform(arch, 2, 1.0), Subnet.uniform(arch, 3, 1.0)),
    )


def _build(out, arch, artifacts, backend=None, **kw):
    return run_build(
        _plan(arch),
        backend or get_backend("fake-engine"),
        out,
        PROTOCOL,
        artifacts=ArtifactCache(artifacts),
        notice=lambda message: None,
        **kw,
    )


def _engine_records(artifacts):
    records = sorted(artifacts.rglob("engine.json"))
    assert len(records) == 2
    return records


@pytest.mark.parametrize("plant", ["fifo", "dev-zero"])
def test_a_cached_engine_record_that_is_no_file_is_refused_at_once(tmp_path, tiny_arch, fake_backend, plant):
    """A FIFO there blocked the build for ever while it held the table's and the device's locks; a
    link to /dev/zero ate memory until a MemoryError was stored as the device running out of it."""
    artifacts = tmp_path / "artifacts"
    _build(tmp_path / "first", tiny_arch, artifacts)
    record = _engine_records(artifacts)[0]
    record.unlink()
    os.mkfifo(record) if plant == "fifo" else record.symlink_to("/dev/zero")
    with no_hang(), pytest.raises(AmoebaError) as failure:
        _build(tmp_path / "second", tiny_arch, artifacts)
    message = str(failure.value)
    assert f"{record}: not a regular file" in message
    assert f"delete the cached engine {record.parent} so that the next run compiles it again" in message
    assert not list((tmp_path / "second").rglob("*.csv"))  # nothing stored, let alone an oom row
    # The locks went with the failure: another build of that table and device starts at once.
    with no_hang():
        other = _build(tmp_path / "second", tiny_arch, tmp_path / "fresh-artifacts")
    assert set(load_table(other.path).frame.status) == {"ok"}


def test_a_malformed_engine_record_names_the_cache_entry_to_delete(tmp_path, tiny_arch, fake_backend):
    """'rerun to resume' alone failed the same way on every rerun: the message names the entry."""
    artifacts = tmp_path / "artifacts"
    _build(tmp_path / "first", tiny_arch, artifacts)
    record = _engine_records(artifacts)[0]
    record.write_text('{"spec": ')
    for _ in range(2):  # a rerun reads the same entry
        with pytest.raises(
            AmoebaError,
            match=f"{record}: not a readable engine record .*delete the cached engine "
            f"{record.parent} so that the next run compiles it again",
        ):
            _build(tmp_path / "second", tiny_arch, artifacts)
    import shutil

    shutil.rmtree(record.parent)  # as the message says
    result = _build(tmp_path / "second", tiny_arch, artifacts)
    assert result.written and set(load_table(result.path).frame.status) == {"ok"}


def _journal_of(out, arch, artifacts):
    """The journal path the build of ``_plan`` into ``out`` uses (learned from a finished build)."""
    path = _build(out, arch, artifacts).path
    path.unlink()
    path.with_name(path.name.removesuffix(".csv") + ".meta.json").unlink()
    return path.with_name(path.name + ".journal.jsonl")


def test_a_fifo_or_a_sparse_giant_at_the_journal_is_refused_by_type_and_size(tmp_path, tiny_arch, fake_backend):
    artifacts = tmp_path / "artifacts"
    journal = _journal_of(tmp_path, tiny_arch, artifacts)
    os.mkfifo(journal)
    with no_hang(), pytest.raises(LutError, match=f"{journal}: not a regular file; .*--on-corrupt-journal restart"):
        _build(tmp_path, tiny_arch, artifacts)
    journal.unlink()
    with journal.open("wb") as handle:
        handle.truncate(3 << 30)  # 3 GB of holes: no disk used, but 3 GB to read
    with no_hang(10), pytest.raises(LutError, match=f"{journal}: 3221225472 bytes, over the 256 MiB limit"):
        _build(tmp_path, tiny_arch, artifacts)
    result = _build(tmp_path, tiny_arch, artifacts, on_corrupt_journal="restart")
    assert result.measured == len(_plan(tiny_arch).entries()) and not journal.exists()


class _OutOfMemoryOnDeepModels:
    """The fake engine, except that loading the 3-layer model fails like an allocator would."""

    def __init__(self, inner, error):
        self.inner, self.error = inner, error

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, spec, artifact):
        if len(spec.layers) == 3:
            raise self.error
        return self.inner.load(spec, artifact)


def test_an_oom_row_is_measured_again_by_the_next_build(tmp_path, tiny_arch, fake_backend):
    """A rerun used to keep an oom row for good, bogus or not: it now measures that entry again."""
    artifacts = tmp_path / "artifacts"
    backend = get_backend("fake-engine")
    first = _build(tmp_path, tiny_arch, artifacts, _OutOfMemoryOnDeepModels(backend, MemoryError("out of memory")))
    assert sorted(load_table(first.path).frame.status) == ["ok", "ok", "oom", "oom"]
    again = _build(tmp_path, tiny_arch, artifacts, backend)
    assert again.written and again.measured == 2 and again.reused == 2
    assert set(load_table(again.path).frame.status) == {"ok"}


def test_a_host_memory_error_is_no_device_oom(fake_backend):
    on_gpu, on_cpu = fake_backend.FakeEngineBackend(device="cuda:0"), fake_backend.FakeEngineBackend(device="cpu")
    assert device_out_of_memory(on_cpu, MemoryError()) and not device_out_of_memory(on_gpu, MemoryError())
    assert not device_out_of_memory(on_cpu, LutError("a refused input"))


def test_a_full_disk_names_the_file_and_keeps_the_journal(tmp_path, tiny_arch, fake_backend):
    """``ulimit -f``: the build used to end on a bare 'OSError: [Errno 27] File too large'."""
    artifacts = tmp_path / "artifacts"
    journal = _journal_of(tmp_path, tiny_arch, artifacts)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(LutError) as failure:
            _build(tmp_path, tiny_arch, artifacts)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(failure.value)
    assert (
        message.startswith(f"{journal}: cannot write (File too large); the ")
        and " results before it are kept "
        "there - free some space (or raise the file-size limit, ulimit -f) and rerun the same command to resume"
        in message
    ), message
    kept = sum(1 for line in journal.read_text().splitlines() if '"result"' in line)
    result = _build(tmp_path, tiny_arch, artifacts)
    assert kept > 0 and result.from_journal + result.measured == len(_plan(tiny_arch).entries())
    assert set(load_table(result.path).frame.status) == {"ok"}


def test_a_build_that_waited_for_the_lock_adopts_the_threads_of_the_table_it_finds(tmp_path, tiny_arch, fake_backend):
    """Two builds started together: the second chose its default thread count (load-dependent)
    before the first wrote the table, so it used to refuse that table once it got the lock."""
    artifacts = tmp_path / "artifacts"
    waiting = get_backend("fake-engine", threads=2)  # chosen while the table did not exist yet
    first = _build(tmp_path, tiny_arch, artifacts, get_backend("fake-engine", threads=1))
    heard = []
    second = run_build(
        _plan(tiny_arch),
        waiting,
        tmp_path,
        PROTOCOL,
        artifacts=ArtifactCache(artifacts),
        notice=heard.append,
        adopt_threads=True,
    )
    assert second.path == first.path and not second.written
    assert heard == [f"threads: 1 instead of 2, as {first.path} was measured by the build this one waited for"]
    assert load_table(first.path).meta.backend_config["threads"] == 1
    with pytest.raises(LutError, match="existing table has backend_config"):  # a count the user gave stays refused
        run_build(
            _plan(tiny_arch), waiting, tmp_path, PROTOCOL, artifacts=ArtifactCache(artifacts), notice=heard.append
        )


# ---- reseal: a CSV changed by hand is checked against the table's own model, method and grid -----


def _sealed_table(tmp_path, arch):
    """A components table with full provenance (grid, method) and one whole-model row."""
    from conftest import synthetic_lut

    from amoeba_profile.core.entry import Entry
    from amoeba_profile.core.timing import Measurement
    from amoeba_profile.table.lut import frame_rows, measured_row, rows_frame, write_table

    lut = synthetic_lut(arch, lambda h, p, c: 1.0 + h / 8, lambda f, p: 2.0, lambda p, c: 3.0)
    model = measured_row(
        Entry("model", "decode", 1, 1, 16, subnet=Subnet.uniform(arch, 2, 1.0)),
        Measurement.from_samples([0.8, 0.81, 0.79]),
        "ok",
        method="whole",
        repeat=1,
        wall_s=0.1,
    )
    meta = {
        **meta_fields(lut.meta),
        "dtype": "float32",
        "device_slug": "cpu-test",
        "method": "components",
        "grid": {"widths": [1.0, 0.75, 0.5, 0.25], "prompt_lens": [16], "contexts": [16, 64], "batch": 1},
    }
    path = tmp_path / "tiny-float32.csv"
    write_table(path, rows_frame(frame_rows(lut.frame) + [model]), meta)
    return path


def _edit(path, where, column, value):
    """Change one cell as a spreadsheet would (every cell kept as text), or append a row (``where`` None)."""
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if where is None:
        frame = pd.concat([frame, frame[frame.component == "attn"].head(1).assign(**column)], ignore_index=True)
    else:
        frame.loc[frame.index[where(frame)][0], column] = value
    frame.to_csv(path, index=False)


def _attn(frame):
    return (frame.component == "attn") & (frame.phase == "prefill") & (frame.heads == "8")


@pytest.mark.parametrize(
    "where, column, value, message",
    [
        (_attn, "heads", "999", "not a shape of tiny"),
        (_attn, "kv_heads", "3", "heads=8 must be kv_heads x 2"),
        (_attn, "heads", "0", "not a shape of tiny"),
        (_attn, "p10_ms", "1e-9", "p10_ms=1e-09 is not the p10 of its samples_ms"),
        (_attn, "samples_ms", "[2.0, oops", "is not a JSON list of numbers"),
        (_attn, "n", "0", "n=0 but samples_ms holds 3 samples"),
        (_attn, "mean_ms", "-2", "mean_ms=-2.0 is negative"),
        (_attn, "std_ms", "-1", "std_ms=-1.0 is negative"),
        (_attn, "tokens", "17", "tokens=17 is not in the table's grid [16]"),
        (
            lambda f: f.component == "mlp",
            "ffn",
            "100",
            "mlp shape (100,) is not one of the table's grid [(32,), (64,), (96,), (128,)]",
        ),
        (lambda f: f.component == "model", "subnet_json", '{"layers": [', "subnet_json does not describe a subnet"),
        (
            None,
            {"component": "layer", "ffn": "128"},
            None,
            "a layer row of method 'components'; a table of method "
            "'components' holds model rows and attn, base, mlp rows",
        ),
    ],
)
def test_reseal_refuses_rows_no_build_writes(tmp_path, tiny_arch, where, column, value, message):
    from amoeba_profile.table.lut import reseal, sidecar_path

    path = _sealed_table(tmp_path, tiny_arch)
    sidecar = sidecar_path(path).read_bytes()
    _edit(path, where, column, value)
    with pytest.raises(LutError, match=r"tiny-float32.csv: row \d+ \(line \d+\): ") as refused:
        reseal(path)
    assert message in str(refused.value)
    assert sidecar_path(path).read_bytes() == sidecar  # nothing sealed


def test_reseal_takes_the_sidecar_of_a_write_cut_between_its_renames(tmp_path, tiny_arch):
    """The CSV was renamed into place, its sidecar still pending: the old sidecar (other grid, no
    later_builds) used to be attached to it."""
    import shutil

    from amoeba_profile.table.lut import pending_sidecar_path, reseal, sidecar_path, write_table

    path = _sealed_table(tmp_path, tiny_arch)
    newer = load_table(path)
    newer_meta = {**meta_fields(newer.meta), "later_builds": [{"grid": {"contexts": [64]}}]}
    newer_meta.pop("content_sha256")
    staged = tmp_path / "staged" / path.name
    staged.parent.mkdir()
    write_table(staged, newer.frame.iloc[:-1], newer_meta)  # the write: one row fewer, a later build logged
    shutil.copy(sidecar_path(staged), pending_sidecar_path(path))  # its first two steps ran, the last did not
    shutil.copy(staged, path)
    reseal(path)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["later_builds"] == newer_meta["later_builds"] and meta["rows"] == len(newer.frame) - 1
    assert not pending_sidecar_path(path).exists() and len(load_table(path).frame) == len(newer.frame) - 1


# ---- markup in paths, a planted symlink among the plots ------------------------------------------


def _main(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of ``amoeba-profile ARGS`` through the entry point, in-process."""
    import sys

    from amoeba_profile.cli import main as cli

    monkeypatch.setattr(sys, "argv", ["amoeba-profile", *args])
    monkeypatch.setitem(cli._state, "debug", False)
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_paths_with_markup_print_as_they_are_and_plots_replace_a_planted_symlink(
    tmp_path, monkeypatch, capsys, tiny_config_path
):
    """``--out 'mk[/]'`` wrote the table, then crashed with MarkupError (exit 1); '[bold]x[/bold]'
    printed altered. ``plot`` wrote through a symlink planted at pareto.png."""
    out = tmp_path / "mk[/]" / "[bold]x[/bold]"
    code, stdout, stderr = _main(
        monkeypatch,
        capsys,
        "build-lut",
        "--model",
        str(tiny_config_path),
        "--out",
        str(out),
        "--quick",
        "--prompt-len",
        "16",
        "--contexts",
        "16,64",
        "--widths",
        "1",
    )
    assert code == 0, stderr
    [table] = out.rglob("*.csv")
    assert f"table: {table}  (" in stdout
    code, stdout, stderr = _main(monkeypatch, capsys, "show", "--lut", str(table))
    assert code == 0 and f"path: {table}\n" in stdout, stderr
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    plots = tmp_path / "plots[/]"
    plots.mkdir(parents=True)
    (plots / "pareto.png").symlink_to(victim)
    code, stdout, stderr = _main(
        monkeypatch,
        capsys,
        "plot",
        "--lut",
        str(table),
        "--out",
        str(plots),
        "--budget-ms",
        "1000",
        "--prompt-len",
        "16",
        "--gen-len",
        "20",
    )
    assert code == 0 and f"wrote {plots / 'pareto.png'}\n" in stdout, stderr
    assert victim.read_text() == "precious\n"
    assert not (plots / "pareto.png").is_symlink() and (plots / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(plots.glob(".*.tmp"))


# ---- fleet plans: an alias bomb, a 5000-deep plan, everything checked before Ray starts -----------


def _alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML whose nested aliases in ``grid.whole`` expand to 9**levels subnets."""
    lists = ['&l0 ["4x1", "4x1", "4x1", "4x1", "4x1", "4x1", "4x1", "4x1", "4x1"]']
    lists += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "devices: [a]\nflows: [pytorch]\nmodels: [tinyllama-1.1b]\ngrid:\n  whole: [" + ", ".join(lists) + "]\n"


def test_a_fleet_plan_with_aliases_or_nested_5000_deep_is_refused_in_one_line(tmp_path):
    from amoeba_profile.core.errors import UsageError
    from amoeba_profile.fleet.plan import load_fleet_plan

    plan = tmp_path / "fleet.yaml"
    plan.write_text(_alias_bomb(5))  # 9**5 = 59049 copies here; 9 levels (567 bytes) made over 10 GB
    with pytest.raises(
        UsageError,
        match=r"fleet.yaml: not a readable YAML file \(aliases \(\*name\) are not allowed "
        r"in a fleet plan; write the value out in .*, line 5, column \d+",
    ):
        load_fleet_plan(plan)
    plan.write_text(
        "devices: [a]\nflows: [pytorch]\nmodels: [tinyllama-1.1b]\ngrid: {whole: " + "[" * 5000 + "]" * 5000 + "}\n"
    )
    with pytest.raises(UsageError, match="fleet.yaml: nested too deeply to be a fleet plan"):
        load_fleet_plan(plan)


@pytest.mark.parametrize(
    "device, message",
    [
        ("flows: [tensorflow]", "device 'a': unknown flow 'tensorflow': a fleet measures with one of"),
        (
            "method: bogus",
            "device 'a': method 'bogus' is not one of pytorch's ['components', 'calibrated', 'difference']",
        ),
        ("device: tpu", "device 'a': unknown device 'tpu': use auto, cpu or cuda[:N]"),
        ("dtype: float8", "device 'a': dtype 'float8' is not one of pytorch's"),
    ],
)
def test_a_fleet_plan_is_checked_whole_before_ray_starts(tmp_path, monkeypatch, capsys, device, message):
    """Unknown flows, methods and devices were refused only after Ray had started (7-9 s)."""
    import amoeba_profile.fleet.driver as fleet

    def no_ray(*_):
        raise AssertionError("Ray was started for a plan that could be refused without it")

    monkeypatch.setattr(fleet, "connect", no_ray)
    plan = tmp_path / "fleet.yaml"
    plan.write_text(f"flows: [pytorch]\nmodels: [tinyllama-1.1b]\ndevices:\n  a: {{{device}}}\n  b: {{}}\n")
    code, _, stderr = _main(monkeypatch, capsys, "fleet", "build", "--plan", str(plan))
    assert code == 2 and stderr.startswith(f"error: {plan}: ") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_thousands_of_devices_without_a_node_are_one_line(tmp_path):
    """2000 labels no node advertises printed 2000 notices."""
    from amoeba_profile.fleet.driver import _Driver, _Table
    from amoeba_profile.fleet.plan import flags_builds

    class NoNodes:
        def cluster_resources(self):
            return {}

    notices = []
    driver = _Driver.__new__(_Driver)
    driver.ray, driver.notice, driver.device_wait_s = NoNodes(), notices.append, 600.0
    driver.calls = __import__("queue").SimpleQueue()
    tables = [
        _Table(build) for build in flags_builds([f"kind-{i:04d}" for i in range(2000)], ["pytorch"], ["tinyllama-1.1b"])
    ]
    driver.announce_missing(tables)
    for table in tables:
        driver._watch_device(table)  # each build's own watch: already announced, nothing new to say
    while not driver.calls.empty():
        driver.calls.get()()
    assert notices == [
        "no live node advertises device:kind-0000, device:kind-0001, device:kind-0002 and 1997 more; "
        "waiting up to 600 s for one to join"
    ]


def test_ctrl_c_before_a_command_measures_says_so_in_one_line(monkeypatch, capsys):
    """A SIGINT while a command starts (outside the build's own handler) exited 130 without a word."""
    from amoeba_profile.cli import main as cli

    def interrupted(*_):
        signal.raise_signal(signal.SIGINT)  # Python's default handler: KeyboardInterrupt, here

    monkeypatch.setattr(cli, "load_one", interrupted)
    code, stdout, stderr = _main(monkeypatch, capsys, "show", "--lut", "x")
    assert (code, stdout, stderr) == (130, "", "error: interrupted\n")
