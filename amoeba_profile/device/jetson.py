"""Jetson facts and state from files (NVML does not work on Jetson).

Every read goes through ``root`` so tests run on fixture trees shaped like a real Orin NX, and
every command through ``run`` so tests replay recorded output.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Callable

Runner = Callable[[list[str]], str]

# L4T release -> JetPack (NVIDIA's JetPack archive release notes).
L4T_TO_JETPACK = {
    "35.1": "5.0.2",
    "35.2": "5.1",
    "35.3": "5.1.1",
    "35.4": "5.1.2",
    "35.5": "5.1.3",
    "35.6": "5.1.4",
    "36.2": "6.0 DP",
    "36.3": "6.0",
    "36.4": "6.1/6.2",
}


def run_command(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().replace(b"\x00", b"\n").decode(errors="replace").strip()
    except OSError:
        return None


class JetsonReader:
    def __init__(self, root: Path = Path("/"), run: Runner = run_command):
        self.root = Path(root)
        self.run = run

    def is_jetson(self) -> bool:
        return (self.root / "etc/nv_tegra_release").exists() or "tegra" in (
            _read(self.root / "proc/device-tree/compatible") or ""
        )

    def _gpu_devfreq(self) -> Path | None:
        for entry in sorted((self.root / "sys/class/devfreq").glob("*")):
            name = _read(entry / "device/of_node/name") or ""
            if "gpu" in entry.name or "ga10b" in entry.name or "gpu" in name:
                return entry
        return None

    def static(self) -> dict[str, Any]:
        release = _read(self.root / "etc/nv_tegra_release") or ""
        match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", release)
        l4t = f"{match.group(1)}.{match.group(2)}" if match else None
        major_minor = ".".join(l4t.split(".")[:2]) if l4t else None
        return {
            "model": _read(self.root / "proc/device-tree/model"),
            "compatible": (_read(self.root / "proc/device-tree/compatible") or "").replace("\n", " ").strip(),
            "l4t": l4t,
            "jetpack": L4T_TO_JETPACK.get(major_minor or ""),
            "memory_total_mb": _meminfo_mb(self.root),
        }

    def power_mode(self) -> str | None:
        out = self.run(["nvpmodel", "-q"])
        match = re.search(r"NV Power Mode:\s*(\S+)", out)
        return match.group(1) if match else None

    def state(self) -> dict[str, Any]:
        gpu = self._gpu_devfreq()
        freqs = {}
        if gpu is not None:
            for key in ("cur_freq", "min_freq", "max_freq"):
                value = _read(gpu / key)
                freqs[key] = int(value) // 1_000_000 if value and value.isdigit() else None
        rails = self.rails()
        total = next((r["power_mw"] for r in rails if r["label"] in ("VDD_IN", "POM_5V_IN")), None)
        return {
            "power_mode": self.power_mode(),
            "gpu_freq_mhz": freqs.get("cur_freq"),
            "gpu_min_freq_mhz": freqs.get("min_freq"),
            "gpu_max_freq_mhz": freqs.get("max_freq"),
            # jetson_clocks pins the GPU's devfreq minimum to its maximum.
            "jetson_clocks": bool(freqs.get("min_freq") and freqs.get("min_freq") == freqs.get("max_freq")),
            "rails": rails,
            "power_w": None if total is None else round(total / 1000, 3),
            "temperature_c": self.gpu_temperature(),
        }

    def rails(self) -> list[dict[str, Any]]:
        """INA3221 channels: label, voltage (mV), current (mA), power (mW)."""
        out = []
        for hwmon in sorted((self.root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):
            for label_file in sorted(hwmon.glob("in*_label")):
                channel = label_file.name[2:].split("_")[0]
                label = _read(label_file)
                mv, ma = _read(hwmon / f"in{channel}_input"), _read(hwmon / f"curr{channel}_input")
                if label and mv and ma and mv.isdigit() and ma.isdigit():
                    out.append({"label": label, "mv": int(mv), "ma": int(ma), "power_mw": int(mv) * int(ma) / 1000})
        return out

    def gpu_temperature(self) -> float | None:
        for zone in sorted((self.root / "sys/class/thermal").glob("thermal_zone*")):
            if (_read(zone / "type") or "").lower().startswith("gpu"):
                value = _read(zone / "temp")
                return int(value) / 1000 if value and value.lstrip("-").isdigit() else None
        return None


def _meminfo_mb(root: Path) -> int | None:
    text = _read(root / "proc/meminfo") or ""
    match = re.search(r"MemTotal:\s+(\d+) kB", text)
    return int(match.group(1)) // 1024 if match else None
