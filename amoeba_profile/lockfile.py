"""File locks that say who holds them, and leave nothing behind.

A lock file alone tells a waiting process nothing, so a second build of a table looked stuck at
its start. The holder writes its pid, host and start time beside the lock (``<lock>.holder``); a
waiter prints what it waits for and for how long. The note is advisory: it is written after the
lock is taken and removed before it is released, and one left by a killed holder is overwritten by
the next holder (a waiter may read it in between and name the dead process).

The lock is an ``flock`` on ``<table>.csv.lock``, and the holder removes that file before it lets
go, so no ``.lock`` file stays beside a table. Removing a lock file is safe only with a check on
the other side: a waiter may have opened the file just before it was removed, and would then win
the lock on a file nobody else opens. So a process that gets the lock checks that the path still
names the file it locked, and otherwise starts again on the file there now. A holder killed with
SIGKILL releases its flock with its process and leaves the file, which the next holder removes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from .errors import LutError
from .lut import write_file_atomically

Notice = Callable[[str], None]
_POLL_S = 0.05  # how often a waiter tries the lock again
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def describe_holder(lock_path: Path) -> str:
    """'pid N on HOST since T' from the holder note, or 'another process' without a readable one."""
    try:
        note = json.loads(holder_path(lock_path).read_text())
        return f"pid {int(note['pid'])} on {note['host']} since {note['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _same_file(lock_path: Path, fd: int) -> bool:
    """Whether ``lock_path`` still names the file open at ``fd``."""
    try:
        now = os.stat(lock_path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _open_lock_file(lock_path: Path) -> int:
    """The lock file, created if missing; a planted symbolic link is refused, not followed."""
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LutError(f"{lock_path}: a symbolic link where a lock file belongs; remove it") from None
        raise


def _try_lock(lock_path: Path) -> int | None:
    """A descriptor holding the lock at ``lock_path``, or None while another process holds it."""
    while True:
        fd = _open_lock_file(lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _BUSY:
                return None
            raise
        if _same_file(lock_path, fd):
            return fd
        os.close(fd)  # its holder removed it after we opened it: lock the file there now instead


def _acquire(lock_path: Path, timeout_s: float) -> int | None:
    """The lock's descriptor, waiting up to ``timeout_s`` (< 0: as long as it takes), or None."""
    deadline = None if timeout_s < 0 else time.monotonic() + timeout_s
    while True:
        fd = _try_lock(lock_path)
        if fd is not None or (deadline is not None and time.monotonic() >= deadline):
            return fd
        time.sleep(_POLL_S)


def _release(lock_path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (see the module docstring), then let go."""
    try:
        if _same_file(lock_path, fd):
            lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def held(lock_path: Path, what: str, timeout_s: float = -1, notice: Notice | None = None) -> Iterator[None]:
    """Hold the lock at ``lock_path``; ``what`` names what it guards in messages.

    When another process holds it, ``notice`` gets one line naming the holder and how long this
    process waits (``timeout_s`` < 0: until it is released); after ``timeout_s`` a ``LutError``
    names the holder. The lock file is gone once the block ends (its folder is made if missing)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_path, 0)
    if fd is None:
        if timeout_s != 0 and notice is not None:
            wait = "until it is released" if timeout_s < 0 else f"for up to {timeout_s:g} s"
            notice(f"{what} is locked by {describe_holder(lock_path)} ({lock_path}); waiting {wait}")
        fd = _acquire(lock_path, timeout_s) if timeout_s != 0 else None
        if fd is None:
            raise LutError(f"{what} is locked by {describe_holder(lock_path)} ({lock_path}); another build or "
                           "validation is using it - wait for it to finish")
    try:
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_file_atomically(holder_path(lock_path), json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode())
        yield
    finally:
        holder_path(lock_path).unlink(missing_ok=True)
        _release(lock_path, fd)


def table_lock(path: Path, timeout_s: float = -1, notice: Notice | None = None):
    """The lock every writer of one table holds: a build, a validation write-back, a roofline write, a reseal."""
    return held(Path(str(path) + ".lock"), f"table {path}", timeout_s, notice)
