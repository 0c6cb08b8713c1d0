"""How well does the per-layer table predict whole subnets, and what does it cost to build?

Builds, in one session and one interleaved build (components and whole models measured in the
same rounds), a component table for a TinyLlama-shaped model plus >= 9 whole subnets (uniform
and per-layer, several depths), then prints predicted vs measured for every subnet, prefill and
decode, the median and max |error|, and the device-seconds of the table vs measuring every
shape of the design space whole.

    python benchmarks/composition_error.py [--model tinyllama-1.1b] [--out out/bench] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from amoeba_profile.arch import resolve_arch
from amoeba_profile.backends import get_backend
from amoeba_profile.build import BuildPlan, run_build
from amoeba_profile.lut import load_table
from amoeba_profile.measure import TimingProtocol
from amoeba_profile.predict import Predictor
from amoeba_profile.quality import retained_params
from amoeba_profile.subnet import DesignSpace, LayerShape, Subnet, kept_layers, width_shape


def validation_subnets(arch) -> list[tuple[str, Subnet]]:
    """Five uniform shapes and five per-layer shapes (one with off-grid FFN widths)."""
    L = arch.num_layers
    full, w78, w34, w58 = (width_shape(arch, w) for w in (1.0, 7 / 8, 3 / 4, 5 / 8))
    rng = random.Random(0)

    def per_layer(depth: int, shapes, rule: str = "keep-ends") -> Subnet:
        return Subnet(arch, tuple(LayerShape(i, *s) for i, s in zip(kept_layers(arch, depth, rule), shapes)))

    d = lambda frac: max(1, round(L * frac))  # noqa: E731
    out = [
        ("uniform", Subnet.uniform(arch, L, 1.0)),
        ("uniform", Subnet.uniform(arch, d(18 / 22), 7 / 8)),
        ("uniform", Subnet.uniform(arch, d(14 / 22), 5 / 8)),
        ("uniform", Subnet.uniform(arch, d(20 / 22), 3 / 4)),
        ("uniform", Subnet.uniform(arch, d(16 / 22), 1.0, drop_rule="uniform")),
        ("per-layer", per_layer(d(18 / 22), [full] * (d(18 / 22) // 2) + [w58] * (d(18 / 22) - d(18 / 22) // 2))),
        ("per-layer", per_layer(d(16 / 22), [full if i % 2 else w58 for i in range(d(16 / 22))])),
        ("per-layer", per_layer(d(20 / 22), [rng.choice([full, w78, w34, w58]) for _ in range(d(20 / 22))])),
        ("per-layer off-grid ffn", per_layer(d(15 / 22), [
            (s[0], s[1], rng.randrange(w58[2], full[2])) for s in (rng.choice([full, w34]) for _ in range(d(15 / 22)))
        ])),
        ("per-layer", per_layer(d(21 / 22), [w34 if i < 7 else w78 for i in range(d(21 / 22))], "uniform")),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--contexts", default="128,256,512")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and samples")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    arch = resolve_arch(args.model)
    subnets = validation_subnets(arch)
    contexts = tuple(int(c) for c in args.contexts.split(","))
    plan = BuildPlan(arch, prompt_lens=(args.prompt_len,), contexts=contexts, whole=tuple(s for _, s in subnets))
    backend = get_backend("pytorch", device=args.device)
    protocol = TimingProtocol.quick() if args.quick else TimingProtocol()
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int, label: str) -> None:
        if time.perf_counter() - last[0] > 30 or done == total:
            last[0] = time.perf_counter()
            print(f"  [{time.perf_counter() - t0:6.0f} s] {done}/{total} {label}", flush=True)

    result = run_build(plan, backend, args.out, protocol, progress)
    lut = load_table(result.path)
    predictor = Predictor(lut)
    frame = lut.ok
    print(f"\ntable: {result.path}  ({result.wall_s:.0f} s)\n")
    print(f"{'subnet':<26}{'kind':<24}{'phase':<9}{'ctx':>5}{'pred ms':>10}{'meas ms':>10}{'err %':>8}  source")
    errors: dict[str, list[float]] = {"prefill": [], "decode": []}
    for kind, subnet in subnets:
        rows = frame[(frame.component == "model") & (frame.subnet_id == subnet.id)].sort_values(["phase", "context"], ascending=[False, True])
        for row in rows.itertuples():
            predicted, source = predictor.phase_ms(subnet, row.phase, row.batch, row.tokens, row.context)
            err = 100 * (predicted - row.median_ms) / row.median_ms
            errors[row.phase].append(err)
            ctx = row.context if row.phase == "decode" else row.tokens
            print(f"{subnet.label:<26}{kind:<24}{row.phase:<9}{ctx:>5}{predicted:>10.2f}{row.median_ms:>10.2f}{err:>+8.2f}  {source}")

    summary = {}
    print()
    for phase, errs in errors.items():
        a = np.abs(errs)
        summary[phase] = {"n": len(errs), "median_abs_pct": float(np.median(a)), "max_abs_pct": float(a.max()),
                          "mean_signed_pct": float(np.mean(errs))}
        print(f"{phase:<8} n={len(errs):>3}  median |err| = {np.median(a):.2f} %   max |err| = {a.max():.2f} %   "
              f"mean signed = {np.mean(errs):+.2f} %")

    # Device-seconds: every row stores the wall time spent on it (its share of the module build,
    # warm-up and samples, over all rounds).
    comp = lut.frame[lut.frame.component != "model"]
    lut_s = float(comp.wall_s.sum())
    whole = frame[frame.component == "model"].groupby("subnet_id").wall_s.sum()
    by_id = {s.id: s for _, s in subnets}
    x = np.array([retained_params(by_id[i]) for i in whole.index])
    slope, intercept = np.polyfit(x, whole.to_numpy(), 1)
    space = list(DesignSpace.amoeba(arch).subnets())
    whole_all_s = float(sum(intercept + slope * retained_params(s) for s in space))
    print(f"\nbuild cost: component table {lut_s:.0f} device-s; {len(whole)} whole subnets measured {whole.sum():.0f} "
          f"device-s ({whole.mean():.0f} s each);")
    print(f"measuring all {len(space)} shapes of the design space whole would take ~{whole_all_s:.0f} device-s "
          f"(per-shape cost fitted linearly on retained parameters over the {len(whole)} measured subnets): "
          f"ratio {whole_all_s / lut_s:.1f}x")
    summary.update(table=str(result.path), lut_device_s=lut_s, whole_measured_device_s=float(whole.sum()),
                   whole_design_space_device_s=whole_all_s, ratio=whole_all_s / lut_s, design_space=len(space))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
