"""Does a calibrated roofline predict a table it was not fitted on? And what does it say for
devices not at hand?

1. Fits the pytorch flow's efficiencies (eff_bw, eff_compute, launch_us) on one measured table
   and reports median / max |error| on another measured table of a different model.
2. Prints the predicted llama2-7b fp16 decode per token and 128-token prefill for the shipped
   roofline tables (RTX A5000 and Orin NX 16GB), beside the pure bandwidth and compute bounds.

    python benchmarks/roofline_calibration.py --fit lut/.../tinyllama-1.1b-float32.csv \
        --test lut/.../llama2-7b-float32.csv --profile out/devices/<slug>/device.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from amoeba_profile.backends.flows import roofline_profiles

from amoeba_profile.core.arch import BUILTIN_ARCHS
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.workload import Workload
from amoeba_profile.device.specs import get_spec
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_one, load_table
from amoeba_profile.table.roofline import (
    calibrate,
    default_efficiency,
    evaluate,
    get_flow,
    spec_from_profile,
    whole_model_bounds,
)

CPU_TABLES = Path("lut/cpu-intel-xeon/pytorch")


def calibration_figures(fit_path: Path, test_path: Path, profile_path: Path) -> None:
    fit, test = load_table(fit_path), load_table(test_path)
    dtype = fit.meta.dtype
    spec = spec_from_profile(json.loads(profile_path.read_text()), dtype)
    flow = get_flow(fit.meta.backend, roofline_profiles())
    print(f"device peaks (profile-device): {spec.mem_bw_gbps:.1f} GB/s, {spec.peak_tflops(dtype):.3f} TFLOP/s {dtype}")
    for label, eff in (("documented defaults", default_efficiency(flow)), ("calibrated", None)):
        if eff is None:
            eff, report = calibrate(fit, spec, flow, dtype)
            print(
                f"fit on {fit_path.name}: {report['rows']} rows, median |err| {report['median_abs_pct']} %, "
                f"max {report['max_abs_pct']} %  -> {report['efficiency']}"
            )
        held_out = evaluate(test, spec, flow, dtype, eff)
        print(
            f"{label:>20}: on {test_path.name} (not fitted): {held_out['rows']} rows, median |err| "
            f"{held_out['median_abs_pct']} %, max {held_out['max_abs_pct']} %"
        )


def device_figures(lut_root: Path) -> None:
    arch = BUILTIN_ARCHS["llama2-7b"]
    full = Subnet.uniform(arch, arch.num_layers, 1.0)
    layers = [(l.heads, l.kv_heads, l.ffn) for l in full.layers]
    print(f"\n{'device / flow':<30}{'metric':<24}{'predicted ms':>13}{'bw bound':>10}{'compute bound':>15}")
    for slug in ("rtx-a5000", "orin-nx-16gb"):
        for table_dir in sorted((lut_root / slug).glob("*")):
            lut = load_one(table_dir)
            spec, predictor = get_spec(slug), Predictor(lut)
            prediction = predictor.predict(full, Workload(1, 128, 2))
            for metric, phase, tokens, value in (
                ("decode/token @ctx 128", "decode", 1, prediction.tpot_ms),
                ("prefill 128 tokens", "prefill", 128, prediction.ttft_ms),
            ):
                bounds = whole_model_bounds(
                    arch, layers, spec, "float16", phase, tokens, 128 if phase == "decode" else 0
                )
                print(
                    f"{slug + ' / ' + table_dir.name:<30}{metric:<24}{value:>13.2f}{bounds['bandwidth_bound_ms']:>10.2f}"
                    f"{bounds['compute_bound_ms']:>15.2f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=Path, default=CPU_TABLES / "tinyllama-1.1b-float32.csv")
    parser.add_argument("--test", type=Path, default=CPU_TABLES / "llama2-7b-float32.csv")
    parser.add_argument("--profile", type=Path, default=Path("lut/cpu-intel-xeon/device.json"))
    parser.add_argument("--lut", type=Path, default=Path("lut"))
    args = parser.parse_args()
    calibration_figures(args.fit, args.test, args.profile)
    device_figures(args.lut)


if __name__ == "__main__":
    main()
