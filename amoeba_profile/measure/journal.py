"""The measurement journal: every (entry, round) result is fsynced before the next one starts.

Append-only JSON lines beside the table (``build-lut`` and ``validate`` each keep their own). The
first line is a header whose ``identity`` hashes everything that makes results comparable; a
journal with another identity is refused rather than mixed in.

Reading checks every line, because every record becomes samples of a table row. Only one kind of
damage is repaired silently: a last line without its newline. An append writes the record with
its newline and only then fsyncs, so a crash mid-append can tear the last line but never an
earlier one (each earlier append was fsynced before the next began); the torn record was never
acknowledged, and its entry is measured again. Any other damage - a bad header, an unreadable or
invalid line, a sample that is not a finite number (or is negative where a sample is one timed
span, see ``entry.samples_may_be_negative``) - no crash of ours produces, so the caller chooses
(``CORRUPT_CHOICES``): ``stop`` names the file, line and problem; ``drop-tail`` keeps the records
before the bad line; ``restart`` discards the journal. A record repeated for the same entry and
round (a journal concatenated or replayed by hand) counts once: the first wins. A result's device
state (``state``) was named ``context`` by earlier versions; such a journal is read, not refused.
What is not a regular file of bounded size (a FIFO, a device, a sparse multi-gigabyte file) is
refused before a byte is read (``inputs.read_bounded``), and those choices apply to it as a whole.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from amoeba_profile.core.entry import kind_of_key, samples_may_be_negative
from amoeba_profile.core.errors import AmoebaError, LutError, UsageError
from amoeba_profile.core.files import write_file_atomically
from amoeba_profile.core.inputs import MIB, read_bounded
from amoeba_profile.core.schema import JournalHeader, JournalResult, parse
from amoeba_profile.table.lut import MAX_TABLE_BYTES

CORRUPT_CHOICES = ("stop", "drop-tail", "restart")
# A journal holds a table's rows with their samples once per round: bounded as the table is, so a
# sparse multi-gigabyte file planted at its path is refused by its size before a byte is read.
MAX_JOURNAL_BYTES = MAX_TABLE_BYTES
HEADER_BYTES = 1 * MIB  # the first line, read alone to learn the options a journal was started with
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a write failed for want of space or a size limit


def cannot_write(exc: OSError, path: Path, kept: str) -> LutError:
    """One line for a write that failed (a full disk, ``ulimit -f``, a read-only folder): the file,
    the reason, what is ``kept`` and how to go on, instead of a bare ``OSError: [Errno 27] ...``."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or type(exc).__name__
    fix = "free some space (or raise the file-size limit, ulimit -f)" if exc.errno in _NO_ROOM else "fix that"
    return LutError(f"{where}: cannot write ({reason}); {kept} - {fix} and rerun the same command to resume")


def check_corrupt_choice(choice: str) -> None:
    if choice not in CORRUPT_CHOICES:
        raise UsageError(f"--on-corrupt-journal takes one of {list(CORRUPT_CHOICES)}, got {choice!r}")


def _result_problem(record: Any, keys: frozenset[str] | None, max_round: int | None) -> str | None:
    """What is wrong with one result record, or None when it can become samples of a row: its
    fields and types (``schema.JournalResult``), then what this run allows - a key of its entries,
    a round it measures, samples of the sign the entry's kind may have."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    try:
        result = parse(JournalResult, record, "result", LutError)
    except LutError as exc:
        return str(exc).removeprefix("result: ")
    if result.key.count("|") < 2 or (keys is not None and result.key not in keys):
        return f"key={result.key!r} is not an entry of this run"
    if max_round is not None and result.round > max_round:
        return f"round={result.round!r} is not an integer in 0..{max_round}"
    signed = samples_may_be_negative(*kind_of_key(result.key))
    bad = [s for s in result.samples_ms or () if not (math.isfinite(s) and (signed or s > 0))]
    if bad:
        return f"samples_ms holds {bad[0]!r}, not a finite {'' if signed else 'positive '}number of milliseconds"
    return None


class Journal:
    """Records of one run, read and checked on opening, appended and fsynced one at a time.

    ``keys`` (entry keys of the run) and ``max_round`` (the last round it may measure, the CV
    re-measure round included) bound what a record may say; ``loaded`` counts the records that
    were already there when it was opened."""

    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        on_corrupt: str = "stop",
        keys: Iterable[str] | None = None,
        max_round: int | None = None,
    ):
        check_corrupt_choice(on_corrupt)
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._keys = frozenset(keys) if keys is not None else None
        self._max_round = max_round
        if path.exists():
            self.records = self._read(header, on_corrupt)
        self.loaded = len(self.records)
        # Rewrite without a torn tail, duplicates or a dropped tail, so appends start on a clean line.
        self._rewrite([header, *self.records])

    def _read(self, header: dict[str, Any], on_corrupt: str) -> list[dict[str, Any]]:
        if self.path.is_symlink():  # ours are renamed into place; a planted link is not read through
            return self._corrupt(1, "a symbolic link, not a journal", [], on_corrupt)
        try:
            data = read_bounded(self.path, MAX_JOURNAL_BYTES, "journal", error=LutError)
        except LutError as exc:  # a FIFO, a device, a file too large: nothing to read line by line
            return self._corrupt(None, str(exc).removeprefix(f"{self.path}: "), [], on_corrupt)
        lines = data.split(b"\n")
        lines.pop()  # after the last newline: empty, or a torn append (see the module docstring)
        records: list[dict[str, Any]] = []
        seen: set[tuple[str, int]] = set()
        for number, raw in enumerate(lines, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problem: str | None = "not UTF-8 text"
            except json.JSONDecodeError as exc:
                problem = f"not JSON ({exc.msg})"
            else:
                if number > 1 and isinstance(record, dict) and "context" in record and "state" not in record:
                    record["state"] = record.pop("context")  # earlier versions named the device state "context"
                problem = (
                    self._header_problem(record)
                    if number == 1
                    else _result_problem(record, self._keys, self._max_round)
                )
            if problem is not None:
                return self._corrupt(number, problem, records, on_corrupt)
            if number == 1:
                if record["identity"] != header["identity"]:
                    old, new = record.get("options") or {}, header.get("options") or {}
                    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) if old else []
                    which = f" ({', '.join(differ)} differ)" if differ else ""
                    raise LutError(
                        f"{self.path}: left by an unfinished run with other options, library versions or device{which}; "
                        "rerun that command to finish it, or delete this journal to start over"
                    )
                continue
            if (record["key"], record["round"]) not in seen:
                seen.add((record["key"], record["round"]))
                records.append(record)
        if not lines:
            return self._corrupt(1, "empty, no header", records, on_corrupt)
        return records

    @staticmethod
    def _header_problem(record: Any) -> str | None:
        try:
            parse(JournalHeader, record, "header", LutError)
        except LutError as exc:
            return f"not a journal header ({str(exc).removeprefix('header: ')}; got {str(record)[:80]})"
        return None

    def _corrupt(
        self, number: int | None, problem: str, good: list[dict[str, Any]], on_corrupt: str
    ) -> list[dict[str, Any]]:
        """The records to keep after a bad line (``number`` None: the file as a whole), by the
        caller's choice; ``stop`` raises."""
        if on_corrupt == "restart":
            return []
        if on_corrupt == "drop-tail":
            return good
        if number is None:
            raise LutError(
                f"{self.path}: {problem}; the journal cannot be read - rerun with "
                "--on-corrupt-journal restart to replace it, or delete it"
            )
        raise LutError(
            f"{self.path}: line {number}: {problem}; the journal is corrupt - rerun with "
            f"--on-corrupt-journal drop-tail to keep the {len(good)} results before line {number} "
            "and measure the rest again, or --on-corrupt-journal restart to discard it"
        )

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        try:
            write_file_atomically(self.path, "".join(json.dumps(record) + "\n" for record in records).encode())
        except OSError as exc:  # the journal at its path, if any, is as it was: a rename is all or nothing
            raise cannot_write(exc, self.path, "the journal there is as it was") from None

    def append(self, record: dict[str, Any]) -> None:
        record = {"kind": "result", **record}
        problem = _result_problem(record, self._keys, self._max_round)
        if problem is not None:  # never write what a resumed run would refuse to read back
            raise AmoebaError(f"{self.path}: result for {record.get('key')!r} not journaled: {problem}")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            with os.fdopen(fd, "a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # a line torn by it is repaired when the journal is next opened
            raise cannot_write(exc, self.path, f"the {len(self.records)} results before it are kept there") from None
        self.records.append(record)

    def done(self) -> set[tuple[str, int]]:
        return {(r["key"], r["round"]) for r in self.records}

    def measured_now(self) -> set[str]:
        """Entry keys with a record appended since the journal was opened."""
        return {r["key"] for r in self.records[self.loaded :]}
