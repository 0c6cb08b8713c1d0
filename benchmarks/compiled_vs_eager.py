"""Eager vs compiled PyTorch: per-layer cost by width, composition error, and what compiling costs.

For each flow (``pytorch``: eager ``generate()``; ``pytorch-compiled``: static KV cache +
``torch.compile``) one ``difference`` build measures, in interleaved rounds, the fit models (every
axis shape at three depths) and the truth subnets of ``composition_error.py`` through the flow's
serving loop. It then prints:
- the fitted per-layer cost of each uniform width (heads and FFN narrowed together, composed from
  the two axes), prefill at the prompt length and decode at each context, per flow, with the
  eager/compiled ratio and each width's cost relative to full width (does pruning pay?);
- the composition error of each flow's table against its own serving-loop truth;
- compile cost: seconds per engine (``compile_s``) and rows flagged ``recompiled``.

    python benchmarks/compiled_vs_eager.py [--model tinyllama-1.1b] [--device cuda] [--out out/compiled-vs-eager]
        [--flows pytorch,pytorch-compiled] [--widths 1,7/8,3/4,5/8] [--rounds 3] [--truth 10] [--json F]
        [--report-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from amoeba_profile.backends import get_backend
from composition_error import report, validation_subnets

from amoeba_profile.core.arch import resolve_arch
from amoeba_profile.core.subnet import Subnet, parse_ratio
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_one, load_table


def per_layer_by_width(
    lut, arch, widths: tuple[float, ...], prompt_len: int, contexts: tuple[int, ...]
) -> dict[str, dict[str, float]]:
    """{width: {"prefill": ms, "decode@c": ms, ...}}: one decoder layer's cost at that width (heads and
    FFN narrowed together), as the table composes it: the slope between the shallowest and the full
    uniform model, so the base cancels."""
    predictor = Predictor(lut)
    depth = arch.num_layers
    out = {}
    for width in widths:
        deep, shallow = Subnet.uniform(arch, depth, width), Subnet.uniform(arch, 1, width)

        def layer_ms(phase: str, tokens: int, context: int, deep: Subnet = deep, shallow: Subnet = shallow) -> float:
            return (
                predictor.phase_ms(deep, phase, 1, tokens, context)[0]
                - predictor.phase_ms(shallow, phase, 1, tokens, context)[0]
            ) / (depth - 1)

        costs = {"prefill": layer_ms("prefill", prompt_len, 0)}
        costs.update({f"decode@{c}": layer_ms("decode", 1, c) for c in contexts})
        out[f"{width:g}"] = costs
    return out


def compile_cost(lut) -> dict[str, float]:
    models = lut.frame[(lut.frame.component == "model") & (lut.frame.status == "ok")]
    compiled = models.drop_duplicates("subnet_id").compile_s.dropna()
    compiled = compiled[compiled > 0]
    return {
        "engines": int(len(compiled)),
        "total_s": float(compiled.sum()),
        "median_s": float(compiled.median()) if len(compiled) else 0.0,
        "max_s": float(compiled.max()) if len(compiled) else 0.0,
        "recompiled_rows": int(lut.frame["flags"].str.contains("recompiled").sum()),
    }


def print_widths(by_flow: dict[str, dict[str, dict[str, float]]]) -> None:
    flows = list(by_flow)
    columns = list(next(iter(by_flow.values()))["1"])
    print("\n== per-layer cost by width (ms; in brackets: relative to full width)")
    for column in columns:
        print(
            f"{column:<12}"
            + "".join(f"{flow:>30}" for flow in flows)
            + ("   eager/compiled" if len(flows) == 2 else "")
        )
        for width in by_flow[flows[0]]:
            cells = [by_flow[f][width][column] for f in flows]
            line = f"  width {width:<4}" + "".join(
                f"{c:>20.4f} [{c / by_flow[f]['1'][column]:.2f}]   " for f, c in zip(flows, cells)
            )
            if len(flows) == 2:
                line += f"{cells[0] / cells[1]:>10.2f}x"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--flows", default="pytorch,pytorch-compiled")
    parser.add_argument("--out", type=Path, default=Path("out/compiled-vs-eager"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--contexts", default="128,512")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--depths", help="fit depths (default: spread over the model)")
    parser.add_argument("--widths", default=",".join(["1", "7/8", "3/4", "5/8"]), help="width ratios (must include 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--truth", type=int, default=10, help="how many truth subnets to measure whole (0-10)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--report-only", action="store_true", help="report on the tables already under --out")
    args = parser.parse_args()

    arch = resolve_arch(args.model)
    subnets = validation_subnets(arch)[: args.truth]
    contexts = tuple(int(c) for c in args.contexts.split(","))
    depths = tuple(int(d) for d in args.depths.split(",")) if args.depths else ()
    widths_grid = tuple(parse_ratio(w) for w in args.widths.split(","))
    protocol = TimingProtocol(
        warmup_min=1, warmup_max=3, warmup_tolerance=0.1, rounds=args.rounds, samples_per_round=3, min_round_s=0.0
    )
    summary: dict = {"model": arch.name, "device": args.device, "protocol": protocol.to_dict(), "flows": {}}
    widths: dict[str, dict] = {}
    t0 = time.perf_counter()
    for flow in args.flows.split(","):
        if args.report_only:
            lut = load_one(args.out / flow)
        else:
            plan = BuildPlan(
                arch,
                widths_grid,
                prompt_lens=(args.prompt_len,),
                contexts=contexts,
                method="difference",
                depths=depths,
                decode_steps=args.decode_steps,
                whole=tuple(s for _, s in subnets),
            )
            print(f"building {flow} table for {arch.name} ({len(plan.entries())} entries)", flush=True)
            result = run_build(
                plan,
                get_backend(flow, device=args.device),
                args.out / flow,
                protocol,
                lambda done, total, label: None,
                method_reason="benchmark",
            )
            print(f"  {flow}: {result.wall_s:.0f} s, {len(result.recompiled)} rows recompiled while timed", flush=True)
            lut = load_table(result.path)
        widths[flow] = per_layer_by_width(lut, arch, widths_grid, args.prompt_len, contexts)
        entry = {"per_layer_ms": widths[flow], "compile": compile_cost(lut)}
        if subnets:
            entry["composition"] = report(lut, subnets, flow)
        summary["flows"][flow] = entry
        cost = entry["compile"]
        print(
            f"{flow:<18}compile: {cost['engines']} engines, {cost['total_s']:.0f} s total, median "
            f"{cost['median_s']:.1f} s, max {cost['max_s']:.1f} s; {cost['recompiled_rows']} rows recompiled"
        )
    print_widths(widths)
    if len(widths) == 2:
        eager, compiled = widths.values()
        speedups = [eager[w][c] / compiled[w][c] for w in eager for c in eager[w] if c != "prefill"]
        summary["decode_speedup_median"] = float(np.median(speedups))
        print(
            f"\ndecode per layer: compiled is {np.median(speedups):.2f}x faster than eager (median over widths "
            f"and contexts); total {time.perf_counter() - t0:.0f} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
