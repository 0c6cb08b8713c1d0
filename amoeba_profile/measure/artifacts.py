"""On-disk cache of compiled engines, so a shape is compiled once and loaded every round.

An artifact's key is a hash of everything that makes a compiled engine reusable: backend and its
config (dtype, flags), the layer shapes, max batch / input / sequence lengths, the library versions
and the device architecture. A compile writes into a temporary folder that is renamed into place,
so a crash mid-compile never leaves a half engine under a valid key; a lock stops two builds from
compiling the same key at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from amoeba_profile.backends.base import Backend, EngineSpec


def default_root() -> Path:
    base = (
        os.environ.get("AMOEBA_ARTIFACTS")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "amoeba-profile" / "artifacts"
    )
    return Path(base)


def artifact_key(backend: Backend, spec: EngineSpec) -> dict[str, Any]:
    return {
        "backend": backend.name,
        "config": backend.config_dict(),
        "spec": spec.to_dict(),
        "versions": backend.versions(),
        "device_arch": backend.device_arch(),
    }


@dataclass(frozen=True)
class Artifact:
    path: Path
    compile_s: float  # seconds this call spent compiling; 0.0 when it was already cached
    compiled: bool


class ArtifactCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def path_for(self, backend: Backend, spec: EngineSpec) -> Path:
        digest = hashlib.sha256(json.dumps(artifact_key(backend, spec), sort_keys=True).encode()).hexdigest()[:20]
        return self.root / backend.name / digest

    def ensure(self, backend: Backend, spec: EngineSpec) -> Artifact:
        """The compiled engine for ``spec``, compiling it only when no finished artifact exists."""
        path = self.path_for(backend, spec)
        if (path / "manifest.json").is_file():
            return Artifact(path, 0.0, False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if (path / "manifest.json").is_file():
                return Artifact(path, 0.0, False)
            shutil.rmtree(path, ignore_errors=True)  # a folder without a manifest is an interrupted compile
            scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            try:
                t0 = time.perf_counter()
                backend.compile(spec, scratch)
                compile_s = time.perf_counter() - t0
                manifest = {**artifact_key(backend, spec), "compile_s": round(compile_s, 3)}
                (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
                os.replace(scratch, path)
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
        return Artifact(path, compile_s, True)
