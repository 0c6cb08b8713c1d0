"""The ``amoeba-profile`` command: parse, call the library, render. Exit 0 ok, 1 no answer or
failed run, 2 bad usage (ours or the option parser's); every error is one line unless ``--debug``."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, Protocol, TypedDict

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from amoeba_profile import __version__
from amoeba_profile.cli.report import (
    backends_rows,
    backends_table,
    crosscheck_table,
    device_report,
    flagged_table,
    layer_runs_text,
    lut_summary,
    lut_table,
    pareto_table,
    plain,
    print_json,
    selection_table,
    validation_table,
    verified_table,
)
from amoeba_profile.core.arch import load_model, renamed, unrepresented_fields
from amoeba_profile.core.errors import AmoebaError, UsageError
from amoeba_profile.core.subnet import Subnet, parse_ratio, parse_whole
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.core.workload import metric_name
from amoeba_profile.measure.journal import check_corrupt_choice
from amoeba_profile.selection.picker import (
    DEFAULT_GEN_LEN,
    DEFAULT_PROMPT_LEN,
    describe,
    select,
    table_space,
    table_workload,
)
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_one

# rich_markup_mode=None: Typer's rich help prints a value type for every option, so flags read
# `--json <bool>` as if they took a value; the plain help prints flags bare.
app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
    help="Per-device latency tables for shrinkable LLaMA models, and budgeted shape selection.",
)
# markup=False: paths, model names and table cells are printed as they are; a folder named
# "mk[/]" or "[bold]x[/bold]" must neither crash the command after its work is done nor print
# altered. Styles come from Text objects (``_styled``), never from markup in a string.
out = Console(width=None if sys.stdout.isatty() else 160, markup=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160, markup=False)
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        out.print(f"amoeba-profile {__version__}", markup=False, highlight=False)
        raise typer.Exit()


class _ParserError(Protocol):
    """What the option parser's UsageError offers (click's, or the copy of click typer carries)."""

    exit_code: int

    def format_message(self) -> str: ...


# The option parser's own errors (a bad --budget-ms, a missing option, an unknown command): typer
# raises them from its copy of click, whose public member is ``typer.BadParameter``; their common
# base, the parser's UsageError, carries exit code 2 and ``format_message()``.
_PARSER_ERROR: type[_ParserError] = typer.BadParameter.__mro__[1]
_INTERRUPTED = 130  # 128 + SIGINT: the exit code typer returns for a Ctrl-C that no command handled


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())


class _PlanGrid(TypedDict):
    """The ``BuildPlan`` fields build-lut reads from its options for a measured and a computed table alike."""

    widths: tuple[float, ...]
    prompt_lens: tuple[int, ...]
    contexts: tuple[int, ...]
    batch: int
    whole: tuple[Subnet, ...]
    extra_attn: tuple[tuple[int, int], ...]
    extra_ffn: tuple[int, ...]
    source_config: dict[str, Any] | None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{what} needs positive integers, got {text!r}")
    return values


_CORRUPT_HELP = (
    "A journal damaged other than by a crash mid-append: stop (name the line), drop-tail (keep the "
    "results before it) or restart (discard it)."
)


def _styled(label: str, style: str, message: str) -> Text:
    """``label`` in ``style``, then ``message`` exactly as it is (never read as markup)."""
    return Text.assemble((label, style), " ", message)


def _notice(message: str) -> None:
    err.print(_styled("note:", "yellow", message), highlight=False, soft_wrap=True)


@app.command("build-lut")
def build_lut(
    backend: str = typer.Option("pytorch", help="Backend adapter (see 'amoeba-profile backends')."),
    model: str = typer.Option(..., help="Built-in name (llama2-7b, tinyllama-1.1b, ...) or path to a config.json."),
    name: Optional[str] = typer.Option(
        None,
        help="Name the table's model (default: the built-in name, or the "
        "config's folder name): the table is <model>-<dtype>.csv, so two configs in "
        "folders of the same name need one.",
    ),
    out_dir: Path = typer.Option(
        Path("out/lut"),
        "--out",
        help="Root folder of tables: the table goes to "
        "<out>/<device-slug>/<backend>/<model>-<dtype>.csv (the repository's lut/ holds the "
        "shipped tables; keep yours apart).",
    ),
    prompt_len: str = typer.Option("128", help="Prompt length(s) P for prefill rows, comma-separated."),
    contexts: str = typer.Option("128,256,512", help="KV-cache lengths for decode rows, comma-separated."),
    widths: str = typer.Option(
        ",".join(["1", "7/8", "3/4", "5/8"]), help="Width ratios to measure, comma-separated (7/8 or 0.875)."
    ),
    batch: int = typer.Option(1, min=1, help="Sequences per request."),
    whole: Optional[str] = typer.Option(None, help="Also measure whole subnets, e.g. '22x1,16x3/4' (validation rows)."),
    method: Optional[str] = typer.Option(
        None,
        help="components, calibrated or difference (default: the method the flow validated for "
        "this kind of device, its backends/<flow>/methods.json; `amoeba-profile backends` lists the flows).",
    ),
    depths: Optional[str] = typer.Option(
        None, help="difference: model depths to fit (default: 3 spread over the design space)."
    ),
    decode_steps: int = typer.Option(8, min=1, help="Decode steps per serving-loop tpot sample."),
    artifacts: Optional[Path] = typer.Option(
        None, help="Compiled-engine cache (default ~/.cache/amoeba-profile/artifacts or $AMOEBA_ARTIFACTS)."
    ),
    device: str = typer.Option(
        "auto",
        help="auto (CUDA if torch sees one, else CPU), cpu or cuda[:N]; with "
        "--predict a spec-sheet slug such as rtx-a5000.",
    ),
    dtype: Optional[str] = typer.Option(
        None, help="float32 (CPU default), float16 (CUDA default) or bfloat16; llama.cpp: f16 (default), q8_0 or q4_0."
    ),
    threads: Optional[int] = typer.Option(
        None,
        help="torch threads, onnxruntime intra-op threads or llama-bench -t "
        "(default: the cores other processes leave idle, or the table's own when "
        "resuming or extending one; recorded).",
    ),
    backend_option: Optional[list[str]] = typer.Option(
        None,
        "--backend-option",
        help="KEY=VALUE for the backend's "
        "config, repeatable (e.g. mode=max-autotune-no-cudagraphs for "
        "pytorch-compiled); stored in the table's sidecar.",
    ),
    busy: str = typer.Option(
        "wait",
        envvar="AMOEBA_BUSY",
        help="When other processes load the CPU: wait (up to "
        "--busy-wait-s, then measure with a warning), warn (measure at once) or refuse.",
    ),
    busy_wait_s: float = typer.Option(120.0, min=0, help="How long --busy wait/refuse waits for a quiet CPU."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Fewer rounds and samples (a coarse table, fast; a later build without --quick measures its rows again).",
    ),
    predict: bool = typer.Option(
        False,
        "--predict",
        help="Compute a roofline table for a spec-sheet --device "
        "(e.g. rtx-a5000) and a flow --backend with a roofline profile (`amoeba-profile backends`, "
        "column roofline); nothing runs.",
    ),
    calibrate: Optional[Path] = typer.Option(
        None, help="With --predict: fit the flow's efficiencies to this measured table."
    ),
    device_profile: Optional[Path] = typer.Option(
        None, help="With --predict: peaks and per-op dispatch from a profile-device JSON instead of the spec sheet."
    ),
    strategy: Optional[Path] = typer.Option(
        None, help="AmoebaLLM selection-strategy .npy: extend the grid to cover its per-layer widths."
    ),
    on_corrupt_journal: str = typer.Option("stop", help=_CORRUPT_HELP),
) -> None:
    """Measure a per-device latency table (resumable), or compute one for a spec-sheet device with --predict."""
    from amoeba_profile.core.strategy import Strategy
    from amoeba_profile.device.quiet import BusyPolicy
    from amoeba_profile.measure.artifacts import ArtifactCache
    from amoeba_profile.measure.build import preflight, run_build
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.measure.prepare import prepare_build

    check_corrupt_choice(on_corrupt_journal)
    arch, config = load_model(model)
    if name is not None:
        arch = renamed(arch, name)
    width_values = tuple(parse_ratio(w) for w in widths.split(","))
    extra_attn, extra_ffn = Strategy.load(strategy, arch).grid_extent() if strategy is not None else ((), ())
    grid = _PlanGrid(
        widths=width_values,
        prompt_lens=_ints(prompt_len, "prompt-len"),
        contexts=_ints(contexts, "contexts"),
        batch=batch,
        whole=parse_whole(arch, whole),
        extra_attn=extra_attn,
        extra_ffn=extra_ffn,
        source_config=config,
    )
    unrepresented = unrepresented_fields(config) if config is not None else []
    if unrepresented:
        err.print(
            f"warning: {model}: the latency model does not represent {'; '.join(unrepresented)} (kept in the "
            "table's sidecar: select --export carries them)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if predict:
        measuring_only = [
            name
            for name, value in (
                ("--method", method),
                ("--depths", depths),
                ("--quick", quick),
                ("--threads", threads),
                ("--artifacts", artifacts),
                ("--backend-option", backend_option),
            )
            if value
        ]
        if measuring_only:
            raise UsageError(f"{', '.join(measuring_only)}: only for measured builds, not with --predict")
        if device == "auto" and device_profile is None:
            raise UsageError(
                "--predict computes a table for a spec-sheet device: name it with --device (e.g. "
                "rtx-a5000, orin-nx-16gb)"
            )
        _predict_table(BuildPlan(arch, **grid), device, backend, dtype or "float16", out_dir, calibrate, device_profile)
        return
    if calibrate is not None or device_profile is not None:
        raise UsageError("--calibrate and --device-profile only apply with --predict")
    build = prepare_build(
        arch,
        backend=backend,
        device=device,
        method=method,
        dtype=dtype,
        threads=threads,
        **grid,
        depths=_ints(depths, "depths") if depths else (),
        decode_steps=decode_steps,
        backend_options=_backend_options(backend_option),
        out_dir=out_dir,
    )
    plan, instance = build.plan, build.backend
    policy = BusyPolicy(busy, busy_wait_s)
    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    preflight(plan, instance, out_dir)
    err.print(f"device: {instance.device} ({build.device_reason})", markup=False, highlight=False)
    if build.threads_reason:
        err.print(build.threads_reason, markup=False, highlight=False)
    for line in build.warnings:
        err.print(_styled("warning:", "yellow", line), highlight=False, soft_wrap=True)
    err.print(f"method: {plan.method} ({build.method_reason})", markup=False, highlight=False)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[entry]}", markup=False),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(escape(f"{arch.name} on {backend}/{instance.device}"), total=None, entry="")

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, entry=label)

        try:
            result = run_build(
                plan,
                instance,
                out_dir,
                protocol,
                progress,
                artifacts=ArtifactCache(artifacts),
                method_reason=build.method_reason,
                on_corrupt_journal=on_corrupt_journal,
                busy=policy,
                notice=_notice,
                adopt_threads=build.adopt_threads,
            )
        except KeyboardInterrupt:
            raise AmoebaError(
                "interrupted: finished entries are kept in the build journal; rerun the same command to resume"
            ) from None
    if result.recompiled:
        err.print(
            _styled(
                "warning:",
                "yellow",
                f"{len(result.recompiled)} rows compiled inside their timed samples "
                "(flagged 'recompiled'; their times include compile work): "
                f"{', '.join(result.recompiled[:3])}",
            )
        )
    if result.failed:
        err.print(
            _styled(
                "warning:",
                "yellow",
                f"{len(result.failed)} entries failed (out of memory, too noisy or no result) and are "
                f"stored with that status: {', '.join(result.failed[:3])}",
            )
        )
    if result.unsupported:
        _notice(
            f"{len(result.unsupported)} entries skipped: {backend} cannot run them (stored as unsupported, "
            f"the reason in their note): {', '.join(result.unsupported[:3])}"
        )
    if not result.written:
        out.print(
            f"table: {result.path}  (unchanged: it already holds every entry of this build, {result.reused} rows)",
            markup=False,
            highlight=False,
        )
        return
    again = (
        f", {result.remeasured} re-measured because their rows held fewer rounds or samples than this build's protocol"
        if result.remeasured
        else ""
    )
    out.print(
        f"table: {result.path}  ({result.measured} entries measured now, {result.from_journal} taken from the "
        f"journal of an interrupted build, {result.reused} kept{again}, {result.wall_s:.0f} s)",
        markup=False,
        highlight=False,
    )


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


def _predict_table(
    plan, device: str, flow_name: str, dtype: str, out_dir: Path, calibrate: Path | None, device_profile: Path | None
) -> None:
    from amoeba_profile.backends.flows import roofline_profiles
    from amoeba_profile.device.specs import get_spec
    from amoeba_profile.table.roofline import calibration_warning, get_flow, load_device_profile, write_roofline_table

    dispatch_us = None
    if device_profile is not None:
        spec, dispatch_us = load_device_profile(device_profile, dtype)
    else:
        spec = get_spec(device)
    flow = get_flow(flow_name, roofline_profiles())
    reference = load_one(calibrate) if calibrate is not None else None
    warning = calibration_warning(reference, spec, flow) if reference is not None else None
    if warning:
        err.print(_styled("warning:", "yellow", warning))
    path, meta = write_roofline_table(plan, spec, flow, dtype, out_dir, reference, dispatch_us)
    fit = meta["calibration"]
    how = (
        f"calibrated on {fit['table']} ({fit['rows']} rows, median |err| {fit['median_abs_pct']} %, max "
        f"{fit['max_abs_pct']} %)"
        if fit
        else "documented default efficiencies (no calibration)"
    )
    out.print(f"table: {path}  (roofline, {len(plan.entries())} rows; {how}; efficiency {meta['efficiency']})")


# The options of every command that ranks shapes (select, validate, plot), declared once: a command
# with fewer of them would measure or draw another ranking than the one select printed.
LutOption = Annotated[Path, typer.Option(help="A table file, or a folder holding exactly one.")]
MetricOption = Annotated[str, typer.Option(help="ttft, tpot or e2e (see README for definitions).")]
StatOption = Annotated[str, typer.Option(help="median or p90 of the table rows.")]
PromptLenOption = Annotated[int, typer.Option(min=1, help="Prompt tokens of the request.")]
GenLenOption = Annotated[int, typer.Option(min=1, help="Tokens generated per request (tpot needs >= 2).")]
BatchOption = Annotated[Optional[int], typer.Option(help="Sequences per request (default: the table's batch).")]
WidthsOption = Annotated[
    Optional[str],
    typer.Option(
        help="Width ratios to consider (default: the table's grid); with select --per-layer, the per-layer options too."
    ),
]
QualityOption = Annotated[
    Optional[Path],
    typer.Option(
        help="Quality CSV (num_layers,width_ratio,score | "
        "subnet_id,score | name,score with _l24w0.875 suffixes). "
        "Default: a parameter-count proxy."
    ),
]
MemoryOption = Annotated[
    Optional[float], typer.Option(help="Memory budget in GB: weights + KV cache + activation headroom.")
]
StrategyOption = Annotated[
    Optional[Path], typer.Option(help="AmoebaLLM selection-strategy .npy: exact layers and widths.")
]


@dataclass(frozen=True)
class Ranking:
    """What every selecting command ranks by: the request, the statistic, the shapes considered,
    their quality and the memory budget. ``select`` makes the pick from it; ``validate`` measures
    that ranking's top-k; ``plot`` draws its candidates and pick."""

    metric: str = "tpot"
    stat: str = "median"
    prompt_len: int | None = 128  # None: what the table covers (``table_workload``)
    gen_len: int | None = 128
    batch: int | None = None
    widths: str | None = None
    quality: Path | None = None
    memory_gb: float | None = None
    strategy: Path | None = None
    confidence: float | None = None

    def width_values(self) -> tuple[float, ...] | None:
        return tuple(parse_ratio(w) for w in self.widths.split(",")) if self.widths else None

    def space(self, table):
        return table_space(table, self.width_values(), self.strategy)

    def workload(self, table):
        return table_workload(table, self.prompt_len, self.gen_len, self.batch)

    def quality_source(self):
        """The --quality table, or None for the proxy."""
        from amoeba_profile.core.quality import load_quality

        return load_quality(self.quality) if self.quality is not None else None

    def select(self, table, budget_ms: float, top_k: int):
        return select(
            Predictor(table),
            self.space(table),
            self.workload(table),
            metric_name(self.metric),
            budget_ms,
            self.stat,
            top_k,
            self.quality_source(),
            self.memory_gb,
            table.dtype,
            self.confidence,
        )


@app.command("select")
def select_cmd(
    lut: LutOption,
    budget_ms: float = typer.Option(..., help="Latency budget in milliseconds."),
    metric: MetricOption = "tpot",
    stat: StatOption = "median",
    prompt_len: Optional[int] = typer.Option(
        None,
        min=1,
        help="Prompt tokens of the request (default: 128, or the "
        "table's shortest prompt length when it does not cover 128).",
    ),
    gen_len: Optional[int] = typer.Option(
        None,
        min=1,
        help="Tokens generated per request (tpot needs >= 2; "
        "default: 128, or as many as the table's longest context covers).",
    ),
    batch: BatchOption = None,
    widths: WidthsOption = None,
    top_k: int = typer.Option(5, min=1, help="How many of the best fitting shapes to list."),
    quality: QualityOption = None,
    memory_gb: MemoryOption = None,
    strategy: StrategyOption = None,
    per_layer: bool = typer.Option(
        False, "--per-layer", help="Also optimize one (heads, FFN) option per layer, exactly."
    ),
    importance: Optional[Path] = typer.Option(None, help="With --per-layer: CSV layer,importance (default: equal)."),
    export: Optional[Path] = typer.Option(
        None,
        help="Write the pick into this folder: subnet.json, config.json "
        "(LLaMA, or DeciLM/Nemotron-NAS block_configs), mlc-chat-config.json, "
        "AmoebaLLM flags and export.json (which tool reads which file).",
    ),
    pareto: bool = typer.Option(False, "--pareto", help="Also print the Pareto front (latency vs quality)."),
    confidence: Optional[float] = typer.Option(
        None,
        help="Pick the best shape whose predicted latency fits with this "
        "probability (its q-quantile within the budget), e.g. 0.95.",
    ),
    verify: Optional[int] = typer.Option(
        None,
        min=1,
        help="Measure the pick and K - 1 more candidates (tied shapes first) whole "
        "through the flow's serving loop on this device and answer with the best "
        "that measurably fits; resumable; the table is not written.",
    ),
    write_back: bool = typer.Option(
        False,
        "--write-back",
        help="With --verify: add the measured model rows to the table (select then prefers them over composition).",
    ),
    quick: bool = typer.Option(False, "--quick", help="With --verify: fewer rounds and samples."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Choose the highest-quality shape whose predicted latency (and memory) fits the budget."""
    from amoeba_profile.device.specs import shared_memory_note

    if importance is not None and not per_layer:
        raise UsageError(
            "--importance weighs the layers of the per-layer optimum: add --per-layer, or drop --importance"
        )
    ranking = Ranking(metric, stat, prompt_len, gen_len, batch, widths, quality, memory_gb, strategy, confidence)
    table = load_one(lut)
    selection = ranking.select(table, budget_ms, top_k)
    warnings = ["computed (roofline) table, not measured: treat latencies as estimates"] if table.is_roofline else []
    warnings += [selection.warning] if selection.warning else []
    warnings += [selection.quality_warning] if selection.quality_warning else []
    warning = "; ".join(warnings) or None
    for line in warnings:
        err.print(_styled("warning:", "bold yellow", line), highlight=False)
    chosen = selection.workload
    if (prompt_len is None and chosen.prompt_len != DEFAULT_PROMPT_LEN) or (
        gen_len is None and chosen.gen_len != DEFAULT_GEN_LEN
    ):
        _notice(
            f"a request of {chosen.prompt_len} prompt tokens and {chosen.gen_len} generated, as far as the table "
            f"covers (not {DEFAULT_PROMPT_LEN} and {DEFAULT_GEN_LEN}); --prompt-len and --gen-len choose"
        )
    note = shared_memory_note(table.meta.device_slug or "") if memory_gb is not None else None
    result = selection.to_dict(pareto=pareto)
    pick_subnet = selection.pick.subnet
    if per_layer:
        from amoeba_profile.selection.optimize import optimize_selection

        per_pick = optimize_selection(table, selection, importance, memory_gb, ranking.width_values())
        result["per_layer"] = per_pick.to_dict()
        pick_subnet = per_pick.result.subnet
    # --per-layer exports the per-layer optimum it prints, else the pick; either way the output says
    # which. A shape no deployment form can express fails the export alone: the selection is still
    # printed in full, then one error line.
    exported_shape = f"{'the per-layer optimum' if per_layer else 'the pick'} {pick_subnet.label}"
    export_error: AmoebaError | None = None
    if export is not None:
        from amoeba_profile.core.export import export_subnet

        try:
            report = export_subnet(pick_subnet, export, table.dtype, table.meta.source_config)
            result["exported"] = {
                **report.to_dict(),
                "shape": "per_layer" if per_layer else "pick",
                "label": pick_subnet.label,
            }
        except AmoebaError as exc:
            export_error = exc
            result["export_error"] = one_line(f"export of {exported_shape} failed: {exc}")
    if write_back and verify is None:
        raise UsageError("--write-back writes what --verify K measured: give --verify")
    verification = _verify(table, selection, verify, quick) if verify is not None else None
    if verification is not None:
        result["verified"] = verification.to_dict()
    if as_json:
        print_json(out, {**result, **({"warning": warning} if warning else {}), **({"note": note} if note else {})})
        _finish_verify(verification, write_back)
        _fail_export(result.get("export_error"), export_error)
        return
    pick = selection.pick
    low, high = pick.interval()
    spread = (
        f", 90 % interval {low:.1f}-{high:.1f} ms, P(<= budget) {pick.p_fit:.2f}"
        if math.isfinite(low) and math.isfinite(high)
        else ""
    )
    out.print(
        _styled(
            "pick:",
            "bold",
            f"{pick.subnet.label}  {describe(pick.subnet)}  predicted {selection.metric} = "
            f"{pick.latency_ms:.1f} ms ({selection.stat}, {pick.source}{spread}) <= {budget_ms:g} ms"
            + (f", {pick.memory_needed.total_gb:.2f} GB <= {memory_gb:g} GB" if memory_gb is not None else ""),
        )
    )
    if selection.tied:
        err.print(
            _styled(
                "note:",
                "yellow",
                f"{len(selection.tied)} shape(s) of higher quality may fit too (tied "
                "with the pick: the table cannot tell them apart at this budget); select --verify K "
                "measures them",
            ),
            highlight=False,
        )
    if not pick.prediction.model_error_known and spread:
        err.print(
            _styled(
                "note:",
                "yellow",
                "the intervals cover measurement noise only: this table has no fit "
                "against whole models to bound its composition error (build it with --method calibrated)",
            ),
            highlight=False,
        )
    out.print(f"quality: {pick.quality:.3f} ({selection.quality_source}); {selection.considered} shapes considered")
    out.print(selection_table(selection))
    if pareto:
        out.print(pareto_table(selection))
    flagged = flagged_table(selection)
    if flagged is not None:
        out.print(flagged)
    if per_layer:
        per = result["per_layer"]
        out.print(
            _styled(
                "per-layer optimum:",
                "bold",
                f"{pick_subnet.label}, {per['num_layers']} layers, quality "
                f"{per['quality']:.4f} ({per['gain_over_uniform']:+.4f} over the uniform pick, both scored "
                f"by {per['quality_model']}), predicted {per['predicted_ms']['value']:.1f} ms "
                f"({per['predicted_ms']['source']}) [{per['solver']}; {per['shape_rule']}]",
            )
        )
        for line in layer_runs_text(pick_subnet):
            out.print(f"  {line}", highlight=False)
    if "exported" in result:
        exported = result["exported"]
        out.print(
            f"exported {exported_shape} to {exported['folder']}: "
            + ", ".join(f"{f['name']} ({f['form']})" for f in exported["files"]),
            markup=False,
        )
        changed = [c["field"] for c in exported["config_changes"]]
        if changed:
            err.print(
                f"note: config.json differs from {exported['config_source']} in {', '.join(changed)} "
                "(export.json says how and why)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        for line in exported["adjustments"] + exported["not_expressed"] + exported["skipped"]:
            err.print(_styled("note:", "yellow", line), highlight=False)
    if note:
        err.print(_styled("note:", "yellow", note))
    if selection.skipped:
        err.print(
            _styled(
                "note:", "yellow", f"{len(selection.skipped)} shapes not covered by the table: {selection.skipped[0]}"
            )
        )
    if verification is not None:
        out.print(verified_table(verification, selection.metric))
        best = verification.pick
        if best is None:
            err.print(
                _styled(
                    f"none of the {len(verification.results)} measured candidates fits {budget_ms:g} ms:",
                    "bold red",
                    "choose a lower budget's pick or verify more (--verify K)",
                )
            )
        else:
            out.print(
                _styled(
                    "verified pick:",
                    "bold",
                    f"{best.candidate.subnet.label}  {describe(best.candidate.subnet)}  "
                    f"measured {selection.metric} = {best.measured_ms:.1f} ms <= {budget_ms:g} ms "
                    f"(predicted {best.candidate.latency_ms:.1f} ms)",
                ),
                highlight=False,
            )
    _finish_verify(verification, write_back)
    _fail_export(result.get("export_error"), export_error)
    if verification is not None and verification.pick is None:
        raise typer.Exit(1)


def _verify(table, selection, k: int, quick: bool):
    from amoeba_profile.measure.verify import verify_candidates

    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    with Progress(
        TextColumn("verifying", style="bold"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[entry]}"),
        console=err,
    ) as bar:
        task = bar.add_task("verify", total=None, entry="")
        try:
            return verify_candidates(
                table.file,
                selection,
                k,
                protocol,
                lambda d, t, label: bar.update(task, completed=d, total=t, entry=label),
                notice=_notice,
            )
        except KeyboardInterrupt:
            raise AmoebaError(
                "interrupted: finished entries are kept in the verify journal; rerun the same command to resume"
            ) from None


def _finish_verify(verification, write_back: bool) -> None:
    """After the answer is out: rows into the table when asked, then the journal goes."""
    if verification is None:
        return
    from amoeba_profile.measure.verify import finish

    added = finish(verification, write_back, _notice)
    if write_back:
        err.print(f"{added} model rows written to {verification.table}", highlight=False)


def _fail_export(message: str | None, exc: AmoebaError | None) -> None:
    """After the selection is out: the export's failure as one error line and its exit code."""
    if exc is not None:
        err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)


@app.command("validate")
def validate_cmd(
    lut: LutOption,
    budget_ms: float = typer.Option(..., help="Latency budget in milliseconds."),
    top_k: int = typer.Option(3, min=1, help="How many of the top picks to build and measure whole."),
    metric: MetricOption = "tpot",
    stat: StatOption = "median",
    prompt_len: PromptLenOption = 128,
    gen_len: GenLenOption = 128,
    batch: BatchOption = None,
    widths: WidthsOption = None,
    quality: QualityOption = None,
    memory_gb: MemoryOption = None,
    strategy: StrategyOption = None,
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds and samples."),
    on_corrupt_journal: str = typer.Option("stop", help=_CORRUPT_HELP),
    busy: str = typer.Option(
        "wait", envvar="AMOEBA_BUSY", help="When other processes load the CPU: wait, warn or refuse (as build-lut)."
    ),
    busy_wait_s: float = typer.Option(120.0, min=0, help="How long --busy wait/refuse waits for a quiet CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure the top-k picks whole with the table's own backend config, compare, write the rows back."""
    from amoeba_profile.device.quiet import BusyPolicy
    from amoeba_profile.measure.validate import kendall_tau, measure_picks, write_back

    check_corrupt_choice(on_corrupt_journal)
    table = load_one(lut)
    selection = Ranking(metric, stat, prompt_len, gen_len, batch, widths, quality, memory_gb, strategy).select(
        table, budget_ms, top_k
    )
    protocol = TimingProtocol.quick() if quick else TimingProtocol()
    policy = BusyPolicy(busy, busy_wait_s)
    with Progress(
        TextColumn("[bold]validating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[entry]}", markup=False),
        console=err,
    ) as bar:
        task = bar.add_task("validate", total=None, entry="")
        try:
            run = measure_picks(
                table.file,
                selection,
                protocol,
                lambda d, t, label: bar.update(task, completed=d, total=t, entry=label),
                on_corrupt_journal,
                _notice,
                busy=policy,
            )
        except KeyboardInterrupt:
            raise AmoebaError(
                "interrupted: finished entries are kept in the validation journal; rerun the same command to resume"
            ) from None
    results, path, drift = list(run.validations), run.table, run.drift
    err.print(
        f"{run.measured} entries measured now, {run.from_journal} taken from the journal of an interrupted validation",
        highlight=False,
    )
    measured = [v.measured_ms for v in results]
    tau = kendall_tau([v.predicted_ms for v in results], measured)
    tau_fresh = kendall_tau([v.fresh_predicted_ms for v in results], measured)
    if as_json:
        print_json(
            out,
            {
                "table": str(path),
                "metric": selection.metric,
                "budget_ms": budget_ms,
                "kendall_tau": tau,
                "kendall_tau_fresh_components": tau_fresh,
                "device_drift": drift,
                "validated": [v.to_dict() for v in results],
            },
        )
    else:
        out.print(validation_table(results, selection.metric))
        if tau is not None:
            out.print(f"Kendall tau of the order: {tau:.3f} (stored table), {tau_fresh:.3f} (fresh components)")
        out.print(
            f"device drift since the table was built (the picks' components now vs stored): {100 * (drift - 1):+.1f} %"
        )
        if abs(drift - 1) > 0.05:
            err.print(
                _styled(
                    "note:",
                    "yellow",
                    "the device runs more than 5 % off its state when the table was "
                    "built; rebuild the table for this state",
                )
            )
    broken = [v for v in results if v.breaks_budget]
    if broken:
        err.print(
            _styled(
                "budget broken:",
                "bold red",
                f"{', '.join(v.subnet.label for v in broken)} measured above {budget_ms:g} ms",
            )
        )
    # Results are out before the write-back, so a table that cannot be written still shows them.
    added = write_back(run, _notice)
    err.print(f"{added} model rows written to {path}", highlight=False)
    if broken:
        raise typer.Exit(1)


@app.command("plot")
def plot_cmd(
    lut: LutOption,
    out_dir: Path = typer.Option(Path("out/plots"), "--out", help="Folder for the PNG files."),
    budget_ms: Optional[float] = typer.Option(None, help="Draw the budget line and the pick."),
    metric: MetricOption = "tpot",
    stat: StatOption = "median",
    prompt_len: PromptLenOption = 128,
    gen_len: GenLenOption = 128,
    batch: BatchOption = None,
    widths: WidthsOption = None,
    quality: QualityOption = None,
    memory_gb: MemoryOption = None,
    strategy: StrategyOption = None,
) -> None:
    """PNG figures: Pareto front with budget and pick, layer-latency heatmaps, predicted vs measured."""
    from amoeba_profile.cli.plots import plot_heatmaps, plot_pareto, plot_validation
    from amoeba_profile.core.errors import InfeasibleBudget
    from amoeba_profile.core.inputs import output_dir, positive_float
    from amoeba_profile.core.quality import ProxyQuality
    from amoeba_profile.selection.picker import check_budget, evaluate

    ranking = Ranking(metric, stat, prompt_len, gen_len, batch, widths, quality, memory_gb, strategy)
    if budget_ms is not None:
        check_budget(budget_ms)
    if memory_gb is not None:
        positive_float(memory_gb, "--memory-gb")
    table = load_one(lut)
    output_dir(out_dir, "--out")
    workload = ranking.workload(table)
    source = ranking.quality_source() or ProxyQuality()
    foreign = source.check_model(table.arch)
    if foreign:
        err.print(_styled("warning:", "yellow", foreign), highlight=False, soft_wrap=True)
    candidates, _ = evaluate(
        Predictor(table),
        ranking.space(table),
        workload,
        metric_name(metric),
        stat,
        quality=source,
        dtype=table.dtype if memory_gb is not None else None,
    )
    if memory_gb is not None:  # as select: shapes over the memory budget are not candidates
        candidates = [c for c in candidates if c.memory_needed.total_gb <= memory_gb]
    pick = None
    if budget_ms is not None:
        try:
            pick = ranking.select(table, budget_ms, 1).pick  # the pick select prints, by its own rules
        except InfeasibleBudget:
            pick = None  # nothing fits: the figure shows the budget line and every shape beyond it
    paths = [plot_pareto(table, candidates, metric_name(metric), out_dir / "pareto.png", budget_ms, pick, source.name)]
    paths += plot_heatmaps(table, workload, out_dir, stat)
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
        print_json(
            out, {**summary, "table": table.frame.drop(columns=["samples_ms", "subnet_json"]).to_dict("records")}
        )
        return
    for key in (
        "path",
        "device_slug",
        "backend",
        "dtype",
        "model",
        "source",
        "method",
        "versions",
        "grid",
        "clock",
        "created_at",
        "rows",
        "crosschecks",
    ):
        out.print(Text(f"{key}: ", style="bold"), end="")
        out.print(plain(summary[key]), markup=False, highlight=False)
        if key == "method" and summary["protocols"]:
            out.print(Text("protocol: ", style="bold"), end="")
            out.print(", then ".join(summary["protocols"]), markup=False, highlight=False)
    out.print(lut_table(table))


@app.command("crosscheck")
def crosscheck_cmd(
    lut: Path = typer.Option(..., help="A measured table file, or a folder holding exactly one."),
    prompt_len: Optional[int] = typer.Option(None, min=1, help="Prompt tokens (default: from the table's grid)."),
    gen_len: Optional[int] = typer.Option(
        None, min=2, help="Tokens generated per request (default: from the table's contexts, at most 128)."
    ),
    repetitions: int = typer.Option(5, min=1, help="Timed requests of each kind for the tool."),
    stat: str = typer.Option("median", help="median or p90 of the table rows."),
    busy: str = typer.Option(
        "wait", envvar="AMOEBA_BUSY", help="When other processes load the CPU: wait, warn or refuse (as build-lut)."
    ),
    busy_wait_s: float = typer.Option(120.0, min=0, help="How long --busy wait/refuse waits for a quiet CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Time the table's full model with the flow's own benchmark tool, print the agreement, store it in the sidecar."""
    from amoeba_profile.device.quiet import BusyPolicy
    from amoeba_profile.measure.crosscheck import run_crosscheck, store

    table = load_one(lut)
    check = run_crosscheck(table.file, prompt_len, gen_len, repetitions, stat, BusyPolicy(busy, busy_wait_s), _notice)
    store(check, _notice)
    if as_json:
        print_json(out, check.to_dict())
        return
    out.print(crosscheck_table(check))
    out.print(
        f"stored in {check.table.name.removesuffix('.csv')}.meta.json under crosschecks "
        f"({check.tool.tool}: {check.tool.definitions})",
        markup=False,
        highlight=False,
    )


@app.command("reseal")
def reseal_cmd(
    lut: Path = typer.Option(..., help="The table's CSV file (its .meta.json sidecar beside it)."),
) -> None:
    """Accept a table's CSV changed outside amoeba-profile, once every row validates.

    For a table edited or re-saved (by pandas, a spreadsheet) on purpose: the sidecar gets the CSV's new SHA-256
    and a record of the re-seal (when, old and new SHA-256)."""
    from amoeba_profile.table.lut import reseal

    if lut.is_dir():
        raise UsageError(f"{lut}: reseal takes one table's CSV file, not a folder")
    record = reseal(lut)
    if record["old_sha256"] == record["new_sha256"]:
        out.print(f"{lut}: content already matched its sidecar; re-seal recorded", markup=False, highlight=False)
    else:
        out.print(
            f"{lut}: re-sealed (sha256 {str(record['old_sha256'])[:12]}... -> {record['new_sha256'][:12]}...)",
            markup=False,
            highlight=False,
        )


@app.command("profile-device")
def profile_device(
    device: str = typer.Option("auto", help="auto (CUDA if torch sees one, else CPU), cpu or cuda[:N]."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Also write <out>/<device-slug>/device.json."),
    no_bench: bool = typer.Option(False, "--no-bench", help="Detect only; skip the micro-benchmarks."),
    quick: bool = typer.Option(False, "--quick", help="Smaller micro-benchmark shapes."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Detect the device and its state, and measure bandwidth, matmul throughput and dispatch overhead."""
    from amoeba_profile.core.inputs import output_dir
    from amoeba_profile.device import resolve_device
    from amoeba_profile.device.profile import profile, write_profile

    resolved, why = resolve_device(device)
    root = output_dir(out_dir, "--out") if out_dir is not None else None  # checked before the benchmarks run
    err.print(f"device: {resolved} ({why})", markup=False, highlight=False)
    with Progress(
        TextColumn("[bold]micro-benchmarks"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[entry]}", markup=False),
        console=err,
        disable=no_bench,
    ) as bar:
        task = bar.add_task("profile", total=None, entry="")
        report = profile(
            resolved,
            bench=not no_bench,
            quick=quick,
            progress=lambda done, total, label: bar.update(task, completed=done, total=total, entry=label),
        )
    if root is not None:
        err.print(f"wrote {write_profile(report, root)}")
    if as_json:
        print_json(out, report)
        return
    out.print(device_report(report))


fleet_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Build tables on many devices at once through a Ray cluster (needs the fleet extra: "
    "pip install 'amoeba-profile[fleet]').",
)
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("resources")
def fleet_resources(
    device: str = typer.Option("auto", help="auto (CUDA if torch sees one, else CPU), cpu or cuda[:N]."),
    head: str = typer.Option("HEAD:6379", help="The head node's address, for the printed 'ray start' line."),
) -> None:
    """Print the Ray resource this machine's device advertises, and the 'ray start' line that joins it to a fleet."""
    import json
    import shlex

    from amoeba_profile.fleet.driver import node_resources

    resources = json.dumps({k: int(v) for k, v in node_resources(device).items()})
    out.print(resources, markup=False, highlight=False)
    out.print(f"ray start --address={head} --resources={shlex.quote(resources)}", markup=False, highlight=False)


@fleet_app.command("build")
def fleet_build(
    plan: Optional[Path] = typer.Option(
        None,
        help="YAML plan: devices, flows, models and grid (format: README.md, section 'Fleet: every device at once').",
    ),
    devices: Optional[str] = typer.Option(
        None, help="Without --plan: device labels, comma-separated (each a node resource device:<label>)."
    ),
    flows: str = typer.Option("pytorch", help="Without --plan: backends, comma-separated."),
    models: Optional[str] = typer.Option(
        None, help="Without --plan: models (built-in names or config.json paths), comma-separated."
    ),
    address: Optional[str] = typer.Option(
        None,
        help="Ray cluster to join (HEAD:6379); default: the one 'ray start' "
        "runs on this machine, else a new local one that advertises this machine's "
        "device.",
    ),
    out_dir: Path = typer.Option(Path("out/lut"), "--out", help="Root folder of tables, as build-lut's --out."),
    quick: bool = typer.Option(False, "--quick", help="Fewer rounds and samples (a coarse table, fast)."),
    busy: str = typer.Option(
        "wait",
        envvar="AMOEBA_BUSY",
        help="On each node, when other processes load its CPU: wait, warn or refuse (as build-lut).",
    ),
    busy_wait_s: float = typer.Option(120.0, min=0, help="How long --busy wait/refuse waits for a quiet CPU."),
    device_wait_s: float = typer.Option(
        600.0, min=0, help="Give a device's builds up (journal kept) after it has had no live node this long."
    ),
    max_retries: int = typer.Option(3, min=0, help="How often Ray reruns a unit whose worker or node died."),
    on_corrupt_journal: str = typer.Option("stop", help=_CORRUPT_HELP),
) -> None:
    """Build every (device, flow, model) table of a plan on a Ray cluster, one measurement per device at a time."""
    import shlex

    from amoeba_profile.device.quiet import BusyPolicy
    from amoeba_profile.fleet.driver import connect, disconnect, discover, listed, run_fleet
    from amoeba_profile.fleet.plan import flags_builds, load_fleet_plan

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
        nodes = discover()
        for node in nodes:
            labels = ", ".join(f"device:{label}" for label in node.labels)
            note = "" if node.detected in node.labels else f" (its tables go under {node.detected})"
            err.print(
                f"node {node.node[:12]} on {node.host}: {labels}; detected {node.detected}{note}",
                markup=False,
                highlight=False,
            )
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[entry]}", markup=False),
            console=err,
            transient=False,
        ) as bar:
            tasks = {b.name: bar.add_task(escape(b.name), total=None, entry="waiting for a node") for b in builds}

            def progress(name: str, done: int, total: int, label: str) -> None:
                bar.update(tasks[name], completed=done, total=total, entry=label)

            try:
                outcomes = run_fleet(
                    builds,
                    out_dir,
                    protocol,
                    busy=policy,
                    progress=progress,
                    notice=_notice,
                    device_wait_s=device_wait_s,
                    max_retries=max_retries,
                    on_corrupt_journal=on_corrupt_journal,
                    resume_hint="amoeba-profile " + shlex.join(sys.argv[1:]),
                )
            except KeyboardInterrupt:
                raise AmoebaError(
                    "interrupted: finished results are kept in each table's journal; rerun the same command to resume"
                ) from None
    finally:
        disconnect()
    failed = [o for o in outcomes if o.status not in ("written", "unchanged")]
    for outcome in outcomes:
        result = outcome.result
        if result is None:  # lost or failed: reported below
            continue
        if outcome.status == "written":
            again = f", {result.remeasured} re-measured with more rounds or samples" if result.remeasured else ""
            out.print(
                f"table: {result.path}  ({result.measured} entries measured now, {result.from_journal} taken "
                f"from the journal of an interrupted build, {result.reused} kept{again}, {result.wall_s:.0f} s, "
                f"{len(outcome.nodes)} node{'' if len(outcome.nodes) == 1 else 's'})",
                markup=False,
                highlight=False,
            )
        elif outcome.status == "unchanged":
            out.print(
                f"table: {result.path}  (unchanged: it already holds every entry of this build)",
                markup=False,
                highlight=False,
            )
    for outcome in failed[:_FAILURES_SHOWN]:
        err.print(f"error: {one_line(outcome.message)}", markup=False, highlight=False, soft_wrap=True)
    if len(failed) > _FAILURES_SHOWN:  # a plan of thousands of builds fails in a few lines, not thousands
        rest = failed[_FAILURES_SHOWN:]
        err.print(
            f"error: {len(rest)} more builds were not written ({listed([o.build.name for o in rest])}); each "
            "keeps its journal, and the same command resumes them",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if failed:
        raise typer.Exit(1)


_FAILURES_SHOWN = 5


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@app.command("backends")
def backends(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Every flow the project knows (measuring or unavailable here), why, and what to install."""
    if as_json:
        print_json(out, backends_rows())
        return
    out.print(backends_table())


def _failure(exc: Exception) -> tuple[str, int]:
    """(message, exit code) of a failure: ours, the option parser's, or unexpected."""
    if isinstance(exc, AmoebaError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}", 1
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
    if code == _INTERRUPTED:  # typer turns Ctrl-C outside our own handlers into a bare exit 130
        err.print("error: interrupted", markup=False, highlight=False)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
