"""What device a table was measured on: a fingerprint for the sidecar and a slug for the folder."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any


def _cpu_model(root: Path = Path("/")) -> str:
    try:
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def last_level_cache_bytes(device: str = "cpu", root: Path = Path("/")) -> int:
    """Largest cache level's size (CPU: sysfs; CUDA: the GPU's L2); 32 MiB when unknown."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    sizes = []
    for size_file in (root / "sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", size_file.read_text().strip())
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])
    return max(sizes, default=32 << 20)


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|nvidia|geforce|processor|cpu @.*", " ", text.lower())
    return "-".join(re.findall(r"[a-z0-9]+", text)) or "unknown"


def device_slug(device: str = "cpu") -> str:
    """Folder name for tables of this device: ``rtx-a5000``, ``h100-80gb-hbm3``, ``cpu-intel-xeon``."""
    if device.startswith("cuda"):
        import torch

        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(_cpu_model())


def fingerprint(device: str = "cpu") -> dict[str, Any]:
    """Identity of the measuring machine; tables with different fingerprints are never merged silently."""
    info: dict[str, Any] = {
        "slug": device_slug(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "llc_bytes": last_level_cache_bytes("cpu"),
    }
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_mem_mb=props.total_memory // (1 << 20), compute_capability=f"{props.major}.{props.minor}")
    return info
