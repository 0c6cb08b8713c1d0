"""Roofline tables for devices not at hand: component latency from FLOPs, bytes and peaks.

Each component is a list of operations with FLOPs and bytes moved (GEMMs, attention over the KV
context, norms, elementwise ops, embeddings, lm_head). An operation takes
max(FLOPs / (peak_flops x eff_compute), bytes / (peak_bw x eff_bw)); a component adds
``kernels x launch_us``. Efficiencies default to the flow's documented values (data/flows.json)
and are fitted from measured tables where they exist. Every row is tagged ``source=roofline``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from .arch import ModelArch
from .device.specs import DeviceSpec
from .entry import Entry
from .errors import LutError, UsageError
from .lut import Lut, measured_row
from .measure import Measurement

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


@dataclass(frozen=True)
class Flow:
    name: str
    kernels: dict[str, int]
    launch_us: float
    eff_bw: float
    eff_compute: float
    kv_cache_copy: bool
    rationale: str = ""


@lru_cache(maxsize=1)
def load_flows() -> dict[str, Flow]:
    data = json.loads(resources.files("amoeba_profile").joinpath("data/flows.json").read_text())
    return {name: Flow(name=name, **entry) for name, entry in data["flows"].items()}


def get_flow(name: str) -> Flow:
    flows = load_flows()
    if name not in flows:
        raise UsageError(f"no roofline profile for flow {name!r}: use one of {sorted(flows)}")
    return flows[name]


@dataclass(frozen=True)
class Op:
    name: str
    flops: float
    bytes: float


def component_ops(arch: ModelArch, entry: Entry, dtype: str, kv_cache_copy: bool) -> list[Op]:
    """FLOPs and bytes of each operation of one component execution (see module docstring)."""
    s = BYTES_PER_ELEMENT[dtype]
    b, t, c, H, d = entry.batch, entry.tokens, entry.context, arch.hidden_size, arch.head_dim
    act = b * t * H * s  # one activation tensor

    def norm(name: str) -> Op:
        return Op(name, 4 * b * t * H, 2 * act + H * s)

    if entry.component == "mlp":
        f = entry.ffn
        return [
            Op("gate_up", 2 * b * t * H * 2 * f, (2 * H * f + b * t * H + 2 * b * t * f) * s),
            Op("silu_mul", 4 * b * t * f, 3 * b * t * f * s),
            Op("down", 2 * b * t * f * H, (f * H + b * t * f + b * t * H) * s),
        ]
    if entry.component == "attn":
        h, k = entry.heads, entry.kv_heads
        kv_len = c + t
        causal_len = c + (t + 1) / 2  # mean keys per query under the causal mask
        kv_append = 2 * b * k * t * d * s
        if kv_cache_copy:  # torch.cat re-writes the whole cache every step
            kv_append += 2 * 2 * b * k * kv_len * d * s
        return [
            norm("input_norm"),
            Op("qkv", 2 * b * t * H * (h + 2 * k) * d, (H * (h + 2 * k) * d + b * t * H + b * t * (h + 2 * k) * d) * s),
            Op("rope", 6 * b * t * (h + k) * d, 2 * b * t * (h + k) * d * s),
            Op("kv_append", 0, kv_append),
            Op("attention", 4 * b * h * t * causal_len * d, (2 * b * k * kv_len * d + 2 * b * t * h * d) * s),
            Op("o_proj", 2 * b * t * h * d * H, (h * d * H + b * t * h * d + b * t * H) * s),
            Op("residual", b * t * H, 3 * act),
            norm("post_norm"),
            Op("residual2", b * t * H, 3 * act),
        ]
    if entry.component == "base":
        V = arch.vocab_size
        return [
            Op("embedding", 0, 2 * act),
            norm("final_norm"),
            Op("lm_head", 2 * b * H * V, (H * V + b * H + b * V) * s),
        ]
    raise UsageError(f"roofline has no model for component {entry.component!r}")


@dataclass(frozen=True)
class Efficiency:
    eff_bw: float
    eff_compute: float
    launch_us: float


def _peaks(spec: DeviceSpec, dtype: str) -> tuple[float, float]:
    """(FLOP/s, byte/s)."""
    return spec.peak_tflops(dtype) * 1e12, spec.mem_bw_gbps * 1e9


def component_ms(ops: list[Op], kernels: int, spec: DeviceSpec, dtype: str, eff: Efficiency) -> float:
    flops_peak, bw_peak = _peaks(spec, dtype)
    seconds = sum(max(op.flops / (flops_peak * eff.eff_compute), op.bytes / (bw_peak * eff.eff_bw)) for op in ops)
    return seconds * 1e3 + kernels * eff.launch_us * 1e-3


def roofline_rows(arch: ModelArch, entries: list[Entry], spec: DeviceSpec, flow: Flow, dtype: str,
                  eff: Efficiency) -> list[dict[str, Any]]:
    rows = []
    for entry in entries:
        if entry.component == "model":
            continue
        ms = component_ms(component_ops(arch, entry, dtype, flow.kv_cache_copy), flow.kernels[entry.component],
                          spec, dtype, eff)
        row = measured_row(entry, Measurement.from_samples([ms]), "ok", method="computed", repeat=1, wall_s=0.0,
                           note=f"roofline {spec.slug} {flow.name}")
        row.update(source="roofline", n=0, samples_ms="[]")
        rows.append(row)
    return rows


def _features(lut: Lut, spec: DeviceSpec, flow: Flow, dtype: str):
    """Per measured component row: compute-time and memory-time at efficiency 1, kernels, measured ms."""
    arch = ModelArch.from_dict(lut.meta["arch"])
    flops_peak, bw_peak = _peaks(spec, dtype)
    rows = lut.ok[lut.ok.component.isin(["attn", "mlp", "base"])]
    if rows.empty:
        raise LutError(f"{lut.path}: no measured component rows to calibrate from")
    compute, memory, kernels, measured = [], [], [], []
    for row in rows.itertuples():
        entry = Entry(row.component, row.phase, row.batch, row.tokens, row.context, row.heads, row.kv_heads, row.ffn)
        ops = component_ops(arch, entry, dtype, flow.kv_cache_copy)
        compute.append([op.flops / flops_peak for op in ops])
        memory.append([op.bytes / bw_peak for op in ops])
        kernels.append(flow.kernels[row.component])
        measured.append(row.median_ms * 1e-3)
    width = max(len(x) for x in compute)
    pad = lambda rows_: np.array([r + [0.0] * (width - len(r)) for r in rows_])  # noqa: E731
    return pad(compute), pad(memory), np.array(kernels, float), np.array(measured)


def calibrate(lut: Lut, spec: DeviceSpec, flow: Flow, dtype: str) -> tuple[Efficiency, dict[str, Any]]:
    """Fit (eff_bw, eff_compute, launch_us) to a measured table by minimizing squared relative error.

    Efficiencies are searched on a grid (the max() makes the model piecewise); for each pair the
    launch overhead has a closed-form non-negative least-squares solution.
    """
    compute, memory, kernels, measured = _features(lut, spec, flow, dtype)
    best = None
    for eb in np.linspace(0.05, 1.2, 116):
        for ec in np.geomspace(0.01, 1.2, 120):
            roof = np.maximum(compute / ec, memory / eb).sum(axis=1)
            # relative residual r = (roof + k*L - m)/m; minimize sum r^2 over L >= 0
            a, y = kernels / measured, (measured - roof) / measured
            launch = max(0.0, float(a @ y / (a @ a)))
            err = float(np.sum(((roof + kernels * launch - measured) / measured) ** 2))
            if best is None or err < best[0]:
                best = (err, eb, ec, launch)
    _, eb, ec, launch = best
    eff = Efficiency(round(float(eb), 4), round(float(ec), 4), round(launch * 1e6, 3))
    return eff, evaluate(lut, spec, flow, dtype, eff)


def evaluate(lut: Lut, spec: DeviceSpec, flow: Flow, dtype: str, eff: Efficiency) -> dict[str, Any]:
    """Median and max |relative error| of the roofline against a measured table's component rows."""
    compute, memory, kernels, measured = _features(lut, spec, flow, dtype)
    predicted = np.maximum(compute / eff.eff_compute, memory / eff.eff_bw).sum(axis=1) + kernels * eff.launch_us * 1e-6
    rel = np.abs(predicted - measured) / measured * 100
    return {"table": str(lut.path), "rows": int(len(rel)), "median_abs_pct": round(float(np.median(rel)), 2),
            "max_abs_pct": round(float(rel.max()), 2), "efficiency": asdict(eff)}


def default_efficiency(flow: Flow) -> Efficiency:
    return Efficiency(flow.eff_bw, flow.eff_compute, flow.launch_us)


def spec_from_profile(report: dict[str, Any], dtype: str) -> DeviceSpec:
    """A device without a spec-sheet entry (a CPU): peaks = what profile-device measured."""
    bench = report.get("microbench")
    if not bench or dtype not in bench["matmul"]:
        raise UsageError(f"device profile has no {dtype} micro-benchmark; run 'amoeba-profile profile-device --out DIR'")
    bw = max(bench["memory_bw_gbps"], *(m["gemv_bw_gbps"] for m in bench["matmul"].values()))
    peaks = {f"{k}_tflops": bench["matmul"].get(v, {}).get("gemm_tflops") or bench["matmul"][dtype]["gemm_tflops"]
             for k, v in (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"))}
    return DeviceSpec(slug=report["slug"], name=report["cpu"]["model"] if report["device"] == "cpu" else report["slug"],
                      kind="cpu" if report["device"] == "cpu" else "gpu", memory_gb=report["cpu"]["memory_gb"] or 1.0,
                      mem_bw_gbps=bw, int8_tops=max(peaks.values()) * 2, source="measured by profile-device", **peaks)


def whole_model_bounds(arch: ModelArch, layers: list[tuple[int, int, int]], spec: DeviceSpec, dtype: str,
                       phase: str, tokens: int, context: int, batch: int = 1) -> dict[str, float]:
    """Pure bounds for one forward of a whole model: all bytes at peak bandwidth, all FLOPs at peak compute."""
    entries = [Entry("base", phase, batch, tokens, context)]
    for heads, kv, ffn in layers:
        entries += [Entry("attn", phase, batch, tokens, context, heads, kv), Entry("mlp", phase, batch, tokens, 0, ffn=ffn)]
    ops = [op for e in entries for op in component_ops(arch, e, dtype, kv_cache_copy=False)]
    flops_peak, bw_peak = _peaks(spec, dtype)
    return {"bandwidth_bound_ms": sum(o.bytes for o in ops) / bw_peak * 1e3,
            "compute_bound_ms": sum(o.flops for o in ops) / flops_peak * 1e3}


def with_efficiency(flow: Flow, eff: Efficiency) -> Flow:
    return replace(flow, eff_bw=eff.eff_bw, eff_compute=eff.eff_compute, launch_us=eff.launch_us)


def write_roofline_table(plan, spec: DeviceSpec, flow: Flow, dtype: str, out_dir, calibrate_from: Lut | None = None):
    """Compute every component row of ``plan`` and write it as a table tagged ``roofline``.

    Returns (path, meta). With ``calibrate_from`` the flow's efficiencies are fitted to that
    measured table first and the fit is stored in the sidecar.
    """
    from datetime import datetime, timezone

    from . import __version__
    from .lut import rows_frame, table_path, write_table

    calibration = None
    eff = default_efficiency(flow)
    if calibrate_from is not None:
        eff, calibration = calibrate(calibrate_from, spec, flow, dtype)
    rows = roofline_rows(plan.arch, plan.entries(), spec, flow, dtype, eff)
    path = table_path(out_dir, spec.slug, flow.name, plan.arch.name, dtype)
    meta = {
        "tool_version": __version__, "source": "roofline", "device_slug": spec.slug, "device": spec.to_dict(),
        "backend": flow.name, "flow": asdict(flow), "efficiency": asdict(eff), "calibration": calibration,
        "dtype": dtype, "arch": plan.arch.to_dict(), "grid": plan.grid(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "computed from the spec sheet and per-op FLOPs/bytes, not measured",
    }
    write_table(path, rows_frame(rows), meta)
    return path, meta
