"""Which measurement design answers accurately at a cost users accept? One interleaved run.

One build measures, in the same interleaved rounds, everything every design needs: the component
rows (attn, mlp, base), the calibrated design's three whole models, and >= 10 whole truth subnets
(uniform and per-layer, ``composition_error.validation_subnets``) through the flow's serving loop.
Each design is then a predictor over a subset of those rows:

- ``components``: attn + mlp + base only;
- ``calibrated``: the components corrected by the three whole models (the default on CPU);

and the truth subnets' ttft and tpot (prompt 128, 128 tokens: decode integrated over contexts
128..254) are predicted and compared with their measured values. A design's cost is the wall time
of its own rows and its number of distinct engines (built modules or whole models). Prints one line
per subnet and a summary per design; ``--json`` stores the figures.

    python benchmarks/method_accuracy.py [--model tinyllama-1.1b] [--out out/bench-accuracy] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from amoeba_profile.backends import get_backend
from composition_error import validation_subnets

from amoeba_profile.core.arch import resolve_arch
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.core.workload import Workload
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.measure.validate import measured_metric
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import Lut, load_table


def design_table(lut: Lut, design: str, truth_ids: set[str]) -> Lut:
    """The rows one design would have built: never the truth models."""
    frame = lut.frame[~lut.frame.subnet_id.isin(truth_ids)]
    meta = dict(lut.meta)
    if design == "components":
        frame = frame[~((frame.component == "layer") | (frame.component == "model"))]
        meta.pop("fit", None)
    return Lut(frame.reset_index(drop=True), meta, lut.path)


def cost(lut: Lut, design: str, truth_ids: set[str]) -> tuple[float, int]:
    """(device-seconds of the design's measured rows, its distinct engines)."""
    rows = design_table(lut, design, truth_ids).frame
    rows = rows[rows.component != "layer"]
    engines = {(r.component, r.heads, r.kv_heads, r.ffn, r.subnet_id) for r in rows.itertuples()}
    return float(rows.wall_s.sum()), len(engines)


def evaluate(lut: Lut, design: str, subnets, workload: Workload) -> dict:
    truth_ids = {s.id for _, s in subnets}
    predictor = Predictor(design_table(lut, design, truth_ids))
    errors: dict[str, list[float]] = {"ttft_ms": [], "tpot_ms": []}
    inside: list[bool] = []
    print(f"\n== {design}")
    print(f"{'subnet':<22}{'kind':<24}{'metric':<8}{'pred':>9}{'± se':>7}{'meas':>9}{'err %':>8}")
    for kind, subnet in subnets:
        prediction = predictor.predict(subnet, workload)
        for metric in errors:
            truth = measured_metric(lut, subnet, workload, metric)
            predicted, se = prediction.metric(metric), prediction.se_of(metric)
            err = 100 * (predicted - truth) / truth
            errors[metric].append(err)
            low, high = prediction.interval(metric, 0.9)
            inside.append(bool(low <= truth <= high))
            print(f"{subnet.label:<22}{kind:<24}{metric:<8}{predicted:>9.1f}{se:>7.1f}{truth:>9.1f}{err:>+8.2f}")
    wall_s, engines = cost(lut, design, truth_ids)
    summary: dict = {"device_s": wall_s, "engines": engines, "interval_90_coverage": float(np.mean(inside))}
    for metric, errs in errors.items():
        a = np.abs(errs)
        summary[metric] = {
            "median_abs_pct": float(np.median(a)),
            "max_abs_pct": float(a.max()),
            "mean_signed_pct": float(np.mean(errs)),
            "n": len(errs),
        }
        print(
            f"{design:<12}{metric:<8} median |err| {np.median(a):5.2f} %   max |err| {a.max():5.2f} %   "
            f"mean signed {np.mean(errs):+5.2f} %"
        )
    print(
        f"{design:<12}cost: {wall_s:.0f} device-s of its own rows, {engines} engines; 90 % intervals hold "
        f"the truth {100 * summary['interval_90_coverage']:.0f} % of the time"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--out", type=Path, default=Path("out/bench-accuracy"))
    parser.add_argument("--contexts", default="128,256", help="decode contexts (128..254 are what tpot integrates)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--report-only", action="store_true", help="report on the table already under --out")
    args = parser.parse_args()

    arch = resolve_arch(args.model)
    subnets = validation_subnets(arch)
    workload = Workload(1, 128, 128)
    contexts = tuple(int(c) for c in args.contexts.split(","))
    started = time.perf_counter()
    if args.report_only:
        lut = load_table(next(args.out.rglob("*.csv")))
        wall = None
    else:
        backend = get_backend("pytorch")
        plan = BuildPlan(
            arch, prompt_lens=(128,), contexts=contexts, method="calibrated", whole=tuple(s for _, s in subnets)
        )
        last = [0.0]

        def progress(done: int, total: int, label: str) -> None:
            if time.perf_counter() - last[0] > 60 or done == total:
                last[0] = time.perf_counter()
                print(f"  [{time.perf_counter() - started:6.0f} s] {done}/{total} {label}", flush=True)

        print(f"one interleaved build: {len(plan.entries())} entries, {len(subnets)} truth subnets", flush=True)
        result = run_build(plan, backend, args.out, TimingProtocol(), progress, method_reason="benchmark")
        lut, wall = load_table(result.path), result.wall_s
    summary = {
        "model": arch.name,
        "table": str(lut.path),
        "wall_s": wall,
        "workload": vars(workload),
        "threads": (lut.meta.backend_config or {}).get("threads"),
        "designs": {d: evaluate(lut, d, subnets, workload) for d in ("components", "calibrated")},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
