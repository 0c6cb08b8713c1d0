"""Measure the picks end to end and hold the predictions to account.

The top-k picks are measured whole through the serving loop of the table's own backend, rebuilt
from the config in the table's sidecar (same device, dtype, threads, library versions), in the same
interleaved rounds as a fresh measurement, by the table's method, of the layers they are made of;
their model rows are written back into the table. Measured metrics are composed from model rows exactly as
predicted ones are from component rows (prefill at the prompt length; decode interpolated over
the measured contexts and integrated over the generation). Two errors come out: against the stored
table (what a user gets) and against the fresh components (the composition error alone); their
ratio is the device's drift since the table was built - on a shared host it can exceed 10 %.

Measuring goes through a journal beside the table (``<table>.validate.journal.jsonl``), keyed like a
build's by everything the measurement depends on (the picks, the workload's shapes, the protocol,
backend and device): a killed validation rerun with the same command resumes, one with another
command is refused. The journal is removed only once the model rows are committed to the table,
so a failed write-back (a read-only table) loses nothing and the same command writes them later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amoeba_profile.backends import Backend, get_backend
from amoeba_profile.core.errors import AmoebaError, LutError
from amoeba_profile.core.files import Notice
from amoeba_profile.core.schema import Row
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.core.workload import Workload
from amoeba_profile.device import device_slug
from amoeba_profile.device.quiet import BusyPolicy
from amoeba_profile.measure.build import Progress, add_rows, measure_plan
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.selection.picker import Selection
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import Lut, frame_rows, load_table


@dataclass(frozen=True)
class Validation:
    """One pick: predicted from the stored table, predicted from components re-measured in the same
    rounds as the whole model (composition error alone), and measured."""

    subnet: Subnet
    predicted_ms: float
    fresh_predicted_ms: float
    measured_ms: float
    source: str
    budget_ms: float

    @property
    def error_pct(self) -> float:
        return 100 * (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def composition_error_pct(self) -> float:
        return 100 * (self.fresh_predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def breaks_budget(self) -> bool:
        return self.measured_ms > self.budget_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.subnet.label,
            "subnet_id": self.subnet.id,
            "predicted_ms": self.predicted_ms,
            "fresh_predicted_ms": self.fresh_predicted_ms,
            "measured_ms": self.measured_ms,
            "error_pct": self.error_pct,
            "composition_error_pct": self.composition_error_pct,
            "source": self.source,
            "breaks_budget": self.breaks_budget,
        }


def measured_metric(lut: Lut, subnet: Subnet, workload: Workload, metric: str, stat: str = "median") -> float:
    """``metric`` of ``subnet`` from the table's measured model rows alone (``Predictor.measured_metric``)."""
    return Predictor(lut).measured_metric(subnet, workload, metric, stat)


def table_backend(table_path: Path, lut: Lut) -> Backend:
    """The backend a table was measured with, rebuilt from its sidecar (same device, dtype, threads),
    refused when this machine or its library versions are not the table's: rows measured here must
    belong to the table."""
    meta = lut.meta
    if meta.source == "roofline":
        raise LutError(f"{table_path}: a roofline table has no backend to measure with; use a measured table")
    config = dict(meta.backend_config or {"device": (meta.backend_env or {}).get("device", "cpu"), "dtype": lut.dtype})
    here = device_slug(config.get("device", "cpu"))
    if here != lut.device_slug:
        raise LutError(f"{table_path}: measured on {lut.device_slug}, this machine is {here}; measure there")
    backend = get_backend(lut.backend, **config)
    if meta.versions and meta.versions != backend.versions():
        raise LutError(
            f"{table_path}: built with {meta.versions}, this machine has {backend.versions()}; "
            "new rows would mix library versions - rebuild the table here first"
        )
    return backend


def journal_path(table_path: Path) -> Path:
    return table_path.with_name(table_path.name + ".validate.journal.jsonl")


@dataclass(frozen=True)
class ValidationRun:
    """The validations of one run, the model rows still to be written into ``table`` and the
    journal that holds them until then. ``drift``: how much slower (>1) or faster the picks'
    components run now than the stored table says; ``measured`` / ``from_journal``: entries
    measured by this run / taken from an interrupted run's journal."""

    validations: tuple[Validation, ...]
    table: Path
    drift: float
    models: tuple[Row, ...]
    note: dict[str, Any]
    journal: Path
    measured: int
    from_journal: int


def measure_picks(
    table_path: Path,
    selection: Selection,
    protocol: TimingProtocol = TimingProtocol(),
    progress: Progress | None = None,
    on_corrupt_journal: str = "stop",
    notice: Notice | None = None,
    busy: BusyPolicy | None = None,
) -> ValidationRun:
    """Measure the picks whole, interleaved in the same rounds with the components they are made
    of, through the validation journal; the table is not written (``write_back`` does that). It
    measures like a build: under the device's measurement lock, with the ``busy`` policy."""
    table_path = Path(table_path)
    lut = load_table(table_path)
    backend = table_backend(table_path, lut)
    workload = selection.workload
    picks = tuple(c.subnet for c in selection.top_k)
    layers = [layer for subnet in picks for layer in subnet.layers]
    grid = lut.grid
    plan = BuildPlan(
        lut.arch,
        widths=(),
        prompt_lens=(workload.prompt_len,),
        contexts=tuple(sorted(set(grid.contexts))),
        batch=workload.batch,
        whole=picks,
        method=lut.meta.method or "components",
        depths=tuple(grid.depths),
        decode_steps=grid.decode_steps or 8,
        extra_attn=tuple(sorted({(l.heads, l.kv_heads) for l in layers})),
        extra_ffn=tuple(sorted({l.ffn for l in layers})),
    )
    measured = measure_plan(
        plan,
        backend,
        journal_path(table_path),
        protocol,
        progress,
        method_reason="validation: the table's own method",
        on_corrupt_journal=on_corrupt_journal,
        busy=busy,
        notice=notice,
    )
    fresh = measured.lut
    # Composed from the fresh components even though the fresh model rows are there: that gap is
    # the composition error this run reports.
    fresh_predictor, truths = Predictor(fresh, whole_models=False), Predictor(fresh)
    out = []
    for cand in selection.top_k:
        truth = truths.measured_metric(cand.subnet, workload, selection.metric, selection.stat)
        now = fresh_predictor.predict(cand.subnet, workload, selection.stat).metric(selection.metric)
        out.append(Validation(cand.subnet, cand.latency_ms, now, truth, cand.source, selection.budget_ms))
    models = tuple(frame_rows(fresh.frame[fresh.frame.component == "model"]))
    # Components now against the same components stored: a pick the table already holds model rows
    # of is predicted from them, so the stored side is composed explicitly.
    stored = Predictor(lut, whole_models=False)
    drift = float(
        np.mean(
            [
                v.fresh_predicted_ms / stored.predict(v.subnet, workload, selection.stat).metric(selection.metric)
                for v in out
            ]
        )
    )
    note = {"validation": {"picks": [s.id for s in picks], "protocol": protocol.to_dict()}}
    return ValidationRun(
        tuple(out), table_path, drift, models, note, journal_path(table_path), measured.measured, measured.from_journal
    )


def write_back(run: ValidationRun, notice: Notice | None = None) -> int:
    """Add the run's model rows to its table, then remove its journal; returns the rows added
    (``notice`` hears whom it waits for when a build holds the table).

    A failure to write is a ``LutError`` saying the journal is kept: the same validation run again
    takes every measurement from it and tries the write again."""
    try:
        added = add_rows(run.table, list(run.models), run.note, notice)
    except (AmoebaError, OSError) as exc:
        reason = str(exc) if isinstance(exc, AmoebaError) else f"{type(exc).__name__}: {exc}"
        raise LutError(
            f"could not write the validation rows into {run.table} ({reason}); the measurements are "
            f"kept in {run.journal} - rerun the same command to write them"
        ) from exc
    run.journal.unlink(missing_ok=True)
    return added


def kendall_tau(predicted: list[float], measured: list[float]) -> float | None:
    if len(predicted) < 3:
        return None
    from scipy.stats import kendalltau

    return float(kendalltau(predicted, measured).statistic)
