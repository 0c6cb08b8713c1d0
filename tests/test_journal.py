"""The journal: every kind of damage is named with its line and a choice, never repaired silently,
except the torn last line a crash mid-append leaves; repeated records count once."""

import json
import re

import pytest
from amoeba_profile.backends import get_backend

from amoeba_profile.core.errors import AmoebaError, LutError, UsageError
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.measure.artifacts import ArtifactCache
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.journal import Journal
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.table.lut import entry_key_of_row, load_table

HEADER = {"kind": "header", "identity": "abc"}
MLP = "mlp|prefill|b1|t16|c0|h0|kv0|f64|s"
BASE = "base|decode|b1|t1|c16|h0|kv0|f0|s"
KEYS = {MLP, BASE}


def _ok(key=MLP, round_index=0, samples=(1.0, 1.1)):
    return {
        "kind": "result",
        "key": key,
        "round": round_index,
        "status": "ok",
        "repeat": 1,
        "steps": 1,
        "wall_s": 0.5,
        "samples_ms": list(samples),
        "state": {"throttled": False},
    }


def _write(path, *lines: str | bytes, tail: bytes = b""):
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines) + tail
    path.write_bytes(data)


def _open(path, on_corrupt="stop"):
    return Journal(path, HEADER, on_corrupt, keys=KEYS, max_round=2)


def test_torn_last_line_is_dropped_and_the_file_repaired(tmp_path):
    path = tmp_path / "t.csv.journal.jsonl"
    first = _ok()
    _write(path, json.dumps(HEADER), json.dumps(first), tail=json.dumps(_ok(round_index=1)).encode()[:37])
    journal = _open(path)
    assert journal.records == [first] and journal.loaded == 1
    assert path.read_text() == json.dumps(HEADER) + "\n" + json.dumps(first) + "\n"
    journal.append({k: v for k, v in _ok(round_index=1).items() if k != "kind"})
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()[1:]] == [0, 1]
    assert journal.measured_now() == {MLP}


CORRUPTIONS = [
    # (name, lines after the header or None to replace the header, bad line number, problem)
    ("bad header", ["not json at all"], 1, r"not JSON"),
    ("header of something else", [json.dumps({"kind": "result"})], 1, r"not a journal header"),
    ("bad middle line", [json.dumps(_ok()), "{garbage", json.dumps(_ok(round_index=1))], 3, r"not JSON"),
    (
        "negative timed sample",
        [json.dumps(_ok()), json.dumps(_ok(round_index=1, samples=(1.0, -3.0)))],
        3,
        r"samples_ms holds -3.0, not a finite positive number",
    ),
    ("NaN sample", [json.dumps(_ok(samples=(float("nan"),)))], 2, r"samples_ms holds nan, not a finite"),
    (
        "missing field",
        [json.dumps({k: v for k, v in _ok().items() if k != "samples_ms"})],
        2,
        r"\['samples_ms'\] missing",
    ),
    ("unknown field", [json.dumps({**_ok(), "extra": 1})], 2, r"unknown field `extra`"),
    ("not an object", [json.dumps([1, 2])], 2, r"a JSON list, not an object"),
    ("key of a number", [json.dumps({**_ok(), "key": 7})], 2, r"field 'key'=7: Expected `str`"),
    (
        "key of another run",
        [json.dumps({**_ok(), "key": "attn|prefill|b1|t16|c0|h8|kv4|f0|s"})],
        2,
        r"is not an entry of this run",
    ),
    ("round out of range", [json.dumps(_ok(round_index=9))], 2, r"round=9 is not an integer in 0..2"),
    ("bad status", [json.dumps({**_ok(), "status": "fine"})], 2, r"field 'status'='fine'"),
    (
        "bad state",
        [json.dumps({**_ok(), "state": {"temperature_c": "hot"}})],
        2,
        r"field 'state.temperature_c'='hot': Expected `float",
    ),
    ("old and new state names", [json.dumps({**_ok(), "context": {}})], 2, r"unknown field `context`"),
    ("not UTF-8", [json.dumps(_ok()).encode(), b'{"kind": "result", "key": "\xff\xfe"}'], 3, r"not UTF-8 text"),
]


@pytest.mark.parametrize("lines, number, problem", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corruption_stops_with_file_line_and_both_choices(tmp_path, lines, number, problem):
    path = tmp_path / "t.csv.journal.jsonl"
    header = [] if number == 1 else [json.dumps(HEADER)]
    _write(path, *header, *lines)
    before = path.read_bytes()
    with pytest.raises(LutError) as info:
        _open(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line {number}: ") and re.search(problem, message), message
    assert "--on-corrupt-journal drop-tail" in message and "--on-corrupt-journal restart" in message
    assert len(message.splitlines()) == 1
    assert path.read_bytes() == before  # stopping touches nothing

    kept = _open(path, "drop-tail").records
    good = [json.loads(line) for line in lines[: max(0, number - 2)]]
    assert kept == good
    assert [json.loads(line) for line in path.read_text().splitlines()] == [HEADER, *good]
    _write(path, *header, *lines)
    assert _open(path, "restart").records == []
    assert path.read_text() == json.dumps(HEADER) + "\n"


def test_a_journal_of_an_earlier_version_names_the_state_context_and_is_read(tmp_path):
    """Earlier versions wrote a result's device state as "context" (a word now kept for the KV length)."""
    path = tmp_path / "t.csv.journal.jsonl"
    record = _ok()
    old = {**{k: v for k, v in record.items() if k != "state"}, "context": record["state"]}
    _write(path, json.dumps(HEADER), json.dumps(old))
    assert _open(path).records == [record]
    assert json.loads(path.read_text().splitlines()[1]) == record  # rewritten under the new name


def test_repeated_records_count_once(tmp_path):
    path = tmp_path / "t.csv.journal.jsonl"
    first, again = _ok(samples=(1.0,)), _ok(samples=(9.0,))
    _write(path, json.dumps(HEADER), json.dumps(first), json.dumps(again), json.dumps(first))
    journal = _open(path)
    assert journal.records == [first] and journal.done() == {(MLP, 0)}
    assert len(path.read_text().splitlines()) == 2


def test_serving_loop_decode_samples_may_dip_below_zero(tmp_path):
    """A decode row's sample is (e2e(1 + n) - e2e(1)) / n: noise legitimately makes some negative."""
    path = tmp_path / "t.csv.journal.jsonl"
    record = _ok(key=BASE, samples=(0.4, -0.2, 0.5))
    _write(path, json.dumps(HEADER), json.dumps(record))
    assert _open(path).records == [record]


def test_other_identity_is_refused_and_choice_checked(tmp_path):
    path = tmp_path / "t.csv.journal.jsonl"
    _write(path, json.dumps({**HEADER, "identity": "other"}))
    for choice in ("stop", "drop-tail", "restart"):  # a sound journal of another run is never discarded
        with pytest.raises(LutError, match="unfinished run with other options"):
            _open(path, choice)
    with pytest.raises(UsageError, match="stop.*drop-tail.*restart"):
        _open(path, "ignore")


def test_append_refuses_what_a_resumed_run_could_not_read(tmp_path):
    journal = _open(tmp_path / "t.csv.journal.jsonl")
    with pytest.raises(AmoebaError, match="not journaled: samples_ms holds -1.0"):
        journal.append({k: v for k, v in _ok(samples=(-1.0,)).items() if k != "kind"})
    assert journal.records == [] and len(journal.path.read_text().splitlines()) == 1


# --- through a build (pure-Python fake engine: fast) ---

PROTOCOL = TimingProtocol(warmup_min=1, warmup_max=2, rounds=2, samples_per_round=3, min_round_s=0.0)


class _Stop(Exception):
    """Stands in for a kill after some results were journaled."""


def _plan(arch):
    return BuildPlan(arch, (1.0, 0.5), (16,), (16, 64), method="difference", depths=(1, 2, 4))


def _interrupted(tmp_path, arch, after):
    def progress(done, total, label):
        if done >= after:
            raise _Stop()

    with pytest.raises(_Stop):
        run_build(
            _plan(arch),
            get_backend("fake-engine"),
            tmp_path,
            PROTOCOL,
            progress,
            artifacts=ArtifactCache(tmp_path / "artifacts"),
        )
    return next(tmp_path.rglob("*.journal.jsonl"))


def _resume(tmp_path, arch, **kw):
    return run_build(
        _plan(arch),
        get_backend("fake-engine"),
        tmp_path,
        PROTOCOL,
        artifacts=ArtifactCache(tmp_path / "artifacts"),
        **kw,
    )


def test_build_resumes_deduplicated_and_says_what_came_from_the_journal(tmp_path, tiny_arch, fake_backend):
    entries = len(_plan(tiny_arch).entries())
    journal = _interrupted(tmp_path, tiny_arch, after=entries + 4)  # all of round 0, 4 entries of round 1
    lines = journal.read_text().splitlines()
    doubled = json.loads(lines[1])
    journal.write_text("\n".join(lines + [lines[1]]) + "\n")
    result = _resume(tmp_path, tiny_arch)
    assert (result.measured, result.from_journal) == (entries - 4, 4)
    lut = load_table(result.path)
    row = next(r for r in lut.frame.to_dict("records") if entry_key_of_row(r) == doubled["key"])
    assert row["n"] == PROTOCOL.rounds * PROTOCOL.samples_per_round and row["rounds"] == PROTOCOL.rounds


def test_build_stops_on_a_corrupt_journal_until_told_what_to_do(tmp_path, tiny_arch, fake_backend):
    journal = _interrupted(tmp_path, tiny_arch, after=6)
    lines = journal.read_text().splitlines()
    lines[3] = lines[3].replace('"samples_ms": [', '"samples_ms": [NaN, ')
    journal.write_text("\n".join(lines) + "\n")
    with pytest.raises(LutError, match=rf"{re.escape(str(journal))}: line 4: samples_ms holds"):
        _resume(tmp_path, tiny_arch)
    result = _resume(tmp_path, tiny_arch, on_corrupt_journal="drop-tail")
    assert result.from_journal == 0 and result.measured == len(_plan(tiny_arch).entries())
    assert (load_table(result.path).frame.status == "ok").all() and not journal.exists()
