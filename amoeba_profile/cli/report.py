"""Render tables, selections and backend lists for people (rich) and for programs (JSON)."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from amoeba_profile.backends.flows import MEASURING, list_flows
from amoeba_profile.core.schema import TableMeta, meta_fields
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.selection.picker import Candidate, Selection, describe, width_text
from amoeba_profile.table.lut import Lut


def protocol_text(protocol: dict[str, Any]) -> str:
    """A stored timing protocol for people: ``3 rounds x 7 samples``, marked ``(--quick)`` when it
    is the quick one, which a later default build re-measures."""
    quick = TimingProtocol.quick()
    text = f"{protocol.get('rounds', '?')} rounds x {protocol.get('samples_per_round', '?')} samples"
    same = all(protocol.get(k) == getattr(quick, k) for k in ("rounds", "samples_per_round", "warmup_max"))
    return text + (" (--quick)" if same else "")


def build_protocols(meta: TableMeta) -> list[str]:
    """The protocols a table's builds measured with, first build first, each listed once (empty for
    a computed table). A later build adds rows, or re-measures rows its protocol asks more of."""
    builds = [meta.protocol] + [b.get("protocol") for b in meta.later_builds or []]
    texts = [protocol_text(p) for p in builds if isinstance(p, dict)]
    return list(dict.fromkeys(texts))


def lut_summary(lut: Lut) -> dict[str, Any]:
    meta, frame = lut.meta, lut.frame
    counts = frame.groupby(["component", "status"]).size()
    return {
        "path": str(lut.path),
        "device_slug": meta.device_slug,
        "device": meta.device,
        "backend": meta.backend,
        "backend_env": meta.backend_env,
        "dtype": meta.dtype,
        "model": (meta.arch or {}).get("name"),
        "source": meta.source,
        "method": meta.method,
        "method_reason": meta.method_reason,
        "versions": meta.versions,
        "backend_config": meta.backend_config,
        "fit": meta.fit,
        "grid": meta_fields(meta).get("grid"),
        "protocol": meta.protocol,
        "protocols": build_protocols(meta),
        "clock": meta.clock,
        "created_at": meta.created_at,
        "tool_version": meta.tool_version,
        "content_sha256": meta.content_sha256,
        "rows": {f"{c}/{s}": int(n) for (c, s), n in counts.items()},
        # each cross-check in brief (the sidecar keeps the tool's raw output and definitions)
        "crosschecks": [
            f"{c['tool']['tool']} at {c['at']}: "
            + ", ".join(f"{m.removesuffix('_ms')} {c['agreement_pct'][m]:+.1f} %" for m in ("ttft_ms", "tpot_ms"))
            for c in meta.crosschecks or []
            if "agreement_pct" in c
        ],
    }


def plain(value: Any) -> str:
    """A summary value for people: dicts as ``key=value``, lists comma-separated, never a Python repr."""
    if isinstance(value, dict):
        return " ".join(f"{k}={plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(plain(v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def _model_subnet(row) -> tuple[str, tuple[str, str, str]]:
    """(subnet label, (heads, kv, ffn) when every layer has one shape) of a ``model`` row, whose
    key columns carry no width: ``w3/4``, ``id 1a2b3c4d`` or ``per-layer 1a2b3c4d``."""
    if not row.subnet_json:
        return "no layers", ("", "", "")
    subnet = Subnet.from_json(row.subnet_json)
    if not subnet.is_uniform:
        return f"per-layer {subnet.id[:8]}", ("", "", "")
    first = subnet.layers[0]
    label = f"w{width_text(subnet.width_ratio)}" if subnet.width_ratio is not None else f"id {subnet.id[:8]}"
    return label, (str(first.heads), str(first.kv_heads), str(first.ffn))


def lut_table(lut: Lut, title: str = "latency table") -> Table:
    table = Table(title=title)
    for column in (
        "component",
        "phase",
        "tokens",
        "context",
        "heads",
        "kv",
        "ffn",
        "layers",
        "subnet",
        "median ms",
        "p90 ms",
        "cv",
        "n",
        "status",
    ):
        table.add_column(
            column, justify="right" if column not in ("component", "phase", "subnet", "status") else "left"
        )
    for row in lut.frame.itertuples():
        widths = (str(row.heads or ""), str(row.kv_heads or ""), str(row.ffn or ""))
        subnet = ""
        if row.component == "model":
            subnet, widths = _model_subnet(row)
        table.add_row(
            row.component,
            row.phase,
            str(row.tokens),
            str(row.context),
            *widths,
            str(row.num_layers or ""),
            subnet,
            f"{row.median_ms:.3f}" if row.status == "ok" else "-",
            f"{row.p90_ms:.3f}" if row.status == "ok" else "-",
            f"{row.cv:.3f}" if row.status == "ok" else "-",
            str(row.n),
            row.status + (f" {row.flags}" if row.flags else ""),
        )
    return table


def _interval_text(cand: Candidate) -> str:
    low, high = cand.interval()
    return f"{low:.1f}-{high:.1f}" if math.isfinite(low) and math.isfinite(high) else "-"


def _p_text(p: float) -> str:
    return f"{p:.2f}" if math.isfinite(p) else "-"


def selection_table(selection: Selection) -> Table:
    """The tied shapes (above the pick, may fit too), then the top-k within the budget; every row with
    its 90 % interval and its probability of fitting."""
    sure = f", q{selection.confidence:g} fits" if selection.confidence is not None else ""
    title = f"top {len(selection.top_k)} within {selection.budget_ms:g} ms {selection.metric} ({selection.stat}{sure})"
    table = Table(title=title)
    for column in (
        "",
        "layers",
        "width",
        "kept layers",
        "quality",
        selection.metric,
        "90 % interval",
        "P(fits)",
        "source",
    ):
        table.add_column(column)
    for cand in [*selection.tied, *selection.top_k]:
        mark = "pick" if cand is selection.pick else ("tied" if cand in selection.tied else "")
        kept = cand.subnet.kept_indices
        table.add_row(
            mark,
            str(cand.subnet.num_layers),
            width_text(cand.subnet.width_ratio),
            _ranges(kept),
            f"{cand.quality:.3f}",
            f"{cand.latency_ms:.1f}",
            _interval_text(cand),
            _p_text(cand.p_fit),
            cand.source,
        )
    return table


def flagged_table(selection: Selection, limit: int = 8) -> Table | None:
    """The flagged rows behind the pick and the runner-up (the first ``limit`` of each; ``--json``
    lists all); None when there are none."""
    if not any(selection.flagged.values()):
        return None
    table = Table(title="flagged table rows behind the answer")
    for column in ("for", "row (CSV line)", "flags", "cv", "host contention"):
        table.add_column(column)
    for who, rows in selection.flagged.items():
        for row in rows[:limit]:
            contention = row["host_contention"]
            table.add_row(
                who.replace("_", "-"),
                f"{row['row']} ({row['line']})",
                ", ".join(row["flags"]),
                "-" if row["cv"] is None else f"{row['cv']:.3f}",
                "-" if contention is None else f"{contention:.0%}",
            )
        if len(rows) > limit:
            table.add_row(who.replace("_", "-"), f"... {len(rows) - limit} more (--json lists all)", "", "", "")
    return table


def pareto_table(selection: Selection) -> Table:
    table = Table(title="Pareto front (latency vs quality)")
    for column in ("shape", selection.metric, "quality", "fits"):
        table.add_column(column)
    for cand in selection.pareto:
        table.add_row(
            describe(cand.subnet),
            f"{cand.latency_ms:.1f}",
            f"{cand.quality:.3f}",
            "yes" if cand.latency_ms <= selection.budget_ms else "no",
        )
    return table


def layer_runs_text(subnet) -> list[str]:
    """One line per run of consecutive layers of one shape: ``layers 0-5: 32 heads (4 kv), ffn 5632``."""
    return [
        f"layers {_ranges(indices)}: {heads} heads ({kv} kv), ffn {ffn}"
        for indices, heads, kv, ffn in subnet.layer_runs()
    ]


def _ranges(indices: list[int]) -> str:
    """Runs of consecutive indices: [0, 1, 2, 5, 7, 8] -> ``0-2,5,7-8``."""
    runs = [[indices[0], indices[0]]]
    for index in indices[1:]:
        if index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def backends_rows() -> list[dict[str, Any]]:
    """Every flow the project knows (measuring or unavailable here), one flat dict each."""
    return [
        {
            "name": f.name,
            "status": f.status,
            "available": f.status == MEASURING,
            "reason": f.reason,
            "install_hint": f.install_hint,
            "roofline_profile": f.roofline_profile,
            "maturity": f.maturity.label,
            "verified": f.maturity.verified,
            "maturity_note": f.maturity.note,
            "per_layer_heads": f.capabilities.per_layer_heads,
            "per_layer_ffn": f.capabilities.per_layer_ffn,
            "methods": list(f.capabilities.methods),
            "dtypes": list(f.capabilities.dtypes),
            "devices": list(f.capabilities.devices),
        }
        for f in list_flows()
    ]


def _widths_text(row: dict[str, Any]) -> str:
    if row["per_layer_heads"] and row["per_layer_ffn"]:
        return "heads+ffn per layer"
    if row["per_layer_ffn"]:
        return "one head count; ffn per layer"
    if row["per_layer_heads"]:
        return "one ffn; heads per layer"
    return "uniform only"


def backends_table() -> Group:
    """The flows as a table, then one line each with why (and what to install where it cannot run)."""
    table = Table(title="deployment flows")
    for column in ("flow", "status", "maturity", "widths", "methods", "devices", "roofline"):
        table.add_column(column)
    rows = backends_rows()
    lines = []
    for row in rows:
        table.add_row(
            row["name"],
            row["status"],
            row["maturity"],
            _widths_text(row),
            ",".join(row["methods"]) or "-",
            ",".join(row["devices"]),
            "yes" if row["roofline_profile"] else "no",
        )
        hint = f" Install: {row['install_hint']}." if row["install_hint"] and not row["available"] else ""
        note = f" {row['maturity'].capitalize()} ({row['maturity_note']})." if row["maturity_note"] else ""
        lines.append(Text(f"{row['name']}: {row['reason']}.{note}{hint}"))
    return Group(table, *lines)


def crosscheck_table(check) -> Table:
    """A cross-check (``amoeba_profile.measure.crosscheck.Crosscheck``): predicted vs the flow's tool, per metric."""
    w = check.workload
    table = Table(
        title=Text(
            f"{check.subnet.label} of {check.backend} on {check.device_slug}: table vs "
            f"{check.tool.tool} (batch {w.batch}, prompt {w.prompt_len}, {w.gen_len} new tokens)"
        )
    )
    for column in ("metric", "table (ms)", "tool (ms)", "agreement"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for metric, measured in check.measured_ms.items():
        table.add_row(
            metric, f"{check.predicted_ms[metric]:.3f}", f"{measured:.3f}", f"{check.agreement_pct[metric]:+.1f} %"
        )
    return table


def print_json(console: Console, data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def device_report(report: dict[str, Any]) -> Table:
    table = Table(title=f"device {report['slug']} ({report['device']})", show_header=False)
    table.add_column("what")
    table.add_column("value")
    cpu = report["cpu"]
    table.add_row(
        "cpu",
        f"{cpu['model']}: {cpu['cores']} cores / {cpu['threads']} threads, {cpu['memory_gb']} GB, "
        f"LLC {cpu['llc_bytes'] >> 20} MiB",
    )
    table.add_row("cpu isa", " ".join(cpu["isa"]) or "-")
    for gpu in report["gpus"]:
        table.add_row(
            f"gpu {gpu['index']}",
            f"{gpu['name']} ({gpu['slug']}), {gpu['memory_total_mb']} MB, sm {gpu['compute_capability']}, "
            f"driver {gpu['driver_version']}, CUDA {gpu['cuda_driver_version']}",
        )
        table.add_row(
            "  state",
            f"SM {gpu['sm_clock_mhz']}/{gpu['max_sm_clock_mhz']} MHz, mem {gpu['mem_clock_mhz']} MHz, "
            f"{gpu['temperature_c']} C, {gpu['power_w']}/{gpu['power_limit_w']} W, "
            f"reasons: {', '.join(gpu['clock_event_reasons']) or 'none'}",
        )
    if report["jetson"]:
        j = report["jetson"]
        table.add_row("jetson", f"{j['model']} ({j['slug']}), L4T {j['l4t']}, JetPack {j['jetpack']}")
        table.add_row(
            "  state",
            f"power mode {j['power_mode']}, jetson_clocks {'on' if j['jetson_clocks'] else 'off'}, "
            f"GPU {j['gpu_freq_mhz']} MHz, {j['power_w']} W",
        )
    bench = report.get("microbench")
    if bench:
        frac = lambda f: f" ({f:.0%} of peak)" if f is not None else ""
        table.add_row("memory bandwidth", f"{bench['memory_bw_gbps']} GB/s{frac(bench['memory_bw_fraction'])}")
        table.add_row("dispatch overhead", f"{bench['dispatch_overhead_us']} us per op")
        for dtype, m in bench["matmul"].items():
            table.add_row(
                f"{dtype} GEMV", f"{m['gemv_bw_gbps']} GB/s of weights{frac(m['gemv_bw_fraction'])}, {m['gemv_ms']} ms"
            )
            table.add_row(f"{dtype} GEMM", f"{m['gemm_tflops']} TFLOP/s{frac(m['gemm_fraction'])}, {m['gemm_ms']} ms")
    for note in report["notes"]:
        table.add_row("note", note)
    return table


def validation_table(results, metric: str) -> Table:
    table = Table(title=f"validation: predicted vs measured {metric} (ms)")
    for column in (
        "shape",
        "stored table",
        "fresh components",
        "measured",
        "error (stored)",
        "error (composition)",
        "budget",
    ):
        table.add_column(column)
    for v in results:
        table.add_row(
            describe(v.subnet),
            f"{v.predicted_ms:.1f}",
            f"{v.fresh_predicted_ms:.1f}",
            f"{v.measured_ms:.1f}",
            f"{v.error_pct:+.1f} %",
            f"{v.composition_error_pct:+.1f} %",
            Text("BROKEN", style="bold red") if v.breaks_budget else "ok",
        )
    return table


def verified_table(verification, metric: str) -> Table:
    """``select --verify``: every measured candidate, predicted (with its 90 % interval) beside measured."""
    table = Table(title=f"verified: measured whole through the serving loop ({metric})")
    for column in ("", "shape", "quality", "predicted", "90 % interval", "measured", "error %", "fits"):
        table.add_column(column)
    for result in verification.results:
        cand = result.candidate
        mark = "pick" if verification.pick is result else ""
        table.add_row(
            mark,
            Text(cand.subnet.label),
            f"{cand.quality:.3f}",
            f"{cand.latency_ms:.1f}",
            _interval_text(cand),
            f"{result.measured_ms:.1f}",
            f"{result.error_pct:+.1f}",
            "yes" if result.fits else "no",
        )
    return table
