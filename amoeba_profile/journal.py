"""The build journal: every (entry, round) result is fsynced before the next one starts.

Append-only JSON lines under the table's name; a torn last line (killed mid-write) is ignored on
reading, and a journal left by a build with other options is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import LutError
from .lut import write_file_atomically


class Journal:
    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            parsed = []
            for line in path.read_text().splitlines():
                try:
                    parsed.append(json.loads(line))
                except json.JSONDecodeError:
                    break
            if parsed and parsed[0].get("kind") == "header":
                if parsed[0]["identity"] != header["identity"]:
                    old, new = parsed[0].get("options") or {}, header.get("options") or {}
                    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) if old else []
                    which = f" ({', '.join(differ)} differ)" if differ else ""
                    raise LutError(
                        f"{path}: left by an unfinished build with other options, library versions or device{which}; "
                        "rerun that build to finish it, or delete this journal to start over"
                    )
                self.records = [r for r in parsed[1:] if r.get("kind") == "result"]
                # Rewrite without any torn tail so later appends start on a clean line.
                self._rewrite([parsed[0], *self.records])
                return
        self._rewrite([header])

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        write_file_atomically(self.path, "".join(json.dumps(record) + "\n" for record in records).encode())

    def append(self, record: dict[str, Any]) -> None:
        record = {"kind": "result", **record}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)

    def done(self) -> set[tuple[str, int]]:
        return {(r["key"], r["round"]) for r in self.records}
