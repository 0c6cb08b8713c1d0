"""PNG figures: the latency-quality Pareto front, LUT heatmaps, predicted vs measured.

matplotlib is imported inside each function with the non-interactive Agg backend, so importing
this module (or the CLI) never needs a display.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.optimize import table_options
from amoeba_profile.selection.picker import Candidate, describe, pareto_front
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import Lut, write_file_atomically


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Render ``fig`` as PNG and put it at ``path`` as tables are written (``write_file_atomically``):
    a new file renamed over the old, so a symlink planted at ``path`` is replaced, never written
    through, and a reader never sees half a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_file_atomically(Path(path), buffer.getvalue())
    return path


def _title(lut: Lut) -> str:
    tag = " [ROOFLINE ESTIMATE]" if lut.is_roofline else ""
    return f"{lut.arch.name} {lut.dtype} on {lut.meta.device_slug} / {lut.meta.backend}{tag}"


def plot_pareto(
    lut: Lut,
    candidates: list[Candidate],
    metric: str,
    out: Path,
    budget_ms: float | None = None,
    pick: Candidate | None = None,
    quality_name: str = "",
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([c.latency_ms for c in candidates], [c.quality for c in candidates], s=18, color="0.65", label="shapes")
    front = pareto_front(candidates)
    ax.plot(
        [c.latency_ms for c in front], [c.quality for c in front], "-o", ms=4, color="tab:blue", label="Pareto front"
    )
    if budget_ms is not None:
        ax.axvline(budget_ms, color="tab:red", ls="--", label=f"budget {budget_ms:g} ms")
    if pick is not None:
        ax.scatter(
            [pick.latency_ms],
            [pick.quality],
            s=120,
            marker="*",
            color="tab:red",
            zorder=5,
            label=f"pick: {describe(pick.subnet)}",
        )
    ax.set_xlabel(f"predicted {metric} (ms)")
    ax.set_ylabel(
        "quality (proxy: retained parameters)"
        if not quality_name or quality_name.startswith("proxy")
        else "quality (measured score)"
    )
    ax.set_title(_title(lut), fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out


def plot_heatmaps(lut: Lut, workload: Workload, out_dir: Path, stat: str = "median") -> list[Path]:
    """Composed decoder-layer latency (``stat`` of the rows) over measured heads x FFN, per phase."""
    plt = _pyplot()
    predictor = Predictor(lut)
    options = table_options(predictor)
    heads = sorted({(h, kv) for h, kv, _ in options})
    ffns = sorted({f for _, _, f in options})
    paths = []
    for phase, metric, w in (
        ("prefill", "ttft_ms", Workload(workload.batch, workload.prompt_len, 1)),
        ("decode", "tpot_ms", Workload(workload.batch, workload.prompt_len, 2)),
    ):
        grid = np.array([[predictor.layer_metric(h, kv, f, w, metric, stat) for f in ffns] for h, kv in heads])
        fig, ax = plt.subplots(figsize=(6.5, 4))
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(ffns)), [str(f) for f in ffns], rotation=30, fontsize=8)
        ax.set_yticks(range(len(heads)), [f"{h} ({kv} kv)" for h, kv in heads], fontsize=8)
        for i in range(len(heads)):
            for j in range(len(ffns)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xlabel("FFN channels")
        ax.set_ylabel("attention heads")
        where = f"{workload.prompt_len} tokens" if phase == "prefill" else f"context {workload.prompt_len}"
        ax.set_title(f"one decoder layer, {phase} ({where}), {stat} ms\n{_title(lut)}", fontsize=9)
        fig.colorbar(image, ax=ax, label="ms")
        fig.tight_layout()
        path = out_dir / f"heatmap_{phase}.png"
        _save(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _log_ticks(ax, low: float, high: float) -> None:
    """Square log axes over [low, high] whose tick labels never run into each other.

    matplotlib labels every minor tick of a log axis that spans less than a decade (``6x10^1``,
    ``7x10^1``, ...), and at the top of a decade those labels overlapped. Labels go on 1-2-5 steps
    as plain numbers (only powers of ten past three decades; more steps under one decade), never
    on minor ticks, and the x labels are turned."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(high / low)
    subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0) if decades > 1 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=subs))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.tick_params(axis="x", labelrotation=45)


def validation_figure(lut: Lut):
    """The figure of ``plot_validation`` (a matplotlib Figure; the caller closes it), or None when
    the table has no whole-model rows."""
    models = lut.ok[(lut.ok.component == "model") & (lut.ok.num_layers > 0)]  # the 0-layer model is a fit input
    if models.empty:
        return None
    plt = _pyplot()
    predictor = Predictor(lut)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    shown: list[float] = []
    for phase, color in (("prefill", "tab:orange"), ("decode", "tab:blue")):
        rows = models[models.phase == phase]
        measured, predicted = [], []
        for row in rows.itertuples():
            subnet = Subnet.from_json(row.subnet_json)
            predicted.append(predictor.phase_ms(subnet, phase, row.batch, row.tokens, row.context)[0])
            measured.append(row.median_ms)
        if measured:
            errors = np.abs(np.array(predicted) / np.array(measured) - 1) * 100
            ax.scatter(
                measured,
                predicted,
                s=16,
                color=color,
                label=f"{phase}: median |err| {np.median(errors):.1f} %, max {errors.max():.1f} %",
            )
            shown += measured + predicted
    low, high = min(shown) / 1.15, max(shown) * 1.15  # the diagonal spans the points, with a margin
    ax.plot([low, high], [low, high], color="0.4", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_ticks(ax, low, high)
    ax.set_xlabel("measured whole model (ms)")
    ax.set_ylabel("predicted from the table (ms)")
    ax.set_title(
        f"stored-table prediction vs whole models measured (any later run includes device drift)\n{_title(lut)}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_validation(lut: Lut, out: Path) -> Path | None:
    """Predicted (composed from the table's rows) vs measured for every whole-model row of the table."""
    fig = validation_figure(lut)
    if fig is None:
        return None
    _save(fig, out)
    _pyplot().close(fig)
    return out
