"""One measurement per device at a time, machine-wide.

Two builds (or a build and a validate) that measure on one device at once slow each other down
without a trace in either table, even when they write different tables. Every measurement holds a
file lock named after the device, a ``core.files.NotedLock``: the holder writes who it is (pid,
host, command, target, since) beside the lock, so a second measurement says whom it waits for. The
lock folder is per user (``$AMOEBA_LOCK_DIR``, else ``$XDG_RUNTIME_DIR/amoeba-profile``, else
``<tmp>/amoeba-profile-<uid>``): other users' processes are seen by the load check (``load.py``)
instead. A holder killed with SIGKILL releases the lock with its process; its stale holder file is
ignored and replaced.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from amoeba_profile.core.errors import MachineBusy, UsageError
from amoeba_profile.core.files import NotedLock, Notice, holder_note


def lock_dir() -> Path:
    if os.environ.get("AMOEBA_LOCK_DIR"):
        return Path(os.environ["AMOEBA_LOCK_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "amoeba-profile"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"amoeba-profile-{uid}"


class MeasurementLock:
    """The machine-wide lock of one device (``device`` as the backend names it, ``slug`` its folder name)."""

    def __init__(self, device: str, slug: str, folder: Path | None = None):
        index = device.split(":")[1] if ":" in device else ""
        name = re.sub(r"[^a-z0-9.-]+", "-", f"{slug}-{index}".strip("-").lower())
        self.folder = Path(folder) if folder is not None else lock_dir()
        self.path = self.folder / f"measure-{name}.lock"
        self._lock = NotedLock(self.path)
        self.holder_path = self._lock.holder_path

    def _prepare(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if hasattr(os, "getuid") and self.folder.stat().st_uid != os.getuid():
            raise UsageError(f"{self.folder} belongs to another user; set AMOEBA_LOCK_DIR to a folder of yours")

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock, from its holder note; None when nobody alive is recorded there."""
        return holder_note(self.path)

    def describe_holder(self) -> str:
        info = self.holder()
        if info is None:
            return "another measurement (holder unknown)"
        return (
            f"pid {info['pid']} ({info.get('command', '?')}) measuring {info.get('target', '?')} "
            f"since {info.get('since', '?')}"
        )

    def acquire(self, target: str, notice: Notice, timeout_s: float = -1) -> None:
        """Take the lock; if another measurement holds it, say whom we wait for, then wait
        (``timeout_s`` < 0: as long as it takes) or raise ``MachineBusy``."""
        self._prepare()
        bound = "" if timeout_s < 0 else f" (up to {timeout_s:g} s)"

        def waiting() -> None:
            notice(
                f"waiting for the {self.path.stem.removeprefix('measure-')} measurement lock{bound}: held by "
                f"{self.describe_holder()}"
            )

        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:160]
        if not self._lock.acquire(timeout_s, waiting, {"command": command, "target": target}):
            who = self.describe_holder()
            raise MachineBusy(
                f"{who} holds {self.path}; wait for it to finish"
                if timeout_s == 0
                else f"{who} still holds {self.path} after {timeout_s:g} s"
            )

    def release(self) -> None:
        self._lock.release()


def measuring_pids(folder: Path | None = None) -> list[int]:
    """Processes (other than this one) holding a measurement lock now: their load goes away before
    our own measurement starts, because it waits for them."""
    folder = Path(folder) if folder is not None else lock_dir()
    pids = []
    for path in folder.glob("measure-*.lock.holder") if folder.is_dir() else ():
        note = holder_note(path.with_name(path.name.removesuffix(".holder")))
        if note is not None and note["pid"] != os.getpid():
            pids.append(note["pid"])
    return pids
