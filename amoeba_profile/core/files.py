"""Files written so that a crash never leaves half of one, and file locks that say who holds them.

A lock file alone tells a waiting process nothing, so a second build of a table looked stuck at
its start. The holder writes its pid, host and start time beside the lock (``<lock>.holder``,
``NotedLock``); a waiter prints what it waits for and for how long. The note is advisory: it is
written after the lock is taken and removed before it is released, and one left by a killed holder
is overwritten by the next holder; until then a waiter on the same host sees that its process is
gone and does not name it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from amoeba_profile.core.errors import LutError
from amoeba_profile.core.inputs import KIB, read_bounded

Notice = Callable[[str], None]
_POLL_S = 0.05  # how often a waiter tries the lock again
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
HOLDER_BYTES = 64 * KIB  # a holder note is one line of JSON


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_exclusive(path: Path) -> tuple[int, Path]:
    """A new temp file beside ``path`` with an unpredictable name, created exclusively (so no
    planted symlink is followed) with mode 0666 less the umask - the mode any new file gets, where
    ``mkstemp`` would leave 0600 on every table."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name after 16 tries")


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file (``_create_exclusive``), fsync it, and rename it over ``path``
    (a rename replaces a symlink at ``path`` instead of writing through it)."""
    fd, tmp = _create_exclusive(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_note(lock_path: Path) -> dict[str, Any] | None:
    """The note of whoever holds the lock at ``lock_path``; None without a readable one, or when it
    names a process of this host that is gone (a holder killed before it removed its note)."""
    try:  # bounded and non-blocking: a FIFO or /dev/zero planted as the note must not hang or fill a waiter
        note = json.loads(read_bounded(holder_path(lock_path), HOLDER_BYTES, "lock holder note", error=LutError))
    except (LutError, ValueError, RecursionError):
        return None
    if not isinstance(note, dict) or not isinstance(note.get("pid"), int) or isinstance(note["pid"], bool):
        return None
    if note.get("host", socket.gethostname()) == socket.gethostname() and not _alive(note["pid"]):
        return None
    return note


def describe_holder(lock_path: Path) -> str:
    """'pid N on HOST since T' from the holder note, or 'another process' without a live one."""
    note = holder_note(lock_path)
    if note is None:
        return "another process"
    return f"pid {note['pid']} on {note.get('host', '?')} since {note.get('since', '?')}"


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


class NotedLock:
    """A file lock whose holder leaves a note beside it (``<lock>.holder``): its pid, host and start
    time, and whatever the caller adds. The lock is an ``flock`` on the lock file, and the holder
    removes that file before it lets go, so no ``.lock`` file stays beside a table; a process that
    gets the lock checks that the path still names the file it locked (a waiter may have opened it
    just before it was removed) and otherwise starts again on the file there now. Every lock of the project is one: a table's (``held``) and
    a device's measurement lock (``device/lock.py``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.holder_path = holder_path(self.path)
        self._fd: int | None = None

    def _take(self, timeout_s: float) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = _acquire(self.path, timeout_s)
        return self._fd is not None

    def _let_go(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _release(self.path, fd)

    def acquire(self, timeout_s: float, waiting: Callable[[], None], note: dict[str, Any] | None = None) -> bool:
        """Take the lock and write the note; False when another process kept it. Held elsewhere:
        ``timeout_s`` 0 gives up at once; otherwise ``waiting()`` is called (to say whom we wait for)
        and the wait lasts up to ``timeout_s`` (< 0: until it is released)."""
        if not self._take(0):
            if timeout_s == 0:
                return False
            waiting()
            if not self._take(timeout_s):
                return False
        try:
            since = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_file_atomically(
                self.holder_path,
                json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since, **(note or {})}).encode(),
            )
        except BaseException:
            self._let_go()
            raise
        return True

    def release(self) -> None:
        self.holder_path.unlink(missing_ok=True)
        self._let_go()


@contextmanager
def held(lock_path: Path, what: str, timeout_s: float = -1, notice: Notice | None = None) -> Iterator[None]:
    """Hold the lock at ``lock_path``; ``what`` names what it guards in messages.

    When another process holds it, ``notice`` gets one line naming the holder and how long this
    process waits (``timeout_s`` < 0: until it is released); after ``timeout_s`` a ``LutError``
    names the holder."""
    lock = NotedLock(lock_path)

    def waiting() -> None:
        if notice is not None:
            wait = "until it is released" if timeout_s < 0 else f"for up to {timeout_s:g} s"
            notice(f"{what} is locked by {describe_holder(lock_path)} ({lock_path}); waiting {wait}")

    if not lock.acquire(timeout_s, waiting):
        raise LutError(
            f"{what} is locked by {describe_holder(lock_path)} ({lock_path}); another build or "
            "validation is using it - wait for it to finish"
        )
    try:
        yield
    finally:
        lock.release()


def table_lock(path: Path, timeout_s: float = -1, notice: Notice | None = None):
    """The lock every writer of one table holds: a build, a validation write-back, a roofline write, a reseal."""
    return held(Path(str(path) + ".lock"), f"table {path}", timeout_s, notice)
