"""The ``amoeba-profile`` command: parse, call the library, render. Exit 0 ok, 1 no answer or
failed run, 2 bad usage (ours or the option parser's); every error is one line unless ``--debug``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .arch import resolve_arch
from .errors import AmoebaError, UsageError
from .journal import check_corrupt_choice
from .lut import load_one
from .measure import TimingProtocol
from .predict import Predictor
from .report import (backends_rows, backends_table, device_report, flagged_table, layer_runs_text, lut_summary,
                     lut_table, pareto_table, plain, print_json, selection_table, validation_table)
from .select import DEFAULT_GEN_LEN, DEFAULT_PROMPT_LEN, describe, select, table_space, table_workload
from .subnet import parse_ratio, parse_whole
from .workload import metric_name

# rich_markup_mode=None: Typer's rich help prints a value type for every option, so flags read
# `--json <bool>` as if they took a value; the plain help prints flags bare.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 120},
                  help="Per-device latency tables for shrinkable LLaMA models, and budgeted shape selection.")
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        out.print(f"amoeba-profile {__version__}", markup=False, highlight=False)
        raise typer.Exit()


# The option parser's own errors (a bad --budget-ms, a missing option, an unknown command): typer
# raises them from its copy of click, whose public member is ``typer.BadParameter``; their common
# base, the parser's UsageError, carries exit code 2 and ``format_message()``.
_PARSER_ERROR = typer.BadParameter.__mro__[1]


@app.callback(invoke_without_command=True)
def _main(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    _state["debug"] = debug
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{what} needs positive integers, got {text!r}")
    return values


_CORRUPT_HELP = ("A journal damaged other than by a crash mid-append: stop (name the line), drop-tail (keep the "
                 "results before it) or restart (discard it).")


def _notice(message: str) -> None:
    err.print("[yellow]note:[/] " + escape(message), highlight=False, soft_wrap=True)


@app.command("build-lut")
def build_lut(
    backend: str = typer.Option("pytorch", help="Backend adapter (see 'amoeba-profile backends')."),
    model: str = typer.Option(..., help="Built-in name (llama2-7b, tinyllama-1.1b, ...) or path to a config.json."),
    out_dir: Path = typer.Option(Path("out/lut"), "--out", help="Root folder of tables: the table goes to "
                                 "<out>/<device-slug>/<backend>/<model>-<dtype>.csv (the repository's lut/ holds the "
                                 "shipped tables; keep yours apart)."),
    prompt_len: str = typer.Option("128", help="Prompt length(s) P for prefill rows, comma-separated."),
    contexts: str = typer.Option("128,256,512", help="KV-cache lengths for decode rows, comma-separated."),
    widths: str = typer.Option(",".join(["1", "7/8", "3/4", "5/8"]), help="Width ratios to measure, comma-separated "
                               "(7/8 or 0.875)."),
    batch: int = typer.Option(1, min=1, help="Sequences per request."),
    whole: Optional[str] = typer.Option(None, help="Also measure whole subnets, e.g. '22x1,16x3/4' (validation rows)."),
    method: Optional[str] = typer.Option(None, help="components or difference (default: the method validated for "
                                         "this backend and device, see docs/design.md)."),
    depths: Optional[str] = typer.Option(None, help="difference: model depths to fit (default: 3 spread over the "
                                         "design space)."),
    decode_steps: int = typer.Option(8, min=1, help="Decode steps per serving-loop tpot sample."),
    artifacts: Optional[Path] = typer.Option(None, help="Compiled-engine cache (default ~/.cache/amoeba-profile/"
                                             "artifacts or $AMOEBA_ARTIFACTS)."),
    device: str = typer.Option("auto", help="auto (CUDA if torch sees one, else CPU), cpu or cuda[:N]; with "
                               "--predict a spec-sheet slug such as rtx-a5000."),
    dtype: Optional[str] = typer.Option(None, help="float32 (CPU default), float16 (CUDA default) or bfloat16; "
                                        "llama.cpp: f16 (default), q8_0 or q4_0."),
    threads: Optional[int] = typer.Option(None, help="torch threads, onnxruntime intra-op threads or llama-bench -t "
                                          "(default: the cores other processes leave idle, or the table's own when "
                                          "resuming or extending one; recorded)."),
    backend_option: Optional[list[str]] = typer.Option(None, "--backend-option", help="KEY=VALUE for the backend's "
                                                       "config, repeatable (e.g. mode=max-autotune-no-cudagraphs for "
                                                       "pytorch-compiled); stored in the table's sidecar."),
    busy: str = typer.Option("wait", envvar="AMOEBA_BUSY", help="When other processes load the CPU: wait (up to "
                             "--busy-wait-s, then measure with a warning), warn (measure at once) or refuse."),
    busy_wait_s: float = typer.Option(120.0, min=0, help="How long --busy wait/refuse waits for a quiet CPU."),
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds and samples (a coarse table, fast; a later build "
                               "without --quick measures its rows again)."),
    predict: bool = typer.Option(False, "--predict", help="Compute a roofline table for a spec-sheet --device "
                                 "(e.g. rtx-a5000) and a flow --backend (pytorch, tensorrt-llm, mlc-llm); nothing runs."),
    calibrate: Optional[Path] = typer.Option(None, help="With --predict: fit the flow's efficiencies to this measured table."),
    device_profile: Optional[Path] = typer.Option(None, help="With --predict: peaks and per-op dispatch from a "
                                                  "profile-device JSON instead of the spec sheet."),
    strategy: Optional[Path] = typer.Option(None, help="AmoebaLLM selection-strategy .npy: extend the grid to cover "
                                            "its per-layer widths."),
    on_corrupt_journal: str = typer.Option("stop", help=_CORRUPT_HELP),
) -> None:
    """Measure a per-device latency table (resumable), or compute one for a spec-sheet device with --predict."""
    from .artifacts import ArtifactCache
    from .build import preflight, run_build
    from .plan import BuildPlan
    from .prepare import prepare_build
    from .quiet import BusyPolicy
    from .strategy import Strategy

    check_corrupt_choice(on_corrupt_journal)
    arch = resolve_arch(model)
    width_values = tuple(parse_ratio(w) for w in widths.split(","))
    extra_attn, extra_ffn = Strategy.load(strategy, arch).grid_extent() if strategy is not None else ((), ())
    grid = dict(widths=width_values, prompt_lens=_ints(prompt_len, "prompt-len"), contexts=_ints(contexts, "contexts"),
                batch=batch, whole=parse_whole(arch, whole), extra_attn=extra_attn, extra_ffn=extra_ffn)
    if predict:
        measuring_only = [name for name, value in (("--method", method), ("--depths", depths), ("--quick", quick),
                                                    ("--threads", threads), ("--artifacts", artifacts),
                                                    ("--backend-option", backend_option)) if value]
        if measuring_only:
            raise UsageError(f"{', '.join(measuring_only)}: only for measured builds, not with --predict")
        if device == "auto" and device_profile is None:
            raise UsageError("--predict computes a table for a spec-sheet device: name it with --device (e.g. "
                             "rtx-a5000, orin-nx-16gb)")
        _predict_table(BuildPlan(arch, **grid), device, backend, dtype or "float16", out_dir, calibrate, device_profile)
        return
    if calibrate is not None or device_profile is not None:
        raise UsageError("--calibrate and --device-profile only apply with --predict")
    build = prepare_build(arch, backend=backend, device=device, method=method, dtype=dtype, threads=threads, **grid,
                          depths=_ints(depths, "depths") if depths else (), decode_steps=decode_steps,
                          backend_options=_backend_options(backend_option), out_dir=out_dir)
    plan, instance = build.plan, build.backend
    policy = BusyPolicy(busy, busy_wait_s)
    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    preflight(plan, instance, out_dir)
    err.print(f"device: {instance.device} ({build.device_reason})", markup=False, highlight=False)
    if build.threads_reason:
        err.print(build.threads_reason, markup=False, highlight=False)
    for line in build.warnings:
        err.print("[yellow]warning:[/] " + escape(line), highlight=False, soft_wrap=True)
    err.print(f"method: {plan.method} ({build.method_reason})", markup=False, highlight=False)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[entry]}"), console=err, transient=False) as bar:
        task = bar.add_task(f"{arch.name} on {backend}/{instance.device}", total=None, entry="")

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, entry=label)

        try:
            result = run_build(plan, instance, out_dir, protocol, progress, artifacts=ArtifactCache(artifacts),
                               method_reason=build.method_reason, on_corrupt_journal=on_corrupt_journal, busy=policy,
                               notice=_notice)
        except KeyboardInterrupt:
            raise AmoebaError("interrupted: finished entries are kept in the build journal; rerun the same command "
                              "to resume") from None
    if result.recompiled:
        err.print(f"[yellow]warning:[/] {len(result.recompiled)} rows compiled inside their timed samples (flagged "
                  f"'recompiled'; their times include compile work): {', '.join(result.recompiled[:3])}")
    if result.oom:
        err.print(f"[yellow]warning:[/] {len(result.oom)} entries failed (out of memory or too noisy) and are "
                  f"stored with that status: {', '.join(result.oom[:3])}")
    if result.unsupported:
        _notice(f"{len(result.unsupported)} entries skipped: {backend} cannot run them (stored as unsupported, "
                f"the reason in their note): {', '.join(result.unsupported[:3])}")
    if not result.written:
        out.print(f"table: {result.path}  (unchanged: it already holds every entry of this build, {result.reused} "
                  "rows)", markup=False, highlight=False)
        return
    again = (f", {result.remeasured} re-measured because their rows held fewer rounds or samples than this "
             "build's protocol" if result.remeasured else "")
    out.print(f"table: {result.path}  ({result.measured} entries measured now, {result.from_journal} taken from the "
              f"journal of an interrupted build, {result.reused} kept{again}, {result.wall_s:.0f} s)",
              markup=False, highlight=False)


def _backend_options(items: list[str] | None) -> dict[str, str]:
    """'mode=default' items -> backend options; device, dtype and threads have their own flags."""
    options: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise UsageError(f"--backend-option takes KEY=VALUE, got {item!r}")
        if key in ("device", "dtype", "threads"):
            raise UsageError(f"--backend-option {key}=...: use --{key}")
        options[key] = value.strip()
    return options


def _predict_table(plan, device: str, flow_name: str, dtype: str, out_dir: Path, calibrate: Path | None,
                   device_profile: Path | None) -> None:
    from .device.specs import get_spec
    from .roofline import calibration_warning, get_flow, load_device_profile, write_roofline_table

    dispatch_us = None
    if device_profile is not None:
        spec, dispatch_us = load_device_profile(device_profile, dtype)
    else:
        spec = get_spec(device)
    flow = get_flow(flow_name)
    reference = load_one(calibrate) if calibrate is not None else None
    warning = calibration_warning(reference, spec, flow) if reference is not None else None
    if warning:
        err.print(f"[yellow]warning:[/] {warning}")
    path, meta = write_roofline_table(plan, spec, flow, dtype, out_dir, reference, dispatch_us)
    fit = meta["calibration"]
    how = (f"calibrated on {fit['table']} ({fit['rows']} rows, median |err| {fit['median_abs_pct']} %, max "
           f"{fit['max_abs_pct']} %)" if fit else "documented default efficiencies (no calibration)")
    out.print(f"table: {path}  (roofline, {len(plan.entries())} rows; {how}; efficiency {meta['efficiency']})")


def _select(lut: Path, budget_ms: float, metric: str, stat: str, prompt_len: int | None, gen_len: int | None,
            batch: int | None,
            widths: str | None, top_k: int, quality: Path | None, memory_gb: float | None, strategy: Path | None):
    from .quality import load_quality

    table = load_one(lut)
    width_values = tuple(parse_ratio(w) for w in widths.split(",")) if widths else None
    source = load_quality(quality) if quality is not None else None
    selection = select(Predictor(table), table_space(table, width_values, strategy),
                       table_workload(table, prompt_len, gen_len, batch), metric_name(metric), budget_ms, stat, top_k,
                       source, memory_gb, table.meta["dtype"])
    return table, selection


@app.command("select")
def select_cmd(
    lut: Path = typer.Option(..., help="A table file, or a folder holding exactly one."),
    budget_ms: float = typer.Option(..., help="Latency budget in milliseconds."),
    metric: str = typer.Option("tpot", help="ttft, tpot or e2e (see README for definitions)."),
    stat: str = typer.Option("median", help="median or p90 of the table rows."),
    prompt_len: Optional[int] = typer.Option(None, min=1, help="Prompt tokens of the request (default: 128, or the "
                                             "table's shortest prompt length when it does not cover 128)."),
    gen_len: Optional[int] = typer.Option(None, min=1, help="Tokens generated per request (tpot needs >= 2; "
                                          "default: 128, or as many as the table's longest context covers)."),
    batch: Optional[int] = typer.Option(None, help="Sequences per request (default: the table's batch)."),
    widths: Optional[str] = typer.Option(None, help="Width ratios to consider (default: the table's grid)."),
    top_k: int = typer.Option(5, min=1, help="How many of the best fitting shapes to list."),
    quality: Optional[Path] = typer.Option(None, help="Quality CSV (num_layers,width_ratio,score | subnet_id,score | "
                                           "name,score with _l24w0.875 suffixes). Default: a parameter-count proxy."),
    memory_gb: Optional[float] = typer.Option(None, help="Memory budget: weights + KV cache + activation headroom."),
    strategy: Optional[Path] = typer.Option(None, help="AmoebaLLM selection-strategy .npy: exact layers and widths."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also optimize one (heads, FFN) option per layer, exactly."),
    importance: Optional[Path] = typer.Option(None, help="With --per-layer: CSV layer,importance (default: equal)."),
    export: Optional[Path] = typer.Option(None, help="Write the pick into this folder: subnet.json, config.json "
                                          "(LLaMA, or DeciLM/Nemotron-NAS block_configs), mlc-chat-config.json, "
                                          "AmoebaLLM flags and export.json (which tool reads which file)."),
    pareto: bool = typer.Option(False, "--pareto", help="Also print the Pareto front (latency vs quality)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Choose the highest-quality shape whose predicted latency (and memory) fits the budget."""
    from .device.specs import shared_memory_note

    if importance is not None and not per_layer:
        raise UsageError("--importance weighs the layers of the per-layer optimum: add --per-layer, or drop "
                         "--importance")
    table, selection = _select(lut, budget_ms, metric, stat, prompt_len, gen_len, batch, widths, top_k, quality,
                               memory_gb, strategy)
    warnings = ["computed (roofline) table, not measured: treat latencies as estimates"] if table.is_roofline else []
    warnings += [selection.warning] if selection.warning else []
    warnings += [selection.quality_warning] if selection.quality_warning else []
    warning = "; ".join(warnings) or None
    for line in warnings:
        err.print(f"[bold yellow]warning:[/] {line}", highlight=False)
    chosen = selection.workload
    if (prompt_len is None and chosen.prompt_len != DEFAULT_PROMPT_LEN) or \
            (gen_len is None and chosen.gen_len != DEFAULT_GEN_LEN):
        _notice(f"a request of {chosen.prompt_len} prompt tokens and {chosen.gen_len} generated, as far as the table "
                f"covers (not {DEFAULT_PROMPT_LEN} and {DEFAULT_GEN_LEN}); --prompt-len and --gen-len choose")
    note = shared_memory_note(table.meta.get("device_slug", "")) if memory_gb is not None else None
    result = selection.to_dict(pareto=pareto)
    pick_subnet = selection.pick.subnet
    if per_layer:
        from .optimize import optimize_selection

        per_pick = optimize_selection(table, selection, importance, memory_gb)
        result["per_layer"] = per_pick.to_dict()
        pick_subnet = per_pick.result.subnet
    if export is not None:
        from .export import export_subnet

        result["exported"] = export_subnet(pick_subnet, export, table.meta["dtype"]).to_dict()
    if as_json:
        print_json(out, {**result, **({"warning": warning} if warning else {}), **({"note": note} if note else {})})
        return
    pick = selection.pick
    out.print(f"[bold]pick:[/] {pick.subnet.label}  {describe(pick.subnet)}  predicted {selection.metric} = "
              f"{pick.latency_ms:.1f} ms ({selection.stat}, {pick.source}) <= {budget_ms:g} ms"
              + (f", {pick.memory.total_gb:.2f} GB <= {memory_gb:g} GB" if memory_gb is not None else ""))
    out.print(f"quality: {pick.quality:.3f} ({selection.quality_source}); {selection.considered} shapes considered")
    out.print(selection_table(selection))
    if pareto:
        out.print(pareto_table(selection))
    flagged = flagged_table(selection)
    if flagged is not None:
        out.print(flagged)
    if per_layer:
        per = result["per_layer"]
        gain = per["gain_over_uniform"]
        versus = f" ({gain:+.4f} over the best uniform shape)" if gain is not None else ""
        out.print(f"[bold]per-layer optimum:[/] {per['num_layers']} layers, quality {per['quality']:.4f}{versus}, "
                  f"predicted {per['predicted_ms']['value']:.1f} ms ({per['predicted_ms']['source']}) "
                  f"\\[{per['solver']}; {per['shape_rule']}]")
        for line in layer_runs_text(pick_subnet):
            out.print(f"  {line}", highlight=False)
    if export is not None:
        exported = result["exported"]
        out.print(f"exported to {exported['folder']}: "
                  + ", ".join(f"{f['name']} ({f['form']})" for f in exported["files"]), markup=False)
        for line in exported["adjustments"] + exported["skipped"]:
            err.print(f"[yellow]note:[/] {line}", highlight=False)
    if note:
        err.print(f"[yellow]note:[/] {note}")
    if selection.skipped:
        err.print(f"[yellow]note:[/] {len(selection.skipped)} shapes not covered by the table: {selection.skipped[0]}")


@app.command("validate")
def validate_cmd(
    lut: Path = typer.Option(..., help="A measured table file, or a folder holding exactly one."),
    budget_ms: float = typer.Option(..., help="Latency budget in milliseconds."),
    top_k: int = typer.Option(3, min=1, help="How many of the top picks to build and measure whole."),
    metric: str = typer.Option("tpot", help="ttft, tpot or e2e."),
    stat: str = typer.Option("median", help="median or p90 of the table rows."),
    prompt_len: int = typer.Option(128, min=1, help="Prompt tokens of the request."),
    gen_len: int = typer.Option(128, min=1, help="Tokens generated per request."),
    widths: Optional[str] = typer.Option(None, help="Width ratios to consider (default: the table's grid)."),
    strategy: Optional[Path] = typer.Option(None, help="AmoebaLLM selection-strategy .npy: exact layers and widths."),
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds and samples."),
    on_corrupt_journal: str = typer.Option("stop", help=_CORRUPT_HELP),
    busy: str = typer.Option("wait", envvar="AMOEBA_BUSY", help="When other processes load the CPU: wait, warn or "
                             "refuse (as build-lut)."),
    busy_wait_s: float = typer.Option(120.0, min=0, help="How long --busy wait/refuse waits for a quiet CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure the top-k picks whole with the table's own backend config, compare, write the rows back."""
    from .quiet import BusyPolicy
    from .validate import kendall_tau, measure_picks, write_back

    check_corrupt_choice(on_corrupt_journal)
    table, selection = _select(lut, budget_ms, metric, stat, prompt_len, gen_len, None, widths, top_k, None, None,
                               strategy)
    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    policy = BusyPolicy(busy, busy_wait_s)
    with Progress(TextColumn("[bold]validating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[entry]}"), console=err) as bar:
        task = bar.add_task("validate", total=None, entry="")
        try:
            run = measure_picks(table.path, selection, protocol,
                                lambda d, t, label: bar.update(task, completed=d, total=t, entry=label),
                                on_corrupt_journal, _notice, busy=policy)
        except KeyboardInterrupt:
            raise AmoebaError("interrupted: finished entries are kept in the validation journal; rerun the same "
                              "command to resume") from None
    results, path, drift = list(run.validations), run.table, run.drift
    err.print(f"{run.measured} entries measured now, {run.from_journal} taken from the journal of an interrupted "
              "validation", highlight=False)
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
    broken = [v for v in results if v.breaks_budget]
    if broken:
        err.print(f"[bold red]budget broken:[/] {', '.join(v.subnet.label for v in broken)} measured above "
                  f"{budget_ms:g} ms")
    # Results are out before the write-back, so a table that cannot be written still shows them.
    added = write_back(run, _notice)
    err.print(f"{added} model rows written to {path}", highlight=False)
    if broken:
        raise typer.Exit(1)


@app.command("plot")
def plot_cmd(
    lut: Path = typer.Option(..., help="A table file, or a folder holding exactly one."),
    out_dir: Path = typer.Option(Path("out/plots"), "--out", help="Folder for the PNG files."),
    budget_ms: Optional[float] = typer.Option(None, help="Draw the budget line and the pick."),
    metric: str = typer.Option("tpot", help="ttft, tpot or e2e."),
    prompt_len: int = typer.Option(128, min=1, help="Prompt tokens of the request."),
    gen_len: int = typer.Option(128, min=1, help="Tokens generated per request."),
    quality: Optional[Path] = typer.Option(None, help="Quality CSV, as for select (default: a parameter-count proxy)."),
    strategy: Optional[Path] = typer.Option(None, help="AmoebaLLM selection-strategy .npy: exact layers and widths."),
) -> None:
    """PNG figures: Pareto front with budget and pick, layer-latency heatmaps, predicted vs measured."""
    from .inputs import output_dir
    from .plots import plot_heatmaps, plot_pareto, plot_validation
    from .quality import ProxyQuality, load_quality
    from .select import best_within, check_budget, evaluate

    if budget_ms is not None:
        check_budget(budget_ms)
    table = load_one(lut)
    output_dir(out_dir, "--out")
    workload = table_workload(table, prompt_len, gen_len)
    source = load_quality(quality) if quality is not None else ProxyQuality()
    foreign = source.check_model(table.arch)
    if foreign:
        err.print("[yellow]warning:[/] " + escape(foreign), highlight=False, soft_wrap=True)
    candidates, _ = evaluate(Predictor(table), table_space(table, strategy=strategy), workload, metric_name(metric),
                             quality=source)
    pick = best_within(candidates, budget_ms) if budget_ms is not None else None
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
        out.print(f"[bold]{key}:[/] ", end="")
        out.print(plain(summary[key]), markup=False, highlight=False)
        if key == "method" and summary["protocols"]:
            out.print("[bold]protocol:[/] ", end="")
            out.print(", then ".join(summary["protocols"]), markup=False, highlight=False)
    out.print(lut_table(table))


@app.command("reseal")
def reseal_cmd(
    lut: Path = typer.Option(..., help="The table's CSV file (its .meta.json sidecar beside it)."),
) -> None:
    """Accept a table's CSV changed outside amoeba-profile, once every row validates.

    For a table edited or re-saved (by pandas, a spreadsheet) on purpose: the sidecar gets the CSV's new SHA-256
    and a record of the re-seal (when, old and new SHA-256)."""
    from .lut import reseal

    if lut.is_dir():
        raise UsageError(f"{lut}: reseal takes one table's CSV file, not a folder")
    record = reseal(lut)
    if record["old_sha256"] == record["new_sha256"]:
        out.print(f"{lut}: content already matched its sidecar; re-seal recorded", markup=False, highlight=False)
    else:
        out.print(f"{lut}: re-sealed (sha256 {str(record['old_sha256'])[:12]}... -> {record['new_sha256'][:12]}...)",
                  markup=False, highlight=False)


@app.command("profile-device")
def profile_device(
    device: str = typer.Option("auto", help="auto (CUDA if torch sees one, else CPU), cpu or cuda[:N]."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Also write <out>/<device-slug>/device.json."),
    no_bench: bool = typer.Option(False, "--no-bench", help="Detect only; skip the micro-benchmarks."),
    quick: bool = typer.Option(False, "--quick", help="Smaller micro-benchmark shapes."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Detect the device and its state, and measure bandwidth, matmul throughput and dispatch overhead."""
    from .device import resolve_device
    from .device.profile import profile, write_profile
    from .inputs import output_dir

    resolved, why = resolve_device(device)
    root = output_dir(out_dir, "--out") if out_dir is not None else None  # checked before the benchmarks run
    err.print(f"device: {resolved} ({why})", markup=False, highlight=False)
    with Progress(TextColumn("[bold]micro-benchmarks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[entry]}"), console=err, disable=no_bench) as bar:
        task = bar.add_task("profile", total=None, entry="")
        report = profile(resolved, bench=not no_bench, quick=quick,
                         progress=lambda done, total, label: bar.update(task, completed=done, total=total, entry=label))
    if root is not None:
        err.print(f"wrote {write_profile(report, root)}")
    if as_json:
        print_json(out, report)
        return
    out.print(device_report(report))


fleet_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Build tables on many devices at once through a Ray cluster (needs the fleet extra: "
                             "pip install 'amoeba-profile[fleet]').")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("resources")
def fleet_resources(
    device: str = typer.Option("auto", help="auto (CUDA if torch sees one, else CPU), cpu or cuda[:N]."),
    head: str = typer.Option("HEAD:6379", help="The head node's address, for the printed 'ray start' line."),
) -> None:
    """Print the Ray resource this machine's device advertises, and the 'ray start' line that joins it to a fleet."""
    import json
    import shlex

    from .fleet import node_resources

    resources = json.dumps({k: int(v) for k, v in node_resources(device).items()})
    out.print(resources, markup=False, highlight=False)
    out.print(f"ray start --address={head} --resources={shlex.quote(resources)}", markup=False, highlight=False)


@fleet_app.command("build")
def fleet_build(
    plan: Optional[Path] = typer.Option(None, help="YAML plan: devices, flows, models and grid (format: README.md, "
                                        "section 'Fleet: every device at once')."),
    devices: Optional[str] = typer.Option(None, help="Without --plan: device labels, comma-separated (each a node "
                                          "resource device:<label>)."),
    flows: str = typer.Option("pytorch", help="Without --plan: backends, comma-separated."),
    models: Optional[str] = typer.Option(None, help="Without --plan: models (built-in names or config.json paths), "
                                         "comma-separated."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (HEAD:6379); default: the one 'ray start' "
                                          "runs on this machine, else a new local one that advertises this machine's "
                                          "device."),
    out_dir: Path = typer.Option(Path("out/lut"), "--out", help="Root folder of tables, as build-lut's --out."),
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds and samples (a coarse table, fast)."),
    busy: str = typer.Option("wait", envvar="AMOEBA_BUSY", help="On each node, when other processes load its CPU: "
                             "wait, warn or refuse (as build-lut)."),
    busy_wait_s: float = typer.Option(120.0, min=0, help="How long --busy wait/refuse waits for a quiet CPU."),
    device_wait_s: float = typer.Option(600.0, min=0, help="Give a device's builds up (journal kept) after it has had "
                                        "no live node this long."),
    max_retries: int = typer.Option(3, min=0, help="How often Ray reruns a unit whose worker or node died."),
    on_corrupt_journal: str = typer.Option("stop", help=_CORRUPT_HELP),
) -> None:
    """Build every (device, flow, model) table of a plan on a Ray cluster, one measurement per device at a time."""
    import shlex

    from .fleet import connect, disconnect, discover, run_fleet
    from .fleet_plan import flags_builds, load_fleet_plan
    from .quiet import BusyPolicy

    check_corrupt_choice(on_corrupt_journal)
    if plan is not None:
        if devices or models:
            raise UsageError("--devices and --models build without a plan; with --plan, the plan names them")
        builds = load_fleet_plan(plan)
    elif devices and models:
        builds = flags_builds(_names(devices), _names(flows), _names(models))
    else:
        raise UsageError("name what to build: --plan fleet.yaml, or --devices, --flows and --models")
    policy = BusyPolicy(busy, busy_wait_s)
    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    joined = connect(address)
    try:
        err.print(f"joined {joined}", markup=False, highlight=False)
        for node in discover():
            labels = ", ".join(f"device:{label}" for label in node.labels)
            note = "" if node.detected in node.labels else f" (its tables go under {node.detected})"
            err.print(f"node {node.node[:12]} on {node.host}: {labels}; detected {node.detected}{note}",
                      markup=False, highlight=False)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[entry]}"), console=err, transient=False) as bar:
            tasks = {b.name: bar.add_task(escape(b.name), total=None, entry="waiting for a node") for b in builds}

            def progress(name: str, done: int, total: int, label: str) -> None:
                bar.update(tasks[name], completed=done, total=total, entry=label)

            try:
                outcomes = run_fleet(builds, out_dir, protocol, busy=policy, progress=progress, notice=_notice,
                                     device_wait_s=device_wait_s, max_retries=max_retries,
                                     on_corrupt_journal=on_corrupt_journal,
                                     resume_hint="amoeba-profile " + shlex.join(sys.argv[1:]))
            except KeyboardInterrupt:
                raise AmoebaError("interrupted: finished results are kept in each table's journal; rerun the same "
                                  "command to resume") from None
    finally:
        disconnect()
    for outcome in outcomes:
        result = outcome.result
        if outcome.status == "written":
            again = f", {result.remeasured} re-measured with more rounds or samples" if result.remeasured else ""
            out.print(f"table: {result.path}  ({result.measured} entries measured now, {result.from_journal} taken "
                      f"from the journal of an interrupted build, {result.reused} kept{again}, {result.wall_s:.0f} s, "
                      f"{len(outcome.nodes)} node{'' if len(outcome.nodes) == 1 else 's'})", markup=False,
                      highlight=False)
        elif outcome.status == "unchanged":
            out.print(f"table: {result.path}  (unchanged: it already holds every entry of this build)",
                      markup=False, highlight=False)
        else:
            err.print(f"error: {one_line(outcome.message)}", markup=False, highlight=False, soft_wrap=True)
    if any(o.status not in ("written", "unchanged") for o in outcomes):
        raise typer.Exit(1)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@app.command("backends")
def backends(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Every flow the project knows (measuring, unavailable, roofline-only), why, and what to install."""
    if as_json:
        print_json(out, backends_rows())
        return
    out.print(backends_table())


def _failure(exc: Exception) -> tuple[str, int]:
    """(message, exit code) of a failure: ours, the option parser's, or unexpected."""
    if isinstance(exc, AmoebaError):
        return str(exc), exc.exit_code
    if isinstance(exc, _PARSER_ERROR):
        return exc.format_message(), exc.exit_code
    if isinstance(exc, typer.Abort):
        return "aborted", 1
    return f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1


def one_line(message: str) -> str:
    """Every error renders as one line, whatever its message holds (a library's multi-line text)."""
    return " ".join(message.split())


def main() -> None:
    """Entry point: every failure is one line on stderr with its exit code (a traceback with --debug)."""
    try:
        code = app(standalone_mode=False)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure is still one line without --debug
        if _state["debug"]:
            raise
        message, code = _failure(exc)
        err.print(f"error: {one_line(message)}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
