"""Roofline tables for devices not at hand: component latency from FLOPs, bytes, peaks and the host.

Each component is a list of operations with FLOPs and bytes moved (GEMMs, attention over the KV
context, norms, elementwise ops, embeddings, lm_head). On the device an operation takes
max(FLOPs / (peak_flops x eff_compute), bytes / (peak_bw x eff_bw)). The host must also dispatch
``kernels`` operations at ``launch_us`` each (per-op dispatch measured by ``profile-device``, or the
flow's documented value). A GPU runs asynchronously from its host, so a component takes the longer
of the two (eager decode on a big GPU is host-bound: dispatch, not bandwidth, sets the latency);
on a CPU the host is the device and the two add.

Efficiencies default to the flow's documented values (its adapter's ``roofline_profile``, from
``roofline.json`` in the flow's folder) and are fitted from
measured tables where they exist, constrained to what is physical (at most 1); a table measured
faster than the device's peaks allow is refused. Every row is tagged ``source=roofline``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.dtypes import bytes_per_element
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import LutError, UsageError
from amoeba_profile.core.schema import Row, grid_fields
from amoeba_profile.core.timing import Measurement
from amoeba_profile.device.specs import DTYPE_PEAK, DeviceSpec
from amoeba_profile.table.lut import Lut, measured_row


@dataclass(frozen=True)
class Flow:
    name: str
    kernels: dict[str, int]
    launch_us: float
    eff_bw: float
    eff_compute: float
    kv_cache_copy: bool
    rationale: str = ""


def get_flow(name: str, profiles: dict[str, dict[str, Any]]) -> Flow:
    """``name``'s roofline profile among ``profiles`` (``backends.flows.roofline_profiles``: each
    flow declares its own; this layer does not import the flows)."""
    if name not in profiles:
        raise UsageError(f"no roofline profile for flow {name!r}: use one of {sorted(profiles)}")
    return Flow(name=name, **profiles[name])


@dataclass(frozen=True)
class Op:
    name: str
    flops: float
    bytes: float


def component_ops(arch: ModelArch, entry: Entry, dtype: str, kv_cache_copy: bool) -> list[Op]:
    """FLOPs and bytes of each operation of one component execution (see module docstring)."""
    s = bytes_per_element(dtype)
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


def host_overlaps(spec: DeviceSpec) -> bool:
    """Whether the host dispatches while the device computes (a GPU), or is the device (a CPU)."""
    return spec.kind != "cpu"


def combine_ms(device_ms, host_ms, overlap: bool):
    """Device time and host dispatch time of one component: the longer one when they overlap."""
    return np.maximum(device_ms, host_ms) if overlap else device_ms + host_ms


def component_ms(ops: list[Op], kernels: int, spec: DeviceSpec, dtype: str, eff: Efficiency) -> float:
    flops_peak, bw_peak = _peaks(spec, dtype)
    seconds = sum(max(op.flops / (flops_peak * eff.eff_compute), op.bytes / (bw_peak * eff.eff_bw)) for op in ops)
    return float(combine_ms(seconds * 1e3, kernels * eff.launch_us * 1e-3, host_overlaps(spec)))


def roofline_rows(
    arch: ModelArch, entries: list[Entry], spec: DeviceSpec, flow: Flow, dtype: str, eff: Efficiency
) -> list[Row]:
    rows = []
    for entry in entries:
        if entry.component == "model":
            continue
        ms = component_ms(
            entry_ops(arch, entry, dtype, flow.kv_cache_copy), entry_kernels(flow, entry.component), spec, dtype, eff
        )
        row = measured_row(
            entry,
            Measurement.from_samples([ms]),
            "ok",
            method="computed",
            repeat=1,
            wall_s=0.0,
            note=f"roofline {spec.slug} {flow.name}",
        )
        rows.append(msgspec.structs.replace(row, source="roofline", n=0, samples_ms="[]"))
    return rows


def entry_ops(arch: ModelArch, entry: Entry, dtype: str, kv_cache_copy: bool) -> list[Op]:
    """Operations of a row's entry; a ``layer`` (difference method) is its attention plus its MLP."""
    if entry.component != "layer":
        return component_ops(arch, entry, dtype, kv_cache_copy)
    attn = Entry("attn", entry.phase, entry.batch, entry.tokens, entry.context, entry.heads, entry.kv_heads)
    mlp = Entry("mlp", entry.phase, entry.batch, entry.tokens, 0, ffn=entry.ffn)
    return component_ops(arch, attn, dtype, kv_cache_copy) + component_ops(arch, mlp, dtype, kv_cache_copy)


def entry_kernels(flow: Flow, component: str) -> int:
    return flow.kernels["attn"] + flow.kernels["mlp"] if component == "layer" else flow.kernels[component]


def _features(lut: Lut, spec: DeviceSpec, flow: Flow, dtype: str):
    """Per measured row: compute-time and memory-time at efficiency 1 (s), kernels, measured (s), row index."""
    arch = lut.arch
    flops_peak, bw_peak = _peaks(spec, dtype)
    rows = lut.ok[lut.ok.component.isin(["attn", "mlp", "base", "layer"])]
    if rows.empty:
        raise LutError(f"{lut.path}: no measured component or layer rows to calibrate from")
    compute, memory, kernels, measured = [], [], [], []
    for row in rows.itertuples():
        entry = Entry(row.component, row.phase, row.batch, row.tokens, row.context, row.heads, row.kv_heads, row.ffn)
        ops = entry_ops(arch, entry, dtype, flow.kv_cache_copy)
        compute.append([op.flops / flops_peak for op in ops])
        memory.append([op.bytes / bw_peak for op in ops])
        kernels.append(entry_kernels(flow, row.component))
        measured.append(row.median_ms * 1e-3)
    width = max(len(x) for x in compute)
    pad = lambda rows_: np.array([r + [0.0] * (width - len(r)) for r in rows_])
    return pad(compute), pad(memory), np.array(kernels, float), np.array(measured), rows.index.to_numpy()


PHYSICAL_SLACK = 0.9  # a row may beat the pure bound by 10 % (spec-sheet rounding, boost clocks) before refusal


def _check_physical(lut: Lut, spec: DeviceSpec, features) -> None:
    """Refuse a table that runs faster than the device's peaks allow: calibrating on it would need
    efficiencies above 1, which means the table or the spec sheet is for another device."""
    compute, memory, _, measured, index = features
    bound = np.maximum(compute, memory).sum(axis=1)
    too_fast = measured < PHYSICAL_SLACK * bound
    if too_fast.any():
        i = int(np.argmax(bound / measured))
        row = lut.frame.loc[index[i]]
        raise LutError(
            f"{lut.path}: {int(too_fast.sum())} rows beat {spec.slug}'s peak bandwidth and compute (e.g. "
            f"{row.component} {row.phase} ctx {row.context}: {measured[i] * 1e3:.3g} ms measured, bound at 100 % "
            f"efficiency {bound[i] * 1e3:.3g} ms); calibration would need efficiencies above 1 - check the table's "
            "device and the spec sheet; calibration refused"
        )


def calibrate(lut: Lut, spec: DeviceSpec, flow: Flow, dtype: str) -> tuple[Efficiency, dict[str, Any]]:
    """Fit (eff_bw, eff_compute, launch_us) to a measured table by minimizing squared relative error.

    Efficiencies are searched on a grid up to 1 (physical: no kernel beats the peak); for each pair
    the per-op dispatch has a non-negative least-squares solution (closed form when host and device
    add, a 1-D search when they overlap). The report says whether a fitted efficiency sits at 1.
    """
    features = _features(lut, spec, flow, dtype)
    _check_physical(lut, spec, features)
    compute, memory, kernels, measured, _ = features
    overlap = host_overlaps(spec)
    launches = np.concatenate([[0.0], np.geomspace(1e-7, 1e-3, 200)])  # seconds per op
    best: tuple[float, float, float, float] | None = None  # (error, eb, ec, launch)
    for eb in np.linspace(0.05, 1.0, 96):
        for ec in np.geomspace(0.01, 1.0, 100):
            roof = np.maximum(compute / ec, memory / eb).sum(axis=1)
            if overlap:
                predicted = np.maximum(roof[None, :], kernels[None, :] * launches[:, None])
                errs = np.sum(((predicted - measured) / measured) ** 2, axis=1)
                launch = float(launches[int(np.argmin(errs))])
            else:  # relative residual r = (roof + k*L - m)/m; minimize sum r^2 over L >= 0
                a, y = kernels / measured, (measured - roof) / measured
                launch = max(0.0, float(a @ y / (a @ a)))
            err = float(np.sum(((combine_ms(roof, kernels * launch, overlap) - measured) / measured) ** 2))
            if best is None or err < best[0]:
                best = (err, eb, ec, launch)
    assert best is not None  # the grids above are not empty
    _, eb, ec, launch = best
    if overlap and launch > 0:  # the dispatch grid is geometric: refine it around the best point
        roof = np.maximum(compute / ec, memory / eb).sum(axis=1)
        fine = np.linspace(launch / 1.05, launch * 1.05, 201)
        errs = [np.sum(((np.maximum(roof, kernels * x) - measured) / measured) ** 2) for x in fine]
        launch = float(fine[int(np.argmin(errs))])
    eff = Efficiency(round(float(eb), 4), round(float(ec), 4), round(launch * 1e6, 3))
    report = evaluate(lut, spec, flow, dtype, eff)
    report["at_physical_bound"] = [name for name, value in (("eff_bw", eb), ("eff_compute", ec)) if value >= 0.999]
    report["host_overlaps_device"] = overlap
    return eff, report


def evaluate(lut: Lut, spec: DeviceSpec, flow: Flow, dtype: str, eff: Efficiency) -> dict[str, Any]:
    """Median and max |relative error| of the roofline against a measured table's component rows."""
    compute, memory, kernels, measured, _ = _features(lut, spec, flow, dtype)
    roof = np.maximum(compute / eff.eff_compute, memory / eff.eff_bw).sum(axis=1)
    predicted = combine_ms(roof, kernels * eff.launch_us * 1e-6, host_overlaps(spec))
    rel = np.abs(predicted - measured) / measured * 100
    return {
        "table": str(lut.path),
        "rows": int(len(rel)),
        "median_abs_pct": round(float(np.median(rel)), 2),
        "max_abs_pct": round(float(rel.max()), 2),
        "efficiency": asdict(eff),
    }


def default_efficiency(flow: Flow) -> Efficiency:
    return Efficiency(flow.eff_bw, flow.eff_compute, flow.launch_us)


def spec_from_profile(report: dict[str, Any], dtype: str) -> DeviceSpec:
    """A device without a spec-sheet entry (a CPU): peaks = what profile-device measured."""
    bench = report.get("microbench")
    if not bench or dtype not in bench["matmul"]:
        raise UsageError(
            f"device profile has no {dtype} micro-benchmark; run 'amoeba-profile profile-device --out DIR'"
        )
    bw = max(bench["memory_bw_gbps"], *(m["gemv_bw_gbps"] for m in bench["matmul"].values()))
    peaks = {
        field: bench["matmul"].get(name, {}).get("gemm_tflops") or bench["matmul"][dtype]["gemm_tflops"]
        for name, field in DTYPE_PEAK.items()
        if field.endswith("_tflops")
    }
    return DeviceSpec(
        slug=report["slug"],
        name=report["cpu"]["model"] if report["device"] == "cpu" else report["slug"],
        kind="cpu" if report["device"] == "cpu" else "gpu",
        memory_gb=report["cpu"]["memory_gb"] or 1.0,
        mem_bw_gbps=bw,
        int8_tops=max(peaks.values()) * 2,
        source="measured by profile-device",
        **peaks,
    )


def load_device_profile(path: Path | str, dtype: str) -> tuple[DeviceSpec, float | None]:
    """(peaks, per-op host dispatch in us or None) from a ``profile-device`` JSON report, for a
    device without a spec-sheet entry or to use what was measured instead of the sheet."""
    from amoeba_profile.core.inputs import MIB, read_bounded

    try:
        report = json.loads(read_bounded(Path(path), 16 * MIB, "profile-device JSON"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a readable profile-device JSON ({exc})") from None
    if not isinstance(report, dict):
        raise UsageError(f"{path}: a profile-device JSON holds an object")
    return spec_from_profile(report, dtype), (report.get("microbench") or {}).get("dispatch_overhead_us")


def calibration_warning(reference: Lut, spec: DeviceSpec, flow: Flow) -> str | None:
    """Why a calibration may not transfer: the measured table is of another device or flow."""
    measured_on = (reference.meta.device_slug, reference.meta.backend)
    if measured_on == (spec.slug, flow.name):
        return None
    return (
        f"calibrating {spec.slug}/{flow.name} from a table measured on {measured_on[0]}/{measured_on[1]}: "
        "efficiencies may not transfer"
    )


def whole_model_bounds(
    arch: ModelArch,
    layers: list[tuple[int, int, int]],
    spec: DeviceSpec,
    dtype: str,
    phase: str,
    tokens: int,
    context: int,
    batch: int = 1,
) -> dict[str, float]:
    """Pure bounds for one forward of a whole model: all bytes at peak bandwidth, all FLOPs at peak compute."""
    entries = [Entry("base", phase, batch, tokens, context)]
    for heads, kv, ffn in layers:
        entries += [
            Entry("attn", phase, batch, tokens, context, heads, kv),
            Entry("mlp", phase, batch, tokens, 0, ffn=ffn),
        ]
    ops = [op for e in entries for op in component_ops(arch, e, dtype, kv_cache_copy=False)]
    flops_peak, bw_peak = _peaks(spec, dtype)
    return {
        "bandwidth_bound_ms": sum(o.bytes for o in ops) / bw_peak * 1e3,
        "compute_bound_ms": sum(o.flops for o in ops) / flops_peak * 1e3,
    }


def write_roofline_table(
    plan,
    spec: DeviceSpec,
    flow: Flow,
    dtype: str,
    out_dir,
    calibrate_from: Lut | None = None,
    dispatch_us: float | None = None,
):
    """Compute every component row of ``plan`` and write it as a table tagged ``roofline``.

    Returns (path, meta). With ``calibrate_from`` the flow's efficiencies are fitted to that
    measured table first and the fit is stored in the sidecar; otherwise ``dispatch_us`` (per-op
    host dispatch measured by profile-device) replaces the flow's documented launch cost.
    """
    from datetime import datetime, timezone

    from amoeba_profile import __version__
    from amoeba_profile.core.files import table_lock
    from amoeba_profile.core.inputs import output_dir
    from amoeba_profile.table.lut import rows_frame, table_path, write_table

    if plan.whole:
        raise UsageError(
            "a roofline table computes components, not whole models: whole subnets (--whole) need a measured build"
        )
    plan.check_usable()
    out_dir = output_dir(out_dir, "--out")
    calibration = None
    eff = default_efficiency(flow)
    if dispatch_us is not None:
        eff = replace(eff, launch_us=float(dispatch_us))
    if calibrate_from is not None:
        eff, calibration = calibrate(calibrate_from, spec, flow, dtype)
    rows = roofline_rows(plan.arch, plan.entries(), spec, flow, dtype, eff)
    path = table_path(out_dir, spec.slug, flow.name, plan.arch.name, dtype)
    meta = {
        "tool_version": __version__,
        "source": "roofline",
        "device_slug": spec.slug,
        "device": spec.to_dict(),
        "backend": flow.name,
        "flow": asdict(flow),
        "efficiency": asdict(eff),
        "calibration": calibration,
        "method": "computed",
        "host_overlaps_device": host_overlaps(spec),
        "dtype": dtype,
        "arch": plan.arch.to_dict(),
        "grid": grid_fields(plan.grid()),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "computed from the spec sheet and per-op FLOPs/bytes, not measured",
        **({"source_config": plan.source_config} if plan.source_config is not None else {}),
    }
    with table_lock(path):
        write_table(path, rows_frame(rows), meta)
    return path, meta
