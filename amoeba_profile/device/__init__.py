"""What device a table was measured on: detection, a stable slug, and a fingerprint.

Sources, in order: CUDA GPUs through NVML; Jetson boards through sysfs and ``nvpmodel`` (NVML does
not work there); the CPU through /proc. Readers are parameters, so tests replay recorded values.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any

from amoeba_profile.core.errors import UsageError
from amoeba_profile.device.cpu import cpu_info, cpu_model, meminfo_available_bytes
from amoeba_profile.device.cpu import last_level_cache_bytes as _cpu_llc
from amoeba_profile.device.jetson import JetsonReader
from amoeba_profile.device.nvml import GpuReader, NvmlReader, NvmlUnavailable, describe_state
from amoeba_profile.device.specs import DeviceSpec, get_spec, load_specs, match_gpu_name, match_jetson


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|nvidia|geforce|processor|cpu @.*", " ", text.lower())
    return "-".join(re.findall(r"[a-z0-9]+", text)) or "unknown"


def gpu_slug(name: str) -> str:
    """``NVIDIA RTX A5000`` -> ``rtx-a5000``; ``NVIDIA H100 80GB HBM3`` -> ``h100-sxm``."""
    spec = match_gpu_name(name)
    return spec.slug if spec else slugify(name)


def jetson_slug(compatible: str, model: str) -> str:
    spec = match_jetson(compatible, model)
    return spec.slug if spec else slugify(model.replace("Jetson", ""))


def cpu_slug(root: Path = Path("/")) -> str:
    return "cpu-" + slugify(cpu_model(root))


def last_level_cache_bytes(device: str = "cpu", root: Path = Path("/")) -> int:
    """Largest cache level (CPU: sysfs; CUDA: the GPU's L2)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return _cpu_llc(root)


def available_memory_bytes(device: str = "cpu", root: Path = Path("/")) -> int | None:
    """Memory a build may still take: MemAvailable (CPU) or free device memory (CUDA); None if unknown."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return meminfo_available_bytes(root)


def _cuda_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def device_slug(device: str = "cpu", root: Path = Path("/")) -> str:
    """Folder name for tables measured on ``device``."""
    if device.startswith("cuda"):
        jetson = JetsonReader(root)
        if jetson.is_jetson():
            info = jetson.static()
            return jetson_slug(info["compatible"], info["model"] or "")
        import torch

        return gpu_slug(torch.cuda.get_device_name(device))
    return cpu_slug(root)


_TORCH_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device_name(requested: str) -> str:
    """``requested`` as a device name a build measures on (auto, cpu or cuda[:N]), lower case; a
    spec-sheet slug or anything else is a UsageError. Whether this machine has that device is
    ``resolve_device``'s question: a fleet driver checks names for devices on other machines."""
    name = requested.strip().lower()
    if name in load_specs():
        raise UsageError(
            f"device {requested!r} is a spec-sheet entry, not a device torch can measure on: add "
            "--predict to compute its table from the spec sheet (roofline), or measure with "
            "--device auto, cpu or cuda[:N]"
        )
    if name != "auto" and not _TORCH_DEVICE.fullmatch(name):
        raise UsageError(
            f"unknown device {requested!r}: use auto, cpu or cuda[:N] (with --predict: a spec-sheet "
            f"slug, one of {sorted(load_specs())})"
        )
    return name


def resolve_device(requested: str = "auto") -> tuple[str, str]:
    """(torch device, why it was chosen). ``auto`` is CUDA when torch sees a GPU, else the CPU.

    A device this machine cannot measure on - a spec-sheet slug, a GPU torch does not see - is a
    UsageError here, before a build writes its journal: a build that failed later would leave a
    journal that refuses the corrected command."""
    name = check_device_name(requested)
    if name == "cpu":
        return "cpu", "requested"
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return (
            ("cuda", f"auto: torch sees {visible} CUDA device(s)")
            if visible
            else ("cpu", "auto: torch sees no CUDA device")
        )
    if _cuda_index(name) >= visible:
        raise UsageError(
            f"device {requested!r} requested but torch sees {visible} CUDA device(s); use --device cpu"
            " (a CPU-only torch sees none: see README, Install)"
        )
    return name, "requested"


def fingerprint(device: str = "cpu", root: Path = Path("/")) -> dict[str, Any]:
    """Identity of the measuring machine; tables with different fingerprints are never merged silently."""
    cpu = cpu_info(root)
    info: dict[str, Any] = {
        "slug": device_slug(device, root),
        "cpu": cpu["model"],
        "cpu_count": cpu["threads"],
        "machine": platform.machine(),
        "system": platform.system(),
        "llc_bytes": cpu["llc_bytes"],
    }
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_mem_mb=props.total_memory // (1 << 20),
            compute_capability=f"{props.major}.{props.minor}",
        )
    return info


def detect(
    root: Path = Path("/"),
    gpu_reader: GpuReader | None = None,
    jetson: JetsonReader | None = None,
    nvml_factory=NvmlReader,
) -> dict[str, Any]:
    """Everything profile-device reports about this machine, without running anything heavy."""
    report: dict[str, Any] = {
        "cpu": cpu_info(root),
        "cpu_slug": cpu_slug(root),
        "gpus": [],
        "jetson": None,
        "notes": [],
    }
    jetson = jetson or JetsonReader(root)
    if jetson.is_jetson():
        static = jetson.static()
        slug = jetson_slug(static["compatible"], static["model"] or "")
        report["jetson"] = {**static, **jetson.state(), "slug": slug}
        report["notes"].append("Jetson: NVML is not available; state read from sysfs and nvpmodel")
        return report
    if gpu_reader is None:
        try:
            gpu_reader = nvml_factory()
        except NvmlUnavailable as exc:
            report["notes"].append(f"no NVML: {exc}")
            return report
    for index in range(gpu_reader.count()):
        static = gpu_reader.static(index)
        report["gpus"].append(
            {"index": index, **static, "slug": gpu_slug(static["name"]), **describe_state(gpu_reader.state(index))}
        )
    return report


__all__ = [
    "DeviceSpec",
    "JetsonReader",
    "NvmlReader",
    "NvmlUnavailable",
    "available_memory_bytes",
    "check_device_name",
    "cpu_slug",
    "detect",
    "device_slug",
    "fingerprint",
    "get_spec",
    "gpu_slug",
    "jetson_slug",
    "last_level_cache_bytes",
    "load_specs",
    "resolve_device",
    "slugify",
]
