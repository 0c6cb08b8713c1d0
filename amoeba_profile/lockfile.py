"""File locks that say who holds them.

A ``FileLock`` alone tells a waiting process nothing, so a second build of a table looked stuck at
its start. The holder writes its pid, host and start time beside the lock (``<lock>.holder``); a
waiter prints what it waits for and for how long. The note is advisory: it is written after the
lock is taken and removed before it is released, and one left by a killed holder is overwritten by
the next holder (a waiter may read it in between and name the dead process).
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from .errors import LutError
from .inputs import KIB, read_bounded
from .lut import write_file_atomically

Notice = Callable[[str], None]
HOLDER_BYTES = 64 * KIB


def holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def describe_holder(lock_path: Path) -> str:
    """'pid N on HOST since T' from the holder note, or 'another process' without a readable one."""
    try:  # bounded and non-blocking: a FIFO planted as the note must not hang the waiter
        note = json.loads(read_bounded(holder_path(lock_path), HOLDER_BYTES, "lock holder note", error=LutError))
        return f"pid {int(note['pid'])} on {note['host']} since {note['since']}"
    except (LutError, ValueError, KeyError, TypeError, RecursionError):
        return "another process"


def _acquire(lock: FileLock, timeout_s: float) -> bool:
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        return False
    return True


@contextmanager
def held(lock_path: Path, what: str, timeout_s: float = -1, notice: Notice | None = None) -> Iterator[None]:
    """Hold the lock at ``lock_path``; ``what`` names what it guards in messages.

    When another process holds it, ``notice`` gets one line naming the holder and how long this
    process waits (``timeout_s`` < 0: until it is released); after ``timeout_s`` a ``LutError``
    names the holder."""
    lock = FileLock(str(lock_path))
    if not _acquire(lock, 0):
        if timeout_s != 0 and notice is not None:
            wait = "until it is released" if timeout_s < 0 else f"for up to {timeout_s:g} s"
            notice(f"{what} is locked by {describe_holder(lock_path)} ({lock_path}); waiting {wait}")
        if timeout_s == 0 or not _acquire(lock, timeout_s):
            raise LutError(f"{what} is locked by {describe_holder(lock_path)} ({lock_path}); another build or "
                           "validation is using it - wait for it to finish")
    try:
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_file_atomically(holder_path(lock_path), json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode())
        yield
    finally:
        holder_path(lock_path).unlink(missing_ok=True)
        lock.release()


def table_lock(path: Path, timeout_s: float = -1, notice: Notice | None = None):
    """The lock every writer of one table holds: a build, a validation write-back, a roofline write, a reseal."""
    return held(Path(str(path) + ".lock"), f"table {path}", timeout_s, notice)
