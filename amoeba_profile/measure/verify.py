"""Measure the final answer: the best candidates of a selection, whole, through the flow's own loop.

A table predicts; near a budget the shapes are closer together than the table's error, so the
answer a user can rely on is measured. ``verify_candidates`` takes the pick and the K - 1 other
shapes most worth measuring (the tied shapes above it most likely to fit, then the runners-up), measures each
whole through the serving loop of the table's backend in interleaved rounds, and returns the
highest-quality one whose measured metric fits the budget. Nothing is written into the table unless
asked (``write_verified``): the measurements go through a journal beside the table
(``<table>.verify.journal.jsonl``), so a killed run resumes like a build, and the journal is removed
once the answer is given (or, when asked, once the rows are in the table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amoeba_profile.core.errors import AmoebaError, LutError, UsageError
from amoeba_profile.core.files import Notice
from amoeba_profile.core.schema import Row
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.device.quiet import BusyPolicy
from amoeba_profile.measure.build import Progress, add_rows, measure_plan
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.measure.validate import measured_metric, table_backend
from amoeba_profile.selection.picker import Candidate, Selection, rank
from amoeba_profile.table.lut import frame_rows, load_table


@dataclass(frozen=True)
class Verified:
    """One candidate: its prediction (value and standard error) beside its measurement."""

    candidate: Candidate
    measured_ms: float
    budget_ms: float

    @property
    def fits(self) -> bool:
        return self.measured_ms <= self.budget_ms

    @property
    def error_pct(self) -> float:
        return 100 * (self.candidate.latency_ms - self.measured_ms) / self.measured_ms

    def to_dict(self) -> dict[str, Any]:
        se = self.candidate.se_ms
        return {
            "subnet_id": self.candidate.subnet.id,
            "label": self.candidate.subnet.label,
            "quality": self.candidate.quality,
            "predicted_ms": self.candidate.latency_ms,
            "predicted_se_ms": se if math.isfinite(se) else None,
            "measured_ms": self.measured_ms,
            "error_pct": self.error_pct,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Verification:
    """The measured candidates (rank order), the best that fits (None: none did), and the journal
    holding the measurements until the answer is given."""

    results: tuple[Verified, ...]
    pick: Verified | None
    table: Path
    journal: Path
    models: tuple[Row, ...]
    measured: int
    from_journal: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": [r.to_dict() for r in self.results],
            "pick": self.pick.candidate.subnet.id if self.pick else None,
            "measured_entries": self.measured,
            "from_journal": self.from_journal,
        }


def verify_journal_path(table_path: Path) -> Path:
    return table_path.with_name(table_path.name + ".verify.journal.jsonl")


def candidates_to_verify(selection: Selection, k: int) -> list[Candidate]:
    """The pick and the ``k`` - 1 other shapes most worth measuring, best-ranked first: the tied
    shapes (above the pick, may fit) most likely to fit, then the runners-up. The pick is always
    among them, so a run that finds no tied shape fitting still answers."""
    if k < 1:
        raise UsageError(f"--verify {k}: measure at least one candidate")
    tied = sorted(selection.tied, key=lambda c: -c.p_fit)
    others = [c for c in [*tied, *selection.top_k] if c.subnet.id != selection.pick.subnet.id]
    unique = {c.subnet.id: c for c in others}
    return rank([selection.pick, *list(unique.values())[: k - 1]])


def verify_candidates(
    table_path: Path,
    selection: Selection,
    k: int,
    protocol: TimingProtocol = TimingProtocol(),
    progress: Progress | None = None,
    on_corrupt_journal: str = "stop",
    notice: Notice | None = None,
    busy: BusyPolicy | None = None,
) -> Verification:
    """Measure the ``k`` candidates whole, interleaved, through the verify journal; the table is not
    written. Under the device's measurement lock and the ``busy`` policy, as a build."""
    table_path = Path(table_path)
    lut = load_table(table_path)
    backend = table_backend(table_path, lut)
    chosen = candidates_to_verify(selection, k)
    workload, grid = selection.workload, lut.grid
    plan = BuildPlan(
        lut.arch,
        widths=(),
        prompt_lens=(workload.prompt_len,),
        contexts=tuple(sorted(set(grid.contexts))),
        batch=workload.batch,
        whole=tuple(c.subnet for c in chosen),
        method=lut.meta.method or "components",
        decode_steps=grid.decode_steps or 8,
        measure_grid=False,
    )
    journal = verify_journal_path(table_path)
    measured = measure_plan(
        plan,
        backend,
        journal,
        protocol,
        progress,
        method_reason="select --verify",
        on_corrupt_journal=on_corrupt_journal,
        busy=busy,
        notice=notice,
    )
    results = tuple(
        Verified(
            c, measured_metric(measured.lut, c.subnet, workload, selection.metric, selection.stat), selection.budget_ms
        )
        for c in chosen
    )
    fitting = [r for r in results if r.fits]
    best = fitting[0] if fitting else None  # results are in rank order: the first that fits is the best
    models = tuple(frame_rows(measured.lut.frame[measured.lut.frame.component == "model"]))
    return Verification(results, best, table_path, journal, models, measured.measured, measured.from_journal)


def finish(verification: Verification, write_back: bool, notice: Notice | None = None) -> int:
    """Give the answer: with ``write_back`` add the measured model rows to the table first (rows of
    shapes already in it are skipped; returns how many were added), then remove the journal. A
    failed write keeps the journal, so the same command writes the rows later."""
    added = 0
    if write_back:
        note = {"verify": {"candidates": [r.candidate.subnet.id for r in verification.results]}}
        try:
            added = add_rows(verification.table, list(verification.models), note, notice)
        except (AmoebaError, OSError) as exc:
            raise LutError(
                f"could not write the verified rows into {verification.table} ({exc}); the measurements "
                f"are kept in {verification.journal} - rerun the same command to write them"
            ) from exc
    verification.journal.unlink(missing_ok=True)
    return added
