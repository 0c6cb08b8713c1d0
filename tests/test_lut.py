import json

import msgspec
import pytest
from conftest import synthetic_lut
from hypothesis import given, settings
from hypothesis import strategies as st

from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import LutError
from amoeba_profile.core.schema import meta_fields
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import Measurement
from amoeba_profile.table.lut import (
    find_tables,
    load_one,
    load_table,
    measured_row,
    rows_frame,
    sidecar_path,
    table_path,
    write_table,
)


def _write(tmp_path, lut):
    path = table_path(tmp_path, "cpu-test", "pytorch", "tiny", "float32")
    write_table(path, lut.frame, lut.meta)
    return path


def _flat(tiny_arch):
    return synthetic_lut(tiny_arch, lambda h, p, c: 1.0 + h, lambda f, p: 2.0 + f / 64, lambda p, c: 3.0)


@settings(max_examples=25, deadline=None)
@given(
    samples=st.lists(st.floats(0.001, 1e4, allow_nan=False), min_size=1, max_size=12),
    layers=st.integers(1, 4),
    context=st.integers(0, 4096),
)
def test_round_trip_preserves_rows(tmp_path_factory, samples, layers, context):
    from amoeba_profile.core.arch import ModelArch

    arch = ModelArch("tiny", 64, 4, 8, 4, 8, 128, 256)
    subnet = Subnet.uniform(arch, layers, 0.5)
    rows = [
        measured_row(
            Entry("model", "decode", 1, 1, context, subnet=subnet),
            Measurement.from_samples(samples),
            "ok",
            method="whole",
            repeat=1,
            wall_s=1.5,
        ),
        measured_row(Entry("mlp", "prefill", 1, 16, 0, ffn=64), None, "oom", method="components", repeat=1, wall_s=0),
    ]
    path = tmp_path_factory.mktemp("rt") / "t.csv"
    write_table(path, rows_frame(rows), {"arch": arch.to_dict()})
    loaded = load_table(path)
    row = loaded.frame[loaded.frame.component == "model"].iloc[0]
    assert row["median_ms"] == pytest.approx(Measurement.from_samples(samples).median_ms, rel=1e-5)
    assert json.loads(row["samples_ms"]) == pytest.approx(samples, rel=1e-4, abs=1e-5)
    assert Subnet.from_json(row["subnet_json"]) == subnet and row["subnet_id"] == subnet.id
    assert len(loaded.ok) == 1 and loaded.meta.rows == 2


def test_layout_and_discovery(tmp_path, tiny_arch):
    path = _write(tmp_path, _flat(tiny_arch))
    assert path == tmp_path / "cpu-test" / "pytorch" / "tiny-float32.csv"
    assert sidecar_path(path).name == "tiny-float32.meta.json"
    assert find_tables(tmp_path) == [path]
    assert load_one(tmp_path).path == path
    write_table(path.with_name("other-float32.csv"), _flat(tiny_arch).frame, {})
    with pytest.raises(LutError, match="holds 2 tables"):
        load_one(tmp_path)


def test_edited_table_is_refused(tmp_path, tiny_arch):
    path = _write(tmp_path, _flat(tiny_arch))
    path.write_text(path.read_text().replace("ok", "ok ", 1))
    with pytest.raises(LutError, match="SHA-256"):
        load_table(path)


def _rewrite_with_hash(path, text):
    import hashlib

    path.write_text(text)
    meta = json.loads(sidecar_path(path).read_text())
    meta["content_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar_path(path).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("status", "fine", r"row 2 \(line 3\): status='fine'"),
        ("median_ms", "-4", r"row 2 \(line 3\): latency stats"),
        ("median_ms", "inf", r"row 2 \(line 3\): latency stats median=inf .* are not finite"),
        ("p90_ms", "1e308", r"row 2 \(line 3\): latency stats .* <= 1e\+07 ms"),
        ("heads", "2.5", r"row 2 \(line 3\): heads='?2.5'? is not a non-negative integer"),
        ("component", "gpu", r"row 2 \(line 3\): component='gpu'"),
    ],
)
def test_malformed_row_is_named(tmp_path, tiny_arch, column, value, message):
    path = _write(tmp_path, _flat(tiny_arch))
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index(column)] = value
    lines[2] = ",".join(cells)
    _rewrite_with_hash(path, "\n".join(lines) + "\n")
    with pytest.raises(LutError, match=message) as info:
        load_table(path)
    assert str(path) in str(info.value)


def test_duplicate_and_missing_files(tmp_path, tiny_arch):
    path = _write(tmp_path, _flat(tiny_arch))
    lines = path.read_text().splitlines()
    _rewrite_with_hash(path, "\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(LutError, match="duplicate entry"):
        load_table(path)
    sidecar_path(path).unlink()
    with pytest.raises(LutError, match="sidecar .* missing"):
        load_table(path)
    with pytest.raises(LutError, match="no such table"):
        load_table(tmp_path / "none.csv")


def test_truncated_csv(tmp_path, tiny_arch):
    path = _write(tmp_path, _flat(tiny_arch))
    _rewrite_with_hash(path, "component,phase\nattn\n")
    with pytest.raises(LutError, match="missing columns"):
        load_table(path)


class _Crash(BaseException):
    """Stands in for a kill: raised from inside the write, after ``after`` renames went through."""


def _crashing_replace(after):
    import os

    real, calls = os.replace, [0]

    def replace(src, dst):
        if calls[0] == after:
            raise _Crash()
        calls[0] += 1
        real(src, dst)

    return replace


@pytest.mark.parametrize("first", [True, False])
def test_a_crash_at_every_step_of_the_write_leaves_one_whole_table(tmp_path, tiny_arch, monkeypatch, first):
    """Renames are the write's steps: a crash before or after each leaves the old or the new table, and
    the same write run again converges."""
    old, new = _flat(tiny_arch), synthetic_lut(tiny_arch, lambda h, p, c: 5.0, lambda f, p: 6.0, lambda p, c: 7.0)
    for step in range(3):
        folder = tmp_path / f"{first}-{step}"
        path = table_path(folder, "cpu-test", "pytorch", "tiny", "float32")
        if not first:
            write_table(path, old.frame, old.meta)
        monkeypatch.setattr("amoeba_profile.table.lut.os.replace", _crashing_replace(step))
        with pytest.raises(_Crash):
            write_table(path, new.frame, {**meta_fields(new.meta), "generation": "new"})
        monkeypatch.undo()
        if path.exists():
            seen = load_table(path)
            assert seen.meta.unknown_fields.get("generation") == (
                "new" if step >= 2 else None
            )  # the CSV rename commits
            assert len(seen.frame) == len(old.frame)
        else:
            assert first and step < 2  # a first build that died before its commit left no table
        write_table(path, new.frame, {**meta_fields(new.meta), "generation": "new"})
        assert load_table(path).meta.unknown_fields["generation"] == "new"
        assert not list(path.parent.glob("*.pending")) and not list(path.parent.glob(".*.tmp"))


def test_a_write_after_a_crash_at_the_last_rename_keeps_the_table_loadable(tmp_path, tiny_arch, monkeypatch):
    """The CSV committed but its sidecar is still pending; a next write killed after writing its own
    pending sidecar must not leave the committed CSV without provenance."""
    old, new = _flat(tiny_arch), synthetic_lut(tiny_arch, lambda h, p, c: 5.0, lambda f, p: 6.0, lambda p, c: 7.0)
    path = _write(tmp_path, old)
    monkeypatch.setattr("amoeba_profile.table.lut.os.replace", _crashing_replace(2))
    with pytest.raises(_Crash):
        write_table(path, new.frame, {**meta_fields(new.meta), "generation": "a"})
    monkeypatch.setattr("amoeba_profile.table.lut.os.replace", _crashing_replace(2))
    with pytest.raises(_Crash):
        write_table(path, old.frame, {**meta_fields(old.meta), "generation": "b"})
    monkeypatch.undo()
    assert load_table(path).meta.unknown_fields["generation"] == "a"
    (path.parent / f".{path.name}.orphan.tmp").write_text("left by a SIGKILL")
    write_table(path, old.frame, {**meta_fields(old.meta), "generation": "b"})
    assert load_table(path).meta.unknown_fields["generation"] == "b"
    assert not list(path.parent.glob("*.pending")) and not list(path.parent.glob(".*.tmp"))


def test_a_sidecar_renamed_away_while_being_opened_reads_as_absent(tmp_path, tiny_arch, monkeypatch):
    """A reader that saw the pending sidecar and then lost it to the writer's rename retries; it must
    not report the vanished file as unreadable (seen once in 3157 loads of a reader race)."""
    import amoeba_profile.table.lut as lut_module

    path = _write(tmp_path, _flat(tiny_arch))
    pending = lut_module.pending_sidecar_path(path)
    pending.write_text("{}")
    real = lut_module.read_bounded

    def renamed_first(target, *args, **kwargs):
        if target == pending:
            pending.unlink()
        return real(target, *args, **kwargs)

    monkeypatch.setattr(lut_module, "read_bounded", renamed_first)
    assert lut_module._read_sidecar(pending) is None
    assert load_table(path).frame is not None


def test_readers_never_see_a_mix_while_the_table_is_rewritten(tmp_path, tiny_arch):
    import threading

    tables = [_flat(tiny_arch), synthetic_lut(tiny_arch, lambda h, p, c: 5.0, lambda f, p: 6.0, lambda p, c: 7.0)]
    path = _write(tmp_path, tables[0])
    errors, reads, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                load_table(path)
                reads[0] += 1
            except LutError as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(40):
        write_table(path, tables[i % 2].frame, {**meta_fields(tables[i % 2].meta), "i": i})
    stop.set()
    thread.join()
    assert errors == [] and reads[0] > 0


def test_journal_does_not_write_through_a_planted_symlink(tmp_path):
    from amoeba_profile.measure.journal import Journal

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    journal_path = tmp_path / "t.csv.journal.jsonl"
    journal_path.symlink_to(victim)
    with pytest.raises(LutError, match="line 1: a symbolic link"):
        Journal(journal_path, {"kind": "header", "identity": "x"})
    journal = Journal(journal_path, {"kind": "header", "identity": "x"}, on_corrupt="restart")
    journal.append({"key": "mlp|prefill|b1|t16|c0|h0|kv0|f64|s", "round": 0, "status": "oom", "note": ""})
    assert victim.read_text() == "precious\n" and not journal_path.is_symlink()
    assert len(journal_path.read_text().splitlines()) == 2


def test_journal_of_other_options_names_what_differs(tmp_path):
    from amoeba_profile.measure.journal import Journal

    path = tmp_path / "t.csv.journal.jsonl"
    options = {"grid": {"contexts": [16]}, "protocol": {"rounds": 3}, "device": "cpu-x"}
    Journal(path, {"kind": "header", "identity": "a", "options": options})
    other = {**options, "protocol": {"rounds": 1}, "device": "cpu-y"}
    with pytest.raises(LutError, match=r"other options, library versions or device \(device, protocol differ\)"):
        Journal(path, {"kind": "header", "identity": "b", "options": other})


def test_a_table_re_saved_by_pandas_is_refused_then_resealed(tmp_path, tiny_arch):
    import hashlib

    import pandas as pd

    from amoeba_profile.table.lut import reseal

    path = _write(tmp_path, _flat(tiny_arch))
    before = load_table(path)
    old_sha = json.loads(sidecar_path(path).read_text())["content_sha256"]
    pd.read_csv(path).to_csv(path)  # what a notebook does: pandas adds its index column
    with pytest.raises(LutError, match=rf"SHA-256.*re-seal it: amoeba-profile reseal --lut {path}"):
        load_table(path)
    record = reseal(path)
    assert record["old_sha256"] == old_sha and record["new_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["content_sha256"] == record["new_sha256"] and meta["resealed"] == [record]
    after = load_table(path)
    assert after.frame["median_ms"].tolist() == pytest.approx(before.frame["median_ms"].tolist())
    assert after.meta.arch == before.meta.arch and not list(tmp_path.rglob("*.tmp"))


def test_reseal_refuses_a_csv_that_breaks_the_schema(tmp_path, tiny_arch):
    from amoeba_profile.table.lut import reseal

    path = _write(tmp_path, _flat(tiny_arch))
    sidecar = sidecar_path(path).read_text()
    path.write_text(path.read_text().replace(",ok,", ",fine,", 1))
    with pytest.raises(LutError, match="status='fine' is not one of"):
        reseal(path)
    assert sidecar_path(path).read_text() == sidecar  # nothing recorded


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umasks_mode(tmp_path, tiny_arch, umask, mode):
    """Temp files used to come from mkstemp, so every table was 0600 whatever the umask."""
    import os

    from amoeba_profile.measure.journal import Journal

    old = os.umask(umask)
    try:
        path = _write(tmp_path, _flat(tiny_arch))
        journal = Journal(tmp_path / "j.journal.jsonl", {"kind": "header", "identity": "x"})
    finally:
        os.umask(old)
    for written in (path, sidecar_path(path), journal.path):
        assert written.stat().st_mode & 0o777 == mode, written


def test_a_read_only_table_is_not_replaced(tmp_path, tiny_arch):
    path = _write(tmp_path, _flat(tiny_arch))
    before = path.read_bytes()
    path.chmod(0o444)
    with pytest.raises(LutError, match=r"read-only \(mode -r--r--r--\).*chmod u\+w"):
        write_table(path, _flat(tiny_arch).frame, {"changed": True})
    assert path.read_bytes() == before and "changed" not in meta_fields(load_table(path).meta)
    path.chmod(0o644)
    write_table(path, _flat(tiny_arch).frame, {"changed": True})
    assert load_table(path).meta.unknown_fields["changed"] is True


def test_noisy_decode_rows_load_and_a_non_positive_median_is_an_error_row(tmp_path, tiny_arch):
    """A serving-loop decode sample is a difference of two requests: p10 may dip below zero there
    (the row is usable), while a median at or below zero makes the build store an error row -
    either way the table loads."""
    from amoeba_profile.measure.build import _aggregate

    noisy = Entry("base", "decode", 1, 1, 16)
    drowned = Entry("base", "decode", 1, 1, 64)
    records = [
        {
            "kind": "result",
            "key": e.key,
            "round": 0,
            "status": "ok",
            "repeat": 1,
            "steps": 1,
            "wall_s": 0.1,
            "samples_ms": samples,
            "state": {},
        }
        for e, samples in ((noisy, [-0.3, 0.4, 0.5, 0.45, 0.42]), (drowned, [-0.3, -0.2, 0.1]))
    ]
    rows, failed = _aggregate([noisy, drowned], records, 0.1, "components")
    assert [r.status for r in rows] == ["ok", "error"] and failed == [drowned.label]
    assert rows[0].p10_ms < 0 < rows[0].median_ms and "not positive" in rows[1].note
    path = tmp_path / "t.csv"
    write_table(path, rows_frame(rows), {})
    lut = load_table(path)
    assert len(lut.ok) == 1 and json.loads(lut.frame.samples_ms[1]) == [-0.3, -0.2, 0.1]
    timed = rows_frame([msgspec.structs.replace(rows[0], component="mlp", phase="prefill", tokens=16, context=0)])
    timed_path = tmp_path / "u.csv"
    write_table(timed_path, timed, {})
    with pytest.raises(LutError, match="positive median"):
        load_table(timed_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch": "tiny"}, r"field 'arch'='tiny': Expected `object \| null`, got `str`"),
        ({"arch": {"name": "tiny"}}, r"field 'arch': architecture 'tiny': unknown fields \[\], missing"),
        ({"dtype": 4}, "field 'dtype'=4: Expected `str | null`, got `int`"),
        ({"dtype": "float8"}, "field 'dtype'='float8' is not one of"),
        ({"grid": [1]}, r"field 'grid'=\[1\]: Expected `object \| null`, got `array`"),
        ({"grid": {"batch": "1"}}, "field 'grid.batch'='1': Expected `int`, got `str`"),
        ({"grid": {"contexts": [16, -1]}}, r"field 'grid.contexts\[1\]'=-1: Expected `int` >= 1"),
        ({"grid": {"widths": [1.0, "7/8"]}}, r"field 'grid.widths\[1\]'='7/8': Expected `float`, got `str`"),
        ({"grid": {"widths": [1.5]}}, r"field 'grid.widths\[0\]'=1.5: Expected `float` <= 1.0"),
    ],
)
def test_sidecar_type_errors_name_file_and_field(tmp_path, tiny_arch, change, message):
    path = _write(tmp_path, _flat(tiny_arch))
    sidecar = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**sidecar, "dtype": "float32", **change}))
    with pytest.raises(LutError, match=message) as info:
        load_table(path)
    assert str(info.value).startswith(f"{sidecar_path(path)}: ")


def test_sidecar_that_is_a_device_is_refused_unread(tmp_path, tiny_arch):
    path = _write(tmp_path, _flat(tiny_arch))
    sidecar_path(path).unlink()
    sidecar_path(path).symlink_to("/dev/zero")
    with pytest.raises(LutError, match="not a regular file"):
        load_table(path)
