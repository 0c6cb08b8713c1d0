"""Do deployment flows disagree on the best shape? The paper's central claim, measured on one machine.

For each flow (a registered backend, optionally ``name:dtype``, e.g. ``llama.cpp:q4_0``) one
``difference`` build measures, in interleaved rounds, the fit models and a few truth subnets
through that flow's own serving loop. Then, per flow:
- the fitted per-layer cost of each uniform width (prefill and decode), relative to full width;
- the composition error of the flow's table against its own whole-subnet measurements;
- the pick for the same relative budget: the best shape (proxy quality: retained parameters) of
  the uniform AmoebaLLM grid whose predicted tpot is within ``--budget-frac`` of that flow's own
  full-model tpot;
- every flow's pick as every other flow's table predicts it: what deploying a shape chosen on the
  wrong flow costs (over budget, or quality left on the table).

    python benchmarks/flows_compared.py [--model tinyllama-1.1b] [--layers 6]
        [--flows pytorch,pytorch-compiled,llama.cpp:f16,llama.cpp:q4_0,onnxruntime] [--widths 1,3/4,5/8]
        [--depths 2,4,6] [--budget-frac 0.7] [--truth 0,2,3,5,6] [--out out/flows] [--json F] [--report-only]

``--layers N`` keeps the model's widths and truncates it to N decoder layers (a decoder layer's cost
does not depend on how many others there are), so that five flows fit in an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from amoeba_profile.backends import get_backend
from compiled_vs_eager import compile_cost, per_layer_by_width
from composition_error import report, validation_subnets

from amoeba_profile.core.arch import ModelArch, resolve_arch
from amoeba_profile.core.subnet import Subnet, parse_ratio
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.selection.picker import Candidate, best_within, describe, evaluate, table_space, table_workload
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_one, load_table


def flow_backend(flow: str, device: str, repetitions: int):
    """``name`` or ``name:dtype`` -> a backend; llama-bench yields one entry's round of samples per run."""
    name, _, dtype = flow.partition(":")
    options = {"repetitions": repetitions} if name == "llama.cpp" else {}
    return get_backend(name, device=device, dtype=dtype or None, **options)


def pick_for_budget(
    lut, widths: tuple[float, ...], prompt_len: int, gen_len: int, budget_frac: float
) -> tuple[Candidate, Candidate, float, list[Candidate]]:
    """(full model, pick, budget ms, every candidate): the budget is ``budget_frac`` of this table's
    own full-model tpot."""
    arch = ModelArch.from_dict(lut.meta.arch)
    candidates, skipped = evaluate(
        Predictor(lut), table_space(lut, widths), table_workload(lut, prompt_len, gen_len), "tpot"
    )
    if skipped:
        raise SystemExit(f"{lut.path}: the table does not cover {skipped[0]}")
    full_id = Subnet.uniform(arch, arch.num_layers, 1.0).id
    full = next(c for c in candidates if c.subnet.id == full_id)
    budget = budget_frac * full.latency_ms
    return full, best_within(candidates, budget), budget, candidates


def cross_table(
    picks: dict[str, Candidate], spaces: dict[str, list[Candidate]], budgets: dict[str, float]
) -> dict[str, dict[str, dict]]:
    """{pick's flow: {judging flow: {ms, of_budget, fits, quality_lost}}}: a pick as another flow's
    table predicts it, against that flow's own budget and own pick."""
    out: dict[str, dict[str, dict]] = {}
    for source, pick in picks.items():
        out[source] = {}
        for judge, candidates in spaces.items():
            seen = next(c for c in candidates if c.subnet.id == pick.subnet.id)
            out[source][judge] = {
                "ms": seen.latency_ms,
                "of_budget": seen.latency_ms / budgets[judge],
                "fits": seen.latency_ms <= budgets[judge],
                "quality_lost": picks[judge].quality - seen.quality,
            }
    return out


def print_widths(by_flow: dict[str, dict[str, dict[str, float]]]) -> None:
    flows = list(by_flow)
    columns = list(next(iter(by_flow.values()))["1"])
    print("\n== fitted per-layer cost by width, ms [relative to full width]")
    print(f"{'':<14}" + "".join(f"{flow:>22}" for flow in flows))
    for column in columns:
        print(column)
        for width in by_flow[flows[0]]:
            print(
                f"  width {width:<7}"
                + "".join(
                    f"{by_flow[f][width][column]:>13.3f} [{by_flow[f][width][column] / by_flow[f]['1'][column]:.2f}]"
                    for f in flows
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--layers", type=int, help="truncate the model to this many decoder layers")
    parser.add_argument("--flows", default="pytorch,pytorch-compiled,llama.cpp:f16,llama.cpp:q4_0,onnxruntime")
    parser.add_argument("--out", type=Path, default=Path("out/flows"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128, help="the workload select judges tpot over")
    parser.add_argument("--contexts", default="128,256", help="must span prompt-len .. prompt-len + gen-len")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--depths", help="fit depths (default: spread over the model)")
    parser.add_argument("--widths", default="1,3/4,5/8", help="width ratios (must include 1)")
    parser.add_argument(
        "--budget-frac", type=float, default=0.7, help="budget as a fraction of each flow's full-model tpot"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--truth", default="0,2,3,5,6", help="indices of composition_error's truth subnets to measure whole"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--report-only", action="store_true", help="report on the tables already under --out")
    args = parser.parse_args()

    arch = resolve_arch(args.model)
    if args.layers:
        arch = dataclasses.replace(arch, name=f"{arch.name}-{args.layers}l", num_layers=args.layers)
    every_truth = validation_subnets(arch)
    subnets = [every_truth[int(i)] for i in args.truth.split(",") if i != ""]
    contexts = tuple(int(c) for c in args.contexts.split(","))
    depths = tuple(int(d) for d in args.depths.split(",")) if args.depths else ()
    widths = tuple(parse_ratio(w) for w in args.widths.split(","))
    protocol = TimingProtocol(
        warmup_min=1, warmup_max=3, warmup_tolerance=0.1, rounds=args.rounds, samples_per_round=3, min_round_s=0.0
    )
    summary: dict = {
        "model": arch.to_dict(),
        "device": args.device,
        "protocol": protocol.to_dict(),
        "budget_frac": args.budget_frac,
        "workload": {"prompt_len": args.prompt_len, "gen_len": args.gen_len},
        "flows": {},
    }
    by_width, picks, spaces, budgets = {}, {}, {}, {}
    for flow in args.flows.split(","):
        folder = args.out / flow.replace(":", "-")
        if args.report_only:
            lut = load_one(folder)
        else:
            plan = BuildPlan(
                arch,
                widths,
                prompt_lens=(args.prompt_len,),
                contexts=contexts,
                method="difference",
                depths=depths,
                decode_steps=args.decode_steps,
                whole=tuple(s for _, s in subnets),
            )
            backend = flow_backend(flow, args.device, protocol.warmup_max + protocol.samples_per_round)
            print(f"building {flow} table for {arch.name} ({len(plan.entries())} entries)", flush=True)
            t0 = time.perf_counter()
            result = run_build(
                plan, backend, folder, protocol, lambda done, total, label: None, method_reason="benchmark"
            )
            print(f"  {flow}: {time.perf_counter() - t0:.0f} s", flush=True)
            lut = load_table(result.path)
        by_width[flow] = per_layer_by_width(lut, arch, widths, args.prompt_len, contexts)
        full, picks[flow], budgets[flow], spaces[flow] = pick_for_budget(
            lut, widths, args.prompt_len, args.gen_len, args.budget_frac
        )
        entry = {
            "per_layer_ms": by_width[flow],
            "compile": compile_cost(lut),
            "full_tpot_ms": full.latency_ms,
            "budget_ms": budgets[flow],
            "threads": (lut.meta.backend_config or {}).get("threads"),
        }
        if picks[flow] is not None:
            entry["pick"] = {
                "shape": describe(picks[flow].subnet),
                "subnet_id": picks[flow].subnet.id,
                "tpot_ms": picks[flow].latency_ms,
                "quality": picks[flow].quality,
            }
        if subnets:
            entry["composition"] = report(lut, subnets, flow)
        summary["flows"][flow] = entry
    print_widths(by_width)
    print(
        f"\n== pick at {args.budget_frac:g} x each flow's own full-model tpot (prompt {args.prompt_len}, "
        f"gen {args.gen_len}; quality = retained-parameter proxy)"
    )
    for flow, pick in picks.items():
        shape = describe(pick.subnet) if pick else "nothing fits"
        print(
            f"{flow:<18} full {summary['flows'][flow]['full_tpot_ms']:8.2f} ms  budget {budgets[flow]:8.2f} ms  "
            f"-> {shape}" + (f"  ({pick.latency_ms:.2f} ms, quality {pick.quality:.3f})" if pick else "")
        )
    chosen = {f: p for f, p in picks.items() if p is not None}
    if len(chosen) > 1:
        cross = cross_table(chosen, {f: spaces[f] for f in chosen}, {f: budgets[f] for f in chosen})
        summary["cross"] = cross
        print(
            "\n== each flow's pick (rows) as each flow's table predicts it (columns): x of that flow's budget"
            " [quality lost vs its own pick]"
        )
        print(f"{'':<18}" + "".join(f"{f:>22}" for f in chosen))
        for source, judged in cross.items():
            print(
                f"{source:<18}"
                + "".join(f"{v['of_budget']:>13.2f}x [{v['quality_lost']:+.3f}]" for v in judged.values())
            )
        distinct = {p.subnet.id for p in chosen.values()}
        summary["distinct_picks"] = len(distinct)
        print(f"\n{len(distinct)} distinct pick(s) among {len(chosen)} flows")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
