"""CUDA GPU facts and state through NVML (``nvidia-ml-py``), behind a thin reader.

``NvmlReader`` talks to the driver; ``RecordedReader`` replays values captured from a real GPU so
tests (and machines without a GPU) exercise the same parsing.
"""

from __future__ import annotations

from typing import Any, Protocol

# NVML clock-event (throttle) reason bits, from nvml.h (nvmlClocksEventReason*).
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean the GPU ran slower than it could for reasons outside the workload.
THROTTLING = {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}


def decode_reasons(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


class GpuReader(Protocol):
    def count(self) -> int: ...
    def static(self, index: int) -> dict[str, Any]: ...
    def state(self, index: int) -> dict[str, Any]: ...


class NvmlUnavailable(Exception):
    """NVML cannot be used here (no library, no driver, or a Jetson); the message says which."""


class NvmlReader:
    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError:
            raise NvmlUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML did not initialise ({exc}); no NVIDIA driver, or a Jetson") from None
        self.nv = pynvml

    def _handle(self, index: int):
        return self.nv.nvmlDeviceGetHandleByIndex(index)

    def _try(self, fn, *args, default=None):
        try:
            return fn(*args)
        except self.nv.NVMLError:
            return default

    def count(self) -> int:
        return int(self.nv.nvmlDeviceGetCount())

    def static(self, index: int) -> dict[str, Any]:
        nv, h = self.nv, self._handle(index)
        name = nv.nvmlDeviceGetName(h)
        major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
        cuda = self._try(nv.nvmlSystemGetCudaDriverVersion, default=0)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "memory_total_mb": nv.nvmlDeviceGetMemoryInfo(h).total // (1 << 20),
            "compute_capability": f"{major}.{minor}",
            "driver_version": _text(nv.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            "max_sm_clock_mhz": self._try(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_SM),
            "max_mem_clock_mhz": self._try(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_MEM),
            "power_limit_w": _scaled(self._try(nv.nvmlDeviceGetPowerManagementLimit, h), 1e-3),
        }

    def state(self, index: int) -> dict[str, Any]:
        nv, h = self.nv, self._handle(index)
        reasons_fn = (
            getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        return {
            "sm_clock_mhz": self._try(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": self._try(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM),
            "temperature_c": self._try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
            "power_w": _scaled(self._try(nv.nvmlDeviceGetPowerUsage, h), 1e-3),
            "energy_mj": self._try(nv.nvmlDeviceGetTotalEnergyConsumption, h),
            "clock_event_mask": self._try(reasons_fn, h, default=0),
        }


class RecordedReader:
    """Replays ``{"static": [...], "states": [[...], ...]}`` recorded from real GPUs."""

    def __init__(self, recorded: dict[str, Any]):
        self.recorded = recorded
        self._calls = 0

    def count(self) -> int:
        return len(self.recorded["static"])

    def static(self, index: int) -> dict[str, Any]:
        return dict(self.recorded["static"][index])

    def state(self, index: int) -> dict[str, Any]:
        states = self.recorded["states"][index]
        self._calls += 1
        return dict(states[min(self._calls - 1, len(states) - 1)])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _scaled(value: Any, factor: float) -> float | None:
    return None if value is None else round(value * factor, 3)


def describe_state(state: dict[str, Any]) -> dict[str, Any]:
    """Add decoded reasons and a throttled flag to a raw state."""
    reasons = decode_reasons(int(state.get("clock_event_mask") or 0))
    return {**state, "clock_event_reasons": reasons, "throttled": bool(THROTTLING.intersection(reasons))}
