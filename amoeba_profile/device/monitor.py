"""Device state sampled around every measured entry: clocks, temperature, throttling, power, energy.

Sources: NVML on CUDA GPUs (with its total-energy counter), sysfs on Jetson (INA3221 power,
integrated as the mean of the two readings times the elapsed time), and on CPUs the RAPL energy
counter where the kernel exposes it. A source that is missing yields empty samples, never an error.
Every monitor also reads the host's CPU time (``load.py``), so each entry records how much of the
cores it needed other processes took while it ran.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from amoeba_profile.device.jetson import JetsonReader
from amoeba_profile.device.load import CpuLoad, contention_share, others_cpu_s
from amoeba_profile.device.nvml import NvmlReader, NvmlUnavailable, describe_state


class Monitor:
    """Base: no readable device state; samples hold a timestamp and, with ``load``, the host's CPU
    time and the cores the measured work needs (``needed``)."""

    source = "none"
    load: CpuLoad | None = None
    needed: int = 1

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": time.perf_counter()}
        if self.load is not None:
            out["cpu"] = {**self.load.read(), "needed": self.needed}
        return out


class NvmlMonitor(Monitor):
    source = "nvml"

    def __init__(self, reader, index: int):
        self.reader, self.index = reader, index

    def sample(self) -> dict[str, Any]:
        state = describe_state(self.reader.state(self.index))
        return {
            **super().sample(),
            **{
                k: state[k]
                for k in (
                    "sm_clock_mhz",
                    "mem_clock_mhz",
                    "temperature_c",
                    "power_w",
                    "energy_mj",
                    "clock_event_reasons",
                    "throttled",
                )
            },
        }


class JetsonMonitor(Monitor):
    source = "jetson-sysfs"

    def __init__(self, reader: JetsonReader):
        self.reader = reader

    def sample(self) -> dict[str, Any]:
        state = self.reader.state()
        return {
            **super().sample(),
            "sm_clock_mhz": state["gpu_freq_mhz"],
            "temperature_c": state["temperature_c"],
            "power_w": state["power_w"],
            "power_mode": state["power_mode"],
            "jetson_clocks": state["jetson_clocks"],
        }


class RaplMonitor(Monitor):
    source = "rapl"

    def __init__(self, counter: Path):
        self.counter = counter

    def sample(self) -> dict[str, Any]:
        return {**super().sample(), "energy_mj": int(self.counter.read_text()) / 1000}


def monitor_for(device: str, root: Path = Path("/"), load: CpuLoad | None = None, needed: int = 1) -> Monitor:
    """The device's monitor; with ``load`` its samples also carry the host's CPU time, judged
    against the ``needed`` cores of the measured work."""
    monitor = _device_monitor(device, root)
    monitor.load, monitor.needed = load, needed
    return monitor


def _device_monitor(device: str, root: Path) -> Monitor:
    if device.startswith("cuda"):
        jetson = JetsonReader(root)
        if jetson.is_jetson():
            return JetsonMonitor(jetson)
        try:
            return NvmlMonitor(NvmlReader(), int(device.split(":")[1]) if ":" in device else 0)
        except NvmlUnavailable:
            return Monitor()
    counter = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    try:
        int(counter.read_text())
        return RaplMonitor(counter)
    except (OSError, ValueError):
        return Monitor()


def entry_state(before: dict[str, Any], after: dict[str, Any], steps: int) -> dict[str, Any]:
    """Summarize two samples around ``steps`` timed-or-warm-up steps: energy per step and state."""
    state: dict[str, Any] = {}
    if before.get("energy_mj") is not None and after.get("energy_mj") is not None and steps:
        state["energy_mj_per_step"] = (after["energy_mj"] - before["energy_mj"]) / steps
    elif before.get("power_w") is not None and after.get("power_w") is not None and steps:
        # Two-point INA3221 integration (Jetson): mean power x elapsed time.
        elapsed = after["t"] - before["t"]
        state["energy_mj_per_step"] = (before["power_w"] + after["power_w"]) / 2 * elapsed * 1000 / steps
    temps = [x for s in (before, after) if (x := s.get("temperature_c")) is not None]
    clocks = [x for s in (before, after) if (x := s.get("sm_clock_mhz")) is not None]
    powers = [x for s in (before, after) if (x := s.get("power_w")) is not None]
    if temps:
        state["temperature_c"] = max(temps)
    if clocks:
        state["clock_mhz"] = min(clocks)
    if powers:
        state["power_w"] = sum(powers) / len(powers)
    state["throttled"] = bool(before.get("throttled") or after.get("throttled"))
    reasons = sorted(set(before.get("clock_event_reasons") or []) | set(after.get("clock_event_reasons") or []))
    if reasons:
        state["clock_event_reasons"] = reasons
    if before.get("cpu") and after.get("cpu"):
        others = others_cpu_s(before["cpu"], after["cpu"])
        if others is not None:
            # Raw CPU-seconds and window, pooled over a row's rounds before the share is judged.
            state.update(
                others_cpu_s=others,
                window_s=after["cpu"]["t"] - before["cpu"]["t"],
                cores=after["cpu"]["cores"],
                cores_needed=after["cpu"]["needed"],
            )
    return state


# Pooled windows shorter than this are not judged: at the kernel's 10 ms accounting tick the
# share's error would approach the threshold.
MIN_JUDGED_S = 0.5


def host_contention(states: list[dict[str, Any]]) -> float | None:
    """Share of the needed cores other processes took over all of a row's measured windows,
    pooled (``load.contention_share``); None when the windows add up to less than ``MIN_JUDGED_S``."""
    windows = [c for c in states if c.get("window_s") is not None and c.get("others_cpu_s") is not None]
    window = sum(c["window_s"] for c in windows)
    if window < MIN_JUDGED_S:
        return None
    others = sum(c["others_cpu_s"] for c in windows) / window
    return contention_share(others, windows[-1]["cores"], windows[-1]["cores_needed"])
