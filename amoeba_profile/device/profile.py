"""profile-device: detection + state + micro-benchmarks in one report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amoeba_profile.device import detect, device_slug, resolve_device
from amoeba_profile.device.bench import Progress, run_microbenchmarks
from amoeba_profile.device.specs import get_spec, load_specs


def profile(
    device: str = "auto", bench: bool = True, quick: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """``progress(done, total, label)`` is called before each micro-benchmark and once at the end."""
    device, _ = resolve_device(device)
    report = detect()
    slug = device_slug(device)
    spec = load_specs().get(slug)
    report.update(device=device, slug=slug, spec=spec.to_dict() if spec else None)
    if spec is None:
        report["notes"].append(f"no spec-sheet entry for {slug}: fractions of peak are not reported")
    if bench:
        spec_sheet = get_spec(slug) if spec else None
        if quick:
            report["microbench"] = run_microbenchmarks(
                device, spec=spec_sheet, progress=progress, hidden=2048, ffn=5632, prompt_len=128, copy_mb=256
            )
        else:
            report["microbench"] = run_microbenchmarks(device, spec=spec_sheet, progress=progress)
    return report


def write_profile(report: dict[str, Any], out_dir: Path | str) -> Path:
    """Write ``report`` to ``<out_dir>/<device-slug>/device.json``, beside where that device's tables
    go (``build-lut --predict --device-profile`` reads it back); returns the path."""
    from amoeba_profile.core.files import write_file_atomically
    from amoeba_profile.core.inputs import output_dir

    path = output_dir(Path(out_dir) / report["slug"], "--out") / "device.json"
    write_file_atomically(path, (json.dumps(report, indent=2, default=str) + "\n").encode())
    return path
