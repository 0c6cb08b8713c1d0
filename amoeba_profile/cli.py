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
from .report import backends_rows, backends_table, device_report, lut_summary, lut_table, pareto_table, print_json, selection_table
from .select import describe, select
from .subnet import AMOEBA_WIDTHS, DesignSpace, Subnet, parse_ratio
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


def _whole_subnets(arch, text: str | None, widths_default) -> tuple[Subnet, ...]:
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
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
    dtype: Optional[str] = typer.Option(None, help="float32 (CPU default), float16 (CUDA default) or bfloat16."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: all cores)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds and samples (a coarse table, fast)."),
    predict: bool = typer.Option(False, "--predict", help="Compute a roofline table for a spec-sheet --device "
                                 "(e.g. rtx-a5000) and a flow --backend (pytorch, tensorrt-llm, mlc-llm); nothing runs."),
    calibrate: Optional[Path] = typer.Option(None, help="With --predict: fit the flow's efficiencies to this measured table."),
    device_profile: Optional[Path] = typer.Option(None, help="With --predict: peaks from a profile-device JSON "
                                                  "instead of the spec sheet (for CPUs)."),
) -> None:
    """Measure component latencies and store them as a per-device table (resumable), or compute one (--predict)."""
    from .backends import get_backend
    from .build import BuildPlan, run_build

    arch = resolve_arch(model)
    width_values = tuple(parse_ratio(w) for w in widths.split(","))
    plan = BuildPlan(arch, width_values, _ints(prompt_len, "prompt-len"), _ints(contexts, "contexts"), batch,
                     whole=_whole_subnets(arch, whole, width_values))
    if predict:
        _predict_table(plan, device, backend, dtype or "float16", out_dir, calibrate, device_profile)
        return
    instance = get_backend(backend, device=device, dtype=dtype, threads=threads)
    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[entry]}"), console=err, transient=False) as bar:
        task = bar.add_task(f"{arch.name} on {backend}/{instance.device}", total=None, entry="")

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, entry=label)

        try:
            result = run_build(plan, instance, out_dir, protocol, progress)
        except KeyboardInterrupt:
            raise AmoebaError("interrupted: finished entries are kept in the build journal; rerun the same command "
                              "to resume") from None
    if result.oom:
        err.print(f"[yellow]warning:[/] {len(result.oom)} entries ran out of memory and are stored as status=oom: "
                  f"{', '.join(result.oom[:3])}")
    out.print(f"table: {result.path}  ({result.measured} entries measured, {result.reused} kept, {result.wall_s:.0f} s)")


def _predict_table(plan, device: str, flow_name: str, dtype: str, out_dir: Path, calibrate: Path | None,
                   device_profile: Path | None) -> None:
    from .device.specs import get_spec
    from .roofline import get_flow, spec_from_profile, write_roofline_table

    if plan.whole:
        raise UsageError("--whole measures real models; it cannot be combined with --predict")
    if device_profile is not None:
        try:
            spec = spec_from_profile(json.loads(Path(device_profile).read_text()), dtype)
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{device_profile}: not a readable profile-device JSON ({exc})") from None
    else:
        spec = get_spec(device)
    reference = load_one(calibrate) if calibrate is not None else None
    if reference is not None and (reference.meta.get("device_slug"), reference.meta.get("backend")) != (spec.slug, flow_name):
        err.print(f"[yellow]warning:[/] calibrating {spec.slug}/{flow_name} from a table measured on "
                  f"{reference.meta.get('device_slug')}/{reference.meta.get('backend')}: efficiencies may not transfer")
    path, meta = write_roofline_table(plan, spec, get_flow(flow_name), dtype, out_dir, reference)
    fit = meta["calibration"]
    how = (f"calibrated on {fit['table']} ({fit['rows']} rows, median |err| {fit['median_abs_pct']} %, max "
           f"{fit['max_abs_pct']} %)" if fit else "documented default efficiencies (no calibration)")
    out.print(f"table: {path}  (roofline, {len(plan.entries())} rows; {how}; efficiency {meta['efficiency']})")


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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Choose the highest-quality shape whose predicted latency fits the budget."""
    table = load_one(lut)
    from .arch import ModelArch

    arch = ModelArch.from_dict(table.meta["arch"])
    grid = table.meta.get("grid", {})
    width_values = tuple(parse_ratio(w) for w in widths.split(",")) if widths else tuple(grid.get("widths", AMOEBA_WIDTHS))
    space = DesignSpace.amoeba(arch, width_values, drop_rule=grid.get("drop_rule", "keep-ends"),
                               ffn_multiple=grid.get("ffn_multiple", 1))
    workload = Workload(batch or grid.get("batch", 1), prompt_len, gen_len)
    selection = select(Predictor(table), space.subnets(), workload, metric_name(metric), budget_ms, stat, top_k)
    warning = "computed (roofline) table, not measured: treat latencies as estimates" if table.is_roofline else None
    if warning:
        err.print(f"[bold yellow]warning:[/] {warning}")
    if as_json:
        print_json(out, {**selection.to_dict(), **({"warning": warning} if warning else {})})
        return
    pick = selection.pick
    out.print(f"[bold]pick:[/] {pick.subnet.label}  {describe(pick.subnet)}  predicted {selection.metric} = {pick.latency_ms:.1f} ms "
              f"({selection.stat}, {pick.prediction.source}) <= {budget_ms:g} ms")
    out.print(f"quality: {pick.quality:.3f} ({selection.quality_source}); {selection.considered} shapes considered")
    out.print(selection_table(selection))
    out.print(pareto_table(selection))
    if selection.skipped:
        err.print(f"[yellow]note:[/] {len(selection.skipped)} shapes not covered by the table: {selection.skipped[0]}")


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
    for key in ("path", "device_slug", "backend", "dtype", "model", "source", "grid", "clock", "created_at", "rows"):
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
