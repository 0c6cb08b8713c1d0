"""How fast is selection, and what does per-layer optimization gain over uniform shapes?

Uses a llama2-7b table (default: the shipped RTX A5000 roofline table; any table works):
- uniform selection over the full AmoebaLLM grid (13 depths x 4 widths = 52 shapes), cold (new
  predictor) and warm;
- exact per-layer optimization for 32 layers x 16 options (4 attention widths x 4 FFN widths),
  one depth and all 13 depths;
- the quality gain of the per-layer optimum over the best uniform shape at several budgets.

    python benchmarks/selection_speed.py [--lut lut/rtx-a5000/tensorrt-llm/llama2-7b-float16.csv]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.subnet import DesignSpace
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.optimize import optimize_per_layer, table_options
from amoeba_profile.selection.picker import select
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_table


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lut", type=Path, default=Path("lut/rtx-a5000/tensorrt-llm/llama2-7b-float16.csv"))
    parser.add_argument("--metric", default="tpot_ms")
    args = parser.parse_args()
    lut = load_table(args.lut)
    arch = ModelArch.from_dict(lut.meta.arch)
    space = list(DesignSpace.amoeba(arch).subnets())
    workload = Workload(1, 128, 128)
    full = Predictor(lut).predict(space[-4], workload).metric(args.metric)
    budget = 0.8 * full

    cold, _ = timed(lambda: select(Predictor(lut), space, workload, args.metric, budget))
    predictor = Predictor(lut)
    select(predictor, space, workload, args.metric, budget)
    warm, chosen = timed(lambda: select(predictor, space, workload, args.metric, budget))
    print(f"table: {args.lut} ({'roofline' if lut.is_roofline else 'measured'})")
    print(
        f"uniform selection over {len(space)} shapes: {cold:.1f} ms cold (new predictor), {warm:.2f} ms warm "
        f"-> {chosen.pick.subnet.label}"
    )

    options = table_options(predictor)
    one, result = timed(
        lambda: optimize_per_layer(predictor, arch, [arch.num_layers], workload, args.metric, budget, options=options)
    )
    every, _ = timed(
        lambda: optimize_per_layer(
            predictor, arch, DesignSpace.amoeba(arch).depths, workload, args.metric, budget, options=options
        ),
        repeat=3,
    )
    print(
        f"per-layer optimization, {arch.num_layers} layers x {len(options)} options: {one:.0f} ms (one depth), "
        f"{every:.0f} ms (all {len(DesignSpace.amoeba(arch).depths)} depths)"
    )

    print(f"\n{'budget ms':>10}{'best uniform':>24}{'quality':>9}{'per-layer':>12}{'quality':>9}{'gain':>8}")
    for fraction in (0.6, 0.7, 0.8, 0.9):
        b = fraction * full
        uniform = select(predictor, space, workload, args.metric, b).pick
        per = optimize_per_layer(
            predictor, arch, DesignSpace.amoeba(arch).depths, workload, args.metric, b, options=options
        )
        print(
            f"{b:>10.2f}{uniform.subnet.label:>24}{uniform.quality:>9.4f}{per.subnet.num_layers:>9} L{per.quality:>12.4f}"
            f"{per.quality - uniform.quality:>+8.4f}"
        )


if __name__ == "__main__":
    main()
