"""The spec sheet (``data/specs.json``): peak numbers per device, each with its source."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from amoeba_profile.core.errors import UsageError

_NUMERIC = ("memory_gb", "mem_bw_gbps", "fp32_tflops", "fp16_tflops", "bf16_tflops", "int8_tops")
DTYPE_PEAK = {"float32": "fp32_tflops", "float16": "fp16_tflops", "bfloat16": "bf16_tflops", "int8": "int8_tops"}


@dataclass(frozen=True)
class DeviceSpec:
    slug: str
    name: str
    kind: str
    memory_gb: float
    mem_bw_gbps: float
    fp32_tflops: float
    fp16_tflops: float
    bf16_tflops: float
    int8_tops: float
    source: str
    match: tuple[str, ...] = ()
    jetson_compatible: tuple[str, ...] = ()
    shared_memory: bool = False

    def peak_tflops(self, dtype: str) -> float:
        if dtype not in DTYPE_PEAK:
            raise UsageError(f"no spec-sheet peak for dtype {dtype!r}: use one of {sorted(DTYPE_PEAK)}")
        return float(getattr(self, DTYPE_PEAK[dtype]))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def validate_specs(data: dict[str, Any]) -> dict[str, DeviceSpec]:
    """Parse and check the spec data; a bad entry raises UsageError naming device and field."""
    devices = data.get("devices")
    if not isinstance(devices, dict) or not devices:
        raise UsageError("spec sheet: 'devices' must be a non-empty object")
    out = {}
    for slug, entry in devices.items():
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug):
            raise UsageError(f"spec sheet: device key {slug!r} is not a slug (lowercase, digits, dashes)")
        for field in _NUMERIC:
            value = entry.get(field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"spec sheet: {slug}.{field} must be a positive number, got {value!r}")
        if not str(entry.get("source", "")).strip():
            raise UsageError(f"spec sheet: {slug}.source is required (where each number comes from)")
        if entry.get("kind") not in ("gpu", "jetson", "cpu"):
            raise UsageError(f"spec sheet: {slug}.kind must be gpu, jetson or cpu")
        if entry["bf16_tflops"] > entry["int8_tops"] or entry["fp32_tflops"] > entry["fp16_tflops"] * 1.01:
            raise UsageError(f"spec sheet: {slug} peaks are inconsistent (expect fp32 <= fp16 <= int8)")
        out[slug] = DeviceSpec(
            slug=slug,
            name=entry["name"],
            kind=entry["kind"],
            source=entry["source"],
            match=tuple(entry.get("match", ())),
            jetson_compatible=tuple(entry.get("jetson_compatible", ())),
            shared_memory=bool(entry.get("shared_memory", False)),
            **{f: float(entry[f]) for f in _NUMERIC},
        )
    return out


@lru_cache(maxsize=1)
def load_specs() -> dict[str, DeviceSpec]:
    text = resources.files("amoeba_profile").joinpath("data/specs.json").read_text()
    return validate_specs(json.loads(text))


def get_spec(slug: str) -> DeviceSpec:
    specs = load_specs()
    if slug not in specs:
        raise UsageError(f"no spec-sheet entry for device {slug!r}: use one of {sorted(specs)}")
    return specs[slug]


def shared_memory_note(slug: str) -> str | None:
    """A note for a memory budget on a device whose CPU and GPU share one memory (a Jetson): the
    budget must leave room for the OS and the runtime. None for other or unknown devices."""
    spec = load_specs().get(slug)
    if spec is not None and spec.shared_memory:
        return (
            f"{spec.name}: its {spec.memory_gb:g} GB are shared by CPU and GPU; leave room for the OS and "
            "the runtime when choosing --memory-gb"
        )
    return None


def match_gpu_name(name: str) -> DeviceSpec | None:
    """The spec whose ``match`` strings occur in an NVML/torch GPU name as whole words."""
    for spec in load_specs().values():
        for pattern in spec.match:
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(pattern)}(?![A-Za-z0-9])", name, re.IGNORECASE):
                return spec
    return None


def match_jetson(compatible: str, model: str) -> DeviceSpec | None:
    for spec in load_specs().values():
        if any(c in compatible for c in spec.jetson_compatible):
            return spec
    for spec in load_specs().values():
        if spec.kind == "jetson" and any(m.lower() in model.lower() for m in spec.match):
            return spec
    return None
