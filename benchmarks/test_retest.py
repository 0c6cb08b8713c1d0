"""Test-retest: does the default table give the same answer twice?

Builds the default table (``amoeba-profile build-lut --model M``, whatever method methods.json
validates here) twice, back to back, into two folders, timing each build. Then, over the table's
whole design space (prompt 128, 128 tokens), it reports how far the two tables' predictions are
apart (median and max |difference| in %, per metric), and at five budgets (0.5, 0.6, ..., 0.9 x the
full model's tpot by the first table) whether both picks are the same shape, or else declared tied
by the other table (``select``'s ties: a shape above the pick that may fit).

    python benchmarks/test_retest.py [--model tinyllama-1.1b] [--out out/bench-retest] [--json F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.picker import select, table_space
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_one

CLI = [sys.executable, "-m", "amoeba_profile.cli.main"]


def build(model: str, out: Path) -> tuple[Path, float]:
    started = time.perf_counter()
    done = subprocess.run([*CLI, "build-lut", "--model", model, "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"build failed: {done.stderr.strip()[-500:]}")
    print(done.stdout.strip().splitlines()[-1], flush=True)
    return next(out.rglob("*.csv")), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--out", type=Path, default=Path("out/bench-retest"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--report-only", action="store_true", help="compare the two tables already under --out")
    args = parser.parse_args()

    walls = []
    paths = []
    for run in ("a", "b"):
        if args.report_only:
            paths.append(next((args.out / run).rglob("*.csv")))
            continue
        path, wall = build(args.model, args.out / run)
        paths.append(path)
        walls.append(wall)
        print(f"build {run}: {wall:.0f} s wall", flush=True)
    tables = [load_one(p) for p in paths]
    predictors = [Predictor(t) for t in tables]
    workload = Workload(1, 128, 128)
    space = table_space(tables[0])
    summary: dict = {
        "model": args.model,
        "method": tables[0].meta.method,
        "build_wall_s": walls,
        "shapes": len(space),
    }
    for metric in ("ttft_ms", "tpot_ms"):
        diffs = []
        for subnet in space:
            a, b = (p.predict(subnet, workload).metric(metric) for p in predictors)
            diffs.append(100 * abs(a - b) / ((a + b) / 2))
        summary[metric] = {"median_abs_diff_pct": float(np.median(diffs)), "max_abs_diff_pct": float(np.max(diffs))}
        print(
            f"{metric}: the two tables' predictions differ by {np.median(diffs):.2f} % median, "
            f"{np.max(diffs):.2f} % max over {len(space)} shapes"
        )
    full = Subnet.uniform(tables[0].arch, tables[0].arch.num_layers, 1.0)
    full_tpot = predictors[0].predict(full, workload).tpot_ms
    picks = []
    for fraction in (0.5, 0.6, 0.7, 0.8, 0.9):
        budget = fraction * full_tpot
        sel = [select(p, space, workload, "tpot", budget) for p in predictors]
        same = sel[0].pick.subnet == sel[1].pick.subnet
        tied = sel[1].pick.subnet in [c.subnet for c in sel[0].tied] or sel[0].pick.subnet in [
            c.subnet for c in sel[1].tied
        ]
        verdict = "same" if same else ("tied" if tied else "DIFFERENT")
        picks.append(
            {
                "budget_ms": budget,
                "a": sel[0].pick.subnet.label,
                "b": sel[1].pick.subnet.label,
                "verdict": verdict,
                "a_ties": [c.subnet.label for c in sel[0].tied],
                "b_ties": [c.subnet.label for c in sel[1].tied],
            }
        )
        print(
            f"budget {fraction:.1f} x full tpot = {budget:6.1f} ms: {sel[0].pick.subnet.label:>14} vs "
            f"{sel[1].pick.subnet.label:<14} {verdict}"
        )
    summary["picks"] = picks
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
