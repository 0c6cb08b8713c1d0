"""The ``amoeba-profile`` command: parse, call the library, render. Exit 0 ok, 1 no answer or
failed run, 2 bad usage; errors are one line unless ``--debug``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .arch import resolve_arch
from .errors import AmoebaError, UsageError
from .lut import load_one
from .measure import TimingProtocol
from .predict import Predictor
from .report import (backends_rows, backends_table, device_report, lut_summary, lut_table, pareto_table, print_json,
                     selection_table, validation_table)
from .select import describe, select
from .subnet import AMOEBA_WIDTHS, DesignSpace, Subnet, default_depths, parse_ratio
from .workload import Workload, metric_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-device latency tables for shrinkable LLaMA models, and budgeted shape selection.")
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{what} needs positive integers, got {text!r}")
    return values


def _whole_subnets(arch, text: str | None) -> tuple[Subnet, ...]:
    """'22x1,18x3/4' -> uniform subnets measured whole (model rows for validation)."""
    if not text:
        return ()
    subnets = []
    for item in text.split(","):
        depth, _, width = item.strip().partition("x")
        if not depth.isdigit() or not width:
            raise UsageError(f"--whole items look like 18x3/4 (layers x width), got {item!r}")
        subnets.append(Subnet.uniform(arch, int(depth), parse_ratio(width)))
    return tuple(subnets)


@app.command("build-lut")
def build_lut(
    backend: str = typer.Option("pytorch", help="Backend adapter (see 'amoeba-profile backends')."),
    model: str = typer.Option(..., help="Built-in name (llama2-7b, tinyllama-1.1b, ...) or path to a config.json."),
    out_dir: Path = typer.Option(Path("lut"), "--out", help="Root folder of tables."),
    prompt_len: str = typer.Option("128", help="Prompt length(s) P for prefill rows, comma-separated."),
    contexts: str = typer.Option("128,256,512", help="KV-cache lengths for decode rows, comma-separated."),
    widths: str = typer.Option(",".join(["1", "7/8", "3/4", "5/8"]), help="Width ratios of the grid."),
    batch: int = typer.Option(1, min=1),
    whole: Optional[str] = typer.Option(None, help="Also measure whole subnets, e.g. '22x1,16x3/4' (validation rows)."),
    method: Optional[str] = typer.Option(None, help="components or difference (default: the method validated for "
                                         "this backend and device, see docs/design.md)."),
    depths: Optional[str] = typer.Option(None, help="difference: model depths to fit (default: 3 spread over the "
                                         "design space)."),
    decode_steps: int = typer.Option(8, min=1, help="Decode steps per serving-loop tpot sample."),
    artifacts: Optional[Path] = typer.Option(None, help="Compiled-engine cache (default ~/.cache/amoeba-profile/"
                                             "artifacts or $AMOEBA_ARTIFACTS)."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
    dtype: Optional[str] = typer.Option(None, help="float32 (CPU default), float16 (CUDA default) or bfloat16."),
    threads: Optional[int] = typer.Option(None, help="torch threads, or onnxruntime intra-op threads (default: "
                                          "torch's; the number is recorded)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds and samples (a coarse table, fast)."),
    predict: bool = typer.Option(False, "--predict", help="Compute a roofline table for a spec-sheet --device "
                                 "(e.g. rtx-a5000) and a flow --backend (pytorch, tensorrt-llm, mlc-llm); nothing runs."),
    calibrate: Optional[Path] = typer.Option(None, help="With --predict: fit the flow's efficiencies to this measured table."),
    device_profile: Optional[Path] = typer.Option(None, help="With --predict: peaks and per-op dispatch from a "
                                                  "profile-device JSON instead of the spec sheet."),
    strategy: Optional[Path] = typer.Option(None, help="AmoebaLLM selection-strategy .npy: extend the grid to cover "
                                            "its per-layer widths."),
) -> None:
    """Measure latencies through the backend and store them as a per-device table (resumable), or compute one (--predict)."""
    from .artifacts import ArtifactCache
    from .backends import backend_class, get_backend
    from .build import run_build
    from .methods import choose_method
    from .plan import BuildPlan

    arch = resolve_arch(model)
    width_values = tuple(parse_ratio(w) for w in widths.split(","))
    extra_attn, extra_ffn = _strategy_extent(arch, strategy) if strategy is not None else ((), ())
    grid = dict(widths=width_values, prompt_lens=_ints(prompt_len, "prompt-len"), contexts=_ints(contexts, "contexts"),
                batch=batch, whole=_whole_subnets(arch, whole), extra_attn=extra_attn, extra_ffn=extra_ffn)
    if predict:
        _predict_table(BuildPlan(arch, **grid), device, backend, dtype or "float16", out_dir, calibrate, device_profile)
        return
    chosen, reason = choose_method(backend, backend_class(backend).capabilities().methods, device, method)
    plan = BuildPlan(arch, **grid, method=chosen, depths=_ints(depths, "depths") if depths else (),
                     decode_steps=decode_steps)
    instance = get_backend(backend, device=device, dtype=dtype, threads=threads)
    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    err.print(f"method: {chosen} ({reason})", markup=False, highlight=False)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[entry]}"), console=err, transient=False) as bar:
        task = bar.add_task(f"{arch.name} on {backend}/{instance.device}", total=None, entry="")

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, entry=label)

        try:
            result = run_build(plan, instance, out_dir, protocol, progress, artifacts=ArtifactCache(artifacts),
                               method_reason=reason)
        except KeyboardInterrupt:
            raise AmoebaError("interrupted: finished entries are kept in the build journal; rerun the same command "
                              "to resume") from None
    if result.oom:
        err.print(f"[yellow]warning:[/] {len(result.oom)} entries failed (out of memory or unsupported) and are "
                  f"stored with that status: {', '.join(result.oom[:3])}")
    out.print(f"table: {result.path}  ({result.measured} entries measured, {result.reused} kept, {result.wall_s:.0f} s)")


def _strategy_extent(arch, path: Path) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """The narrowest and widest per-layer attention and FFN a strategy file produces: measured so
    the predictor interpolates (cost is linear in heads and channels) instead of refusing."""
    from .strategy import Strategy

    layers = [layer for subnet in Strategy.load(path, arch).subnets() for layer in subnet.layers]
    attn = sorted({(l.heads, l.kv_heads) for l in layers})
    ffn = sorted({l.ffn for l in layers})
    return (attn[0], attn[-1]), (ffn[0], ffn[-1])


def _predict_table(plan, device: str, flow_name: str, dtype: str, out_dir: Path, calibrate: Path | None,
                   device_profile: Path | None) -> None:
    from .device.specs import get_spec
    from .roofline import get_flow, spec_from_profile, write_roofline_table

    if plan.whole:
        raise UsageError("--whole measures real models; it cannot be combined with --predict")
    dispatch_us = None
    if device_profile is not None:
        try:
            report = json.loads(Path(device_profile).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{device_profile}: not a readable profile-device JSON ({exc})") from None
        spec = spec_from_profile(report, dtype)
        dispatch_us = (report.get("microbench") or {}).get("dispatch_overhead_us")
    else:
        spec = get_spec(device)
    reference = load_one(calibrate) if calibrate is not None else None
    if reference is not None and (reference.meta.get("device_slug"), reference.meta.get("backend")) != (spec.slug, flow_name):
        err.print(f"[yellow]warning:[/] calibrating {spec.slug}/{flow_name} from a table measured on "
                  f"{reference.meta.get('device_slug')}/{reference.meta.get('backend')}: efficiencies may not transfer")
    path, meta = write_roofline_table(plan, spec, get_flow(flow_name), dtype, out_dir, reference, dispatch_us)
    fit = meta["calibration"]
    how = (f"calibrated on {fit['table']} ({fit['rows']} rows, median |err| {fit['median_abs_pct']} %, max "
           f"{fit['max_abs_pct']} %)" if fit else "documented default efficiencies (no calibration)")
    out.print(f"table: {path}  (roofline, {len(plan.entries())} rows; {how}; efficiency {meta['efficiency']})")


def _space(table, arch, widths: str | None, strategy: Path | None) -> list[Subnet]:
    """The shapes to consider: the strategy file's exact shapes, or the table's uniform grid."""
    grid = table.meta.get("grid", {})
    width_values = tuple(parse_ratio(w) for w in widths.split(",")) if widths else None
    if strategy is not None:
        from .strategy import Strategy

        return Strategy.load(strategy, arch).subnets(ratios=width_values)
    space = DesignSpace.amoeba(arch, width_values or tuple(grid.get("widths", AMOEBA_WIDTHS)),
                               drop_rule=grid.get("drop_rule", "keep-ends"), ffn_multiple=grid.get("ffn_multiple", 1))
    return list(space.subnets())


def _select(lut: Path, budget_ms: float, metric: str, stat: str, prompt_len: int, gen_len: int, batch: int | None,
            widths: str | None, top_k: int, quality: Path | None, memory_gb: float | None, strategy: Path | None):
    from .arch import ModelArch
    from .quality import load_quality

    table = load_one(lut)
    arch = ModelArch.from_dict(table.meta["arch"])
    workload = Workload(batch or table.meta.get("grid", {}).get("batch", 1), prompt_len, gen_len)
    source = load_quality(quality) if quality is not None else None
    selection = select(Predictor(table), _space(table, arch, widths, strategy), workload, metric_name(metric),
                       budget_ms, stat, top_k, source, memory_gb, table.meta["dtype"])
    return table, arch, selection


def _shared_memory_note(table) -> str | None:
    from .device.specs import load_specs

    spec = load_specs().get(table.meta.get("device_slug", ""))
    if spec is not None and spec.shared_memory:
        return (f"{spec.name}: its {spec.memory_gb:g} GB are shared by CPU and GPU; leave room for the OS and "
                "the runtime when choosing --memory-gb")
    return None


@app.command("select")
def select_cmd(
    lut: Path = typer.Option(..., help="A table file, or a folder holding exactly one."),
    budget_ms: float = typer.Option(..., help="Latency budget in milliseconds."),
    metric: str = typer.Option("tpot", help="ttft, tpot or e2e (see README for definitions)."),
    stat: str = typer.Option("median", help="median or p90 of the table rows."),
    prompt_len: int = typer.Option(128, min=1),
    gen_len: int = typer.Option(128, min=1),
    batch: Optional[int] = typer.Option(None, help="Default: the table's batch."),
    widths: Optional[str] = typer.Option(None, help="Width ratios to consider (default: the table's grid)."),
    top_k: int = typer.Option(5, min=1),
    quality: Optional[Path] = typer.Option(None, help="Quality CSV (num_layers,width_ratio,score | subnet_id,score | "
                                           "name,score with _l24w0.875 suffixes). Default: a parameter-count proxy."),
    memory_gb: Optional[float] = typer.Option(None, help="Memory budget: weights + KV cache + activation headroom."),
    strategy: Optional[Path] = typer.Option(None, help="AmoebaLLM selection-strategy .npy: exact layers and widths."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also optimize one (heads, FFN) option per layer, exactly."),
    importance: Optional[Path] = typer.Option(None, help="With --per-layer: CSV layer,importance (default: equal)."),
    export: Optional[Path] = typer.Option(None, help="Write the pick as subnet.json, config.json/blocks.json and "
                                          "AmoebaLLM flags into this folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Choose the highest-quality shape whose predicted latency (and memory) fits the budget."""
    table, arch, selection = _select(lut, budget_ms, metric, stat, prompt_len, gen_len, batch, widths, top_k,
                                     quality, memory_gb, strategy)
    warning = "computed (roofline) table, not measured: treat latencies as estimates" if table.is_roofline else None
    if warning:
        err.print(f"[bold yellow]warning:[/] {warning}")
    note = _shared_memory_note(table) if memory_gb is not None else None
    result = selection.to_dict()
    pick_subnet = selection.pick.subnet
    if per_layer:
        per = _per_layer(table, arch, selection, importance, memory_gb)
        result["per_layer"] = per
        pick_subnet = Subnet.from_dict(per["subnet"])
    if export is not None:
        from .export import export_subnet

        result["exported"] = [str(p) for p in export_subnet(pick_subnet, export, table.meta["dtype"])]
    if as_json:
        print_json(out, {**result, **({"warning": warning} if warning else {}), **({"note": note} if note else {})})
        return
    pick = selection.pick
    out.print(f"[bold]pick:[/] {pick.subnet.label}  {describe(pick.subnet)}  predicted {selection.metric} = "
              f"{pick.latency_ms:.1f} ms ({selection.stat}, {pick.prediction.source}) <= {budget_ms:g} ms"
              + (f", {pick.memory.total_gb:.2f} GB <= {memory_gb:g} GB" if memory_gb is not None else ""))
    out.print(f"quality: {pick.quality:.3f} ({selection.quality_source}); {selection.considered} shapes considered")
    out.print(selection_table(selection))
    out.print(pareto_table(selection))
    if per_layer:
        per = result["per_layer"]
        gain = per["gain_over_uniform"]
        versus = f" ({gain:+.4f} over the best uniform shape)" if gain is not None else ""
        out.print(f"[bold]per-layer optimum:[/] {per['num_layers']} layers, quality {per['quality']:.4f}{versus}, "
                  f"predicted {per['predicted_ms']:.1f} ms [{per['solver']}]")
    if export is not None:
        out.print(f"exported: {', '.join(result['exported'])}")
    if note:
        err.print(f"[yellow]note:[/] {note}")
    if selection.skipped:
        err.print(f"[yellow]note:[/] {len(selection.skipped)} shapes not covered by the table: {selection.skipped[0]}")


def _per_layer(table, arch, selection, importance: Path | None, memory_gb: float | None) -> dict:
    from .optimize import load_importance, optimize_per_layer

    weights = load_importance(importance, arch) if importance is not None else None
    grid = table.meta.get("grid", {})
    result = optimize_per_layer(Predictor(table), arch, default_depths(arch), selection.workload,
                                selection.metric, selection.budget_ms, selection.stat, importance=weights,
                                drop_rule=grid.get("drop_rule", "keep-ends"), memory_gb=memory_gb,
                                dtype=table.meta["dtype"])
    uniform = selection.pick.quality if weights is None else None
    return {
        "subnet": result.subnet.to_dict(), "num_layers": result.subnet.num_layers, "quality": result.quality,
        "quality_model": "per-layer importance from file" if weights is not None else "proxy: retained parameters",
        "predicted_ms": result.latency_ms, "solver": result.solver,
        # With an importance file the per-layer quality is on another scale than the uniform proxy.
        "gain_over_uniform": result.quality - uniform if uniform is not None else None,
    }


@app.command("validate")
def validate_cmd(
    lut: Path = typer.Option(..., help="A measured table file, or a folder holding exactly one."),
    budget_ms: float = typer.Option(..., help="Latency budget in milliseconds."),
    top_k: int = typer.Option(3, min=1, help="How many of the top picks to build and measure whole."),
    metric: str = typer.Option("tpot"),
    stat: str = typer.Option("median"),
    prompt_len: int = typer.Option(128, min=1),
    gen_len: int = typer.Option(128, min=1),
    widths: Optional[str] = typer.Option(None),
    strategy: Optional[Path] = typer.Option(None),
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds and samples."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Measure the top-k picks whole with the table's own backend config, compare, write the rows back."""
    from .validate import kendall_tau, validate_selection

    table, _, selection = _select(lut, budget_ms, metric, stat, prompt_len, gen_len, None, widths, top_k, None, None,
                                  strategy)
    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    with Progress(TextColumn("[bold]validating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[entry]}"), console=err) as bar:
        task = bar.add_task("validate", total=None, entry="")
        results, path, drift = validate_selection(table.path, selection, protocol,
                                           lambda d, t, label: bar.update(task, completed=d, total=t, entry=label))
    measured = [v.measured_ms for v in results]
    tau = kendall_tau([v.predicted_ms for v in results], measured)
    tau_fresh = kendall_tau([v.fresh_predicted_ms for v in results], measured)
    if as_json:
        print_json(out, {"table": str(path), "metric": selection.metric, "budget_ms": budget_ms, "kendall_tau": tau,
                         "kendall_tau_fresh_components": tau_fresh, "device_drift": drift,
                         "validated": [v.to_dict() for v in results]})
    else:
        out.print(validation_table(results, selection.metric))
        if tau is not None:
            out.print(f"Kendall tau of the order: {tau:.3f} (stored table), {tau_fresh:.3f} (fresh components)")
        out.print(f"device drift since the table was built (the picks' components now vs stored): "
                  f"{100 * (drift - 1):+.1f} %")
        if abs(drift - 1) > 0.05:
            err.print("[yellow]note:[/] the device runs more than 5 % off its state when the table was built; "
                      "rebuild the table for this state")
        out.print(f"model rows written to {path}")
    broken = [v for v in results if v.breaks_budget]
    if broken:
        err.print(f"[bold red]budget broken:[/] {', '.join(v.subnet.label for v in broken)} measured above "
                  f"{budget_ms:g} ms")
        raise typer.Exit(1)


@app.command("plot")
def plot_cmd(
    lut: Path = typer.Option(..., help="A table file, or a folder holding exactly one."),
    out_dir: Path = typer.Option(Path("out/plots"), "--out"),
    budget_ms: Optional[float] = typer.Option(None, help="Draw the budget line and the pick."),
    metric: str = typer.Option("tpot"),
    prompt_len: int = typer.Option(128, min=1),
    gen_len: int = typer.Option(128, min=1),
    quality: Optional[Path] = typer.Option(None),
    strategy: Optional[Path] = typer.Option(None),
) -> None:
    """PNG figures: Pareto front with budget and pick, layer-latency heatmaps, predicted vs measured."""
    from .arch import ModelArch
    from .plots import plot_heatmaps, plot_pareto, plot_validation
    from .quality import ProxyQuality, load_quality
    from .select import evaluate

    table = load_one(lut)
    arch = ModelArch.from_dict(table.meta["arch"])
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = Workload(table.meta.get("grid", {}).get("batch", 1), prompt_len, gen_len)
    source = load_quality(quality) if quality is not None else ProxyQuality()
    candidates, _ = evaluate(Predictor(table), _space(table, arch, None, strategy), workload, metric_name(metric),
                             quality=source)
    pick = None
    if budget_ms is not None:
        fitting = [c for c in candidates if c.latency_ms <= budget_ms]
        pick = max(fitting, key=lambda c: (c.quality, -c.latency_ms)) if fitting else None
    paths = [plot_pareto(table, candidates, metric_name(metric), out_dir / "pareto.png", budget_ms, pick, source.name)]
    paths += plot_heatmaps(table, workload, out_dir)
    validation = plot_validation(table, out_dir / "validation.png")
    if validation is not None:
        paths.append(validation)
    for path in paths:
        out.print(f"wrote {path}")


@app.command("show")
def show(
    lut: Path = typer.Option(..., help="A table file, or a folder holding exactly one."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Device, backend, grid and provenance of a table, and its rows."""
    table = load_one(lut)
    summary = lut_summary(table)
    if as_json:
        print_json(out, {**summary, "table": table.frame.drop(columns=["samples_ms", "subnet_json"]).to_dict("records")})
        return
    for key in ("path", "device_slug", "backend", "dtype", "model", "source", "method", "versions", "grid", "clock",
                "created_at", "rows"):
        out.print(f"[bold]{key}:[/] {summary[key]}")
    out.print(lut_table(table))


@app.command("profile-device")
def profile_device(
    device: str = typer.Option("auto", help="auto (CUDA if torch sees one, else CPU), cpu or cuda[:N]."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Also write <out>/<device-slug>/device.json."),
    no_bench: bool = typer.Option(False, "--no-bench", help="Detect only; skip the micro-benchmarks."),
    quick: bool = typer.Option(False, "--quick", help="Smaller micro-benchmark shapes."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Detect the device and its state, and measure bandwidth, matmul throughput and dispatch overhead."""
    from .device.profile import profile

    report = profile(device, bench=not no_bench, quick=quick)
    if out_dir is not None:
        path = Path(out_dir) / report["slug"] / "device.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        err.print(f"wrote {path}")
    if as_json:
        print_json(out, report)
        return
    out.print(device_report(report))


@app.command("backends")
def backends(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Every backend, whether it can run here, and why not."""
    if as_json:
        print_json(out, backends_rows())
        return
    out.print(backends_table())


def main() -> None:
    """Entry point: typer handles usage errors (exit 2); our errors become one line."""
    try:
        app()
    except AmoebaError as exc:
        if _state["debug"]:
            raise
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure is still one line without --debug
        if _state["debug"]:
            raise
        err.print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", markup=False,
                  highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
