"""profile-device: detection + state + micro-benchmarks in one report."""

from __future__ import annotations

from typing import Any

from . import detect, device_slug, require_device
from .bench import run_microbenchmarks
from .specs import get_spec, load_specs


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def profile(device: str = "auto", bench: bool = True, quick: bool = False) -> dict[str, Any]:
    device = resolve_device(device)
    require_device(device)
    report = detect()
    slug = device_slug(device)
    spec = load_specs().get(slug)
    report.update(device=device, slug=slug, spec=spec.to_dict() if spec else None)
    if spec is None:
        report["notes"].append(f"no spec-sheet entry for {slug}: fractions of peak are not reported")
    if bench:
        shapes = {"hidden": 2048, "ffn": 5632, "prompt_len": 128, "copy_mb": 256} if quick else {}
        report["microbench"] = run_microbenchmarks(device, spec=get_spec(slug) if spec else None, **shapes)
    return report
