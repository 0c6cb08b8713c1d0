"""CPU facts from /proc and /sys (read through ``root`` so tests use fixture trees)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

# ISA extensions that change which inference kernels run (oneDNN / llama.cpp / ONNX Runtime paths).
INFERENCE_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimdhp",
    "asimddp",
    "sve",
    "sve2",
    "i8mm",
    "bf16",
)
ARM_ALIASES = {"asimd": "neon"}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cpu_model(root: Path = Path("/")) -> str:
    text = _read(root / "proc/cpuinfo")
    for key in ("model name", "Model", "Hardware"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_info(root: Path = Path("/")) -> dict[str, Any]:
    text = _read(root / "proc/cpuinfo")
    flags: set[str] = set()
    for match in re.finditer(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE):
        flags.update(match.group(1).split())
    physical = {(m.group(1)) for m in re.finditer(r"^core id\s*:\s*(\d+)", text, re.MULTILINE)}
    threads = len(re.findall(r"^processor\s*:", text, re.MULTILINE)) or os.cpu_count()
    mem = re.search(r"MemTotal:\s+(\d+) kB", _read(root / "proc/meminfo"))
    return {
        "model": cpu_model(root),
        "threads": threads,
        "cores": len(physical) or threads,
        "isa": sorted(ARM_ALIASES.get(f, f) for f in INFERENCE_FLAGS if f in flags),
        "memory_gb": round(int(mem.group(1)) / (1 << 20), 1) if mem else None,
        "llc_bytes": last_level_cache_bytes(root),
    }


def meminfo_available_bytes(root: Path = Path("/")) -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), or None."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", _read(root / "proc/meminfo"), re.MULTILINE)
    return int(match.group(1)) << 10 if match else None


def last_level_cache_bytes(root: Path = Path("/")) -> int:
    """Largest CPU cache level from sysfs; 32 MiB when unknown."""
    sizes = []
    for size_file in (root / "sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", _read(size_file).strip())
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])
    return max(sizes, default=32 << 20)
