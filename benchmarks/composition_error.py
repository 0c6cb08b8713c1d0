"""How well does each method's table predict what users run, and what does it cost to build?

For each method (``components``, ``difference``) one interleaved build measures, in the same
rounds, the method's rows and >= 9 whole subnets (uniform and per-layer, several depths, one with
off-grid FFN widths) through the flow's serving loop (``generate()`` for eager PyTorch, our greedy
loop over the session for onnxruntime): those are the truth rows. It then prints predicted vs
measured for every subnet, prefill (ttft) and decode (tpot at each context), the median and max
|error|, the difference fit's residuals, and the device-seconds of each table.

    python benchmarks/composition_error.py [--model tinyllama-1.1b] [--method both] [--out out/bench]
        [--backend pytorch|pytorch-compiled|llama.cpp|onnxruntime] [--dtype f16] [--report-only]

``--method both`` runs the methods the backend supports (llama.cpp, pytorch-compiled and onnxruntime:
difference only).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from amoeba_profile.backends import get_backend

from amoeba_profile.core.arch import resolve_arch
from amoeba_profile.core.errors import AmoebaError
from amoeba_profile.core.subnet import LayerShape, Subnet, kept_layers, width_shape
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_one, load_table


def validation_subnets(arch) -> list[tuple[str, Subnet]]:
    """Five uniform shapes and five per-layer shapes (one with off-grid FFN widths)."""
    L = arch.num_layers
    full, w78, w34, w58 = (width_shape(arch, w) for w in (1.0, 7 / 8, 3 / 4, 5 / 8))
    rng = random.Random(0)

    def per_layer(depth: int, shapes, rule: str = "keep-ends") -> Subnet:
        return Subnet(arch, tuple(LayerShape(i, *s) for i, s in zip(kept_layers(arch, depth, rule), shapes)))

    d = lambda frac: max(1, round(L * frac))
    out = [
        ("uniform", Subnet.uniform(arch, L, 1.0)),
        ("uniform", Subnet.uniform(arch, d(18 / 22), 7 / 8)),
        ("uniform", Subnet.uniform(arch, d(14 / 22), 5 / 8)),
        ("uniform", Subnet.uniform(arch, d(20 / 22), 3 / 4)),
        ("uniform", Subnet.uniform(arch, d(16 / 22), 1.0, drop_rule="uniform")),
        ("per-layer", per_layer(d(18 / 22), [full] * (d(18 / 22) // 2) + [w58] * (d(18 / 22) - d(18 / 22) // 2))),
        ("per-layer", per_layer(d(16 / 22), [full if i % 2 else w58 for i in range(d(16 / 22))])),
        ("per-layer", per_layer(d(20 / 22), [rng.choice([full, w78, w34, w58]) for _ in range(d(20 / 22))])),
        (
            "per-layer off-grid ffn",
            per_layer(
                d(15 / 22),
                [
                    (s[0], s[1], rng.randrange(w58[2], full[2]))
                    for s in (rng.choice([full, w34]) for _ in range(d(15 / 22)))
                ],
            ),
        ),
        ("per-layer", per_layer(d(21 / 22), [w34 if i < 7 else w78 for i in range(d(21 / 22))], "uniform")),
    ]
    return out


def report(lut, subnets, label: str) -> dict:
    predictor = Predictor(lut)
    frame = lut.ok
    print(f"\n== {label}: {lut.path}")
    print(f"{'subnet':<26}{'kind':<24}{'phase':<9}{'ctx':>5}{'pred ms':>10}{'meas ms':>10}{'err %':>8}  source")
    errors: dict[str, list[float]] = {"prefill": [], "decode": []}
    # Subnets with a layer narrowed in heads and FFN at once are off a difference table's axes: their
    # error, beside that of the others, is the interaction the additive composition misses.
    by_axes: dict[str, list[float]] = {"off the axes": [], "on the axes": []}
    refused: list[str] = []
    arch = subnets[0][1].arch
    for kind, subnet in subnets:
        off_axes = any(l.heads < arch.num_heads and l.ffn < arch.ffn_size for l in subnet.layers)
        rows = frame[(frame.component == "model") & (frame.subnet_id == subnet.id)].sort_values(
            ["phase", "context"], ascending=[False, True]
        )
        for row in rows.itertuples():
            ctx = row.context if row.phase == "decode" else row.tokens
            try:
                predicted, source = predictor.phase_ms(subnet, row.phase, row.batch, row.tokens, row.context)
            except AmoebaError as exc:
                print(f"{subnet.label:<26}{kind:<24}{row.phase:<9}{ctx:>5}  refused: {exc}")
                refused.append(str(exc))
                continue
            err = 100 * (predicted - row.median_ms) / row.median_ms
            errors[row.phase].append(err)
            by_axes["off the axes" if off_axes else "on the axes"].append(err)
            print(
                f"{subnet.label:<26}{kind:<24}{row.phase:<9}{ctx:>5}{predicted:>10.2f}{row.median_ms:>10.2f}"
                f"{err:>+8.2f}  {source}"
            )
    summary: dict = {"refused": refused}
    for phase, errs in errors.items():
        if not errs:
            continue
        a = np.abs(errs)
        summary[phase] = {
            "n": len(errs),
            "median_abs_pct": float(np.median(a)),
            "max_abs_pct": float(a.max()),
            "mean_signed_pct": float(np.mean(errs)),
        }
        print(
            f"{label:<12}{phase:<8} n={len(errs):>3}  median |err| = {np.median(a):.2f} %   max |err| = "
            f"{a.max():.2f} %   mean signed = {np.mean(errs):+.2f} %"
        )
    for where, errs in by_axes.items():
        if errs:
            a = np.abs(errs)
            summary[where] = {
                "n": len(errs),
                "median_abs_pct": float(np.median(a)),
                "max_abs_pct": float(a.max()),
                "mean_signed_pct": float(np.mean(errs)),
            }
            print(
                f"{label:<12}{where:<13} n={len(errs):>3}  median |err| = {np.median(a):.2f} %   max |err| = "
                f"{a.max():.2f} %   mean signed = {np.mean(errs):+.2f} %"
            )
    truth_ids = {s.id for _, s in subnets}
    rows = lut.frame
    summary["table_device_s"] = float(rows[~rows.subnet_id.isin(truth_ids)].wall_s.sum())
    summary["truth_device_s"] = float(rows[rows.subnet_id.isin(truth_ids)].wall_s.sum())
    layers = lut.ok[lut.ok.component == "layer"]
    if not layers.empty:  # the width-vs-depth question: what does one layer cost at each fitted shape?
        print(f"{label:<12}fitted per-layer cost (ms; heads, kv_heads, ffn):")
        for (phase, tokens, context), group in layers.groupby(["phase", "tokens", "context"]):
            costs = "  ".join(
                f"({r.heads},{r.kv_heads},{r.ffn}) {r.median_ms:.3f}±{r.std_ms:.3f}" for r in group.itertuples()
            )
            print(
                f"{'':<12}{phase} {'tokens ' + str(tokens) if phase == 'prefill' else 'ctx ' + str(context)}: {costs}"
            )
        summary["layer_ms"] = layers[
            ["phase", "tokens", "context", "heads", "kv_heads", "ffn", "median_ms", "std_ms"]
        ].to_dict("records")
    if lut.meta.fit:
        worst = max(f["max_abs_residual_pct"] for f in lut.meta.fit)
        rms = max(f["rms_residual_pct"] for f in lut.meta.fit)
        summary["fit_max_abs_residual_pct"], summary["fit_worst_rms_pct"] = worst, rms
        print(f"{label:<12}fit residuals: worst rms {rms:.2f} %, max |residual| {worst:.2f} %")
    print(
        f"{label:<12}build cost: table rows {summary['table_device_s']:.0f} device-s, truth models "
        f"{summary['truth_device_s']:.0f} device-s"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--backend", default="pytorch", help="a registered backend (amoeba-profile backends)")
    parser.add_argument("--method", default="both", choices=["components", "difference", "both"])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--contexts", default="128,512")
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="the backend's dtype (llama.cpp: f16, q8_0, q4_0)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--report-only", action="store_true", help="report on the tables already under --out")
    args = parser.parse_args()

    arch = resolve_arch(args.model)
    subnets = validation_subnets(arch)
    contexts = tuple(int(c) for c in args.contexts.split(","))
    # Few warm-up runs: whole models take seconds per request on a CPU; three rounds interleave them.
    protocol = TimingProtocol(
        warmup_min=1, warmup_max=3, warmup_tolerance=0.1, rounds=3, samples_per_round=3, min_round_s=0.0
    )
    # llama-bench yields its samples in one process run: as many as one entry's round can use, no more.
    options = {"repetitions": protocol.warmup_max + protocol.samples_per_round} if args.backend == "llama.cpp" else {}
    backend = get_backend(args.backend, device=args.device, dtype=args.dtype, **options)
    supported = backend.capabilities().methods
    methods = [m for m in ("components", "difference") if m in supported] if args.method == "both" else [args.method]
    summary = {
        "model": arch.name,
        "device": args.device,
        "backend": backend.name,
        "dtype": backend.dtype,
        "protocol": protocol.to_dict(),
    }
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int, label: str) -> None:
        if time.perf_counter() - last[0] > 60 or done == total:
            last[0] = time.perf_counter()
            print(f"  [{time.perf_counter() - t0:6.0f} s] {done}/{total} {label}", flush=True)

    for method in methods:
        if args.report_only:
            summary[method] = report(load_one(args.out / method), subnets, method)
            continue
        plan = BuildPlan(
            arch,
            prompt_lens=(args.prompt_len,),
            contexts=contexts,
            method=method,
            decode_steps=args.decode_steps,
            whole=tuple(s for _, s in subnets),
        )
        print(f"building {method} table for {arch.name} ({len(plan.entries())} entries)", flush=True)
        result = run_build(plan, backend, args.out / method, protocol, progress, method_reason="benchmark")
        summary[method] = report(load_table(result.path), subnets, method)
        summary[method]["wall_s"] = result.wall_s
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
