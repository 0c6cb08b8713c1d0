"""Measure the picks end to end and hold the predictions to account.

The top-k picks are built and measured whole with the table's own backend, device and dtype (the
same interleaved-rounds protocol as a table build); their model rows are written back into the
table. Measured metrics are composed from those rows exactly as predicted ones are from component
rows (prefill at the prompt length; decode interpolated over the measured contexts and integrated
over the generation), so the two differ only by the composition error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arch import ModelArch
from .backends import get_backend
from .build import BuildPlan, Progress, run_build
from .device import device_slug
from .errors import LutError, OutOfRange
from .lut import Lut, load_table
from .measure import TimingProtocol
from .predict import Predictor
from .select import Selection
from .subnet import Subnet
from .workload import Workload


@dataclass(frozen=True)
class Validation:
    subnet: Subnet
    predicted_ms: float
    measured_ms: float
    source: str
    budget_ms: float

    @property
    def error_pct(self) -> float:
        return 100 * (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def breaks_budget(self) -> bool:
        return self.measured_ms > self.budget_ms

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.subnet.label, "subnet_id": self.subnet.id, "predicted_ms": self.predicted_ms,
                "measured_ms": self.measured_ms, "error_pct": self.error_pct, "source": self.source,
                "breaks_budget": self.breaks_budget}


def measured_metric(lut: Lut, subnet: Subnet, workload: Workload, metric: str, stat_col: str = "median_ms") -> float:
    rows = lut.ok[(lut.ok.component == "model") & (lut.ok.subnet_id == subnet.id) & (lut.ok.batch == workload.batch)]
    prefill = rows[(rows.phase == "prefill") & (rows.tokens == workload.prompt_len)]
    decode = rows[rows.phase == "decode"].sort_values("context")
    if prefill.empty:
        raise OutOfRange(f"{subnet.label}: no measured prefill at {workload.prompt_len} tokens")
    ttft = float(prefill[stat_col].iloc[0])
    if metric == "ttft_ms":
        return ttft
    contexts = workload.decode_contexts()
    xs = decode.context.to_numpy(float)
    if len(xs) == 0 or contexts.min() < xs.min() or contexts.max() > xs.max():
        raise OutOfRange(f"{subnet.label}: measured decode contexts {xs.tolist()} do not cover "
                         f"{contexts.min()}..{contexts.max()}")
    steps = np.interp(contexts, xs, decode[stat_col].to_numpy(float))
    return float(steps.mean()) if metric == "tpot_ms" else ttft + float(steps.sum())


def device_drift(lut: Lut, backend, protocol: TimingProtocol, prompt_len: int) -> dict[str, float]:
    """Re-measure the table's full-width components now (into a scratch table) and return, per
    phase, now / then. A device that got slower or faster since the table was built (other
    tenants, clocks, thermals) otherwise shows up as composition error."""
    import tempfile

    meta = lut.meta
    arch = ModelArch.from_dict(meta["arch"])
    contexts = sorted(meta["grid"]["contexts"])
    prompts = sorted(meta["grid"]["prompt_lens"])
    plan = BuildPlan(arch, widths=(1.0,), prompt_lens=(min(prompts, key=lambda p: abs(p - prompt_len)),),
                     contexts=(contexts[len(contexts) // 2],), batch=meta["grid"].get("batch", 1))
    with tempfile.TemporaryDirectory() as scratch:
        now = load_table(run_build(plan, backend, Path(scratch), protocol).path).ok
    then = lut.ok
    drift = {}
    for phase in ("prefill", "decode"):
        rows = now[now.phase == phase]
        total_now = total_then = 0.0
        for row in rows.itertuples():
            match = then[(then.component == row.component) & (then.phase == phase) & (then.tokens == row.tokens)
                         & (then.context == row.context) & (then.heads == row.heads) & (then.ffn == row.ffn)
                         & (then.batch == row.batch)]
            if not match.empty:
                total_now += row.median_ms
                total_then += float(match.median_ms.iloc[0])
        if total_then:
            drift[phase] = total_now / total_then
    return drift


def validate_selection(table_path: Path, selection: Selection, protocol: TimingProtocol = TimingProtocol(),
                       progress: Progress | None = None, threads: int | None = None
                       ) -> tuple[list[Validation], Path, dict[str, float]]:
    lut = load_table(table_path)
    meta = lut.meta
    if meta.get("source") == "roofline":
        raise LutError(f"{table_path}: a roofline table has no backend to measure with; validate a measured table")
    env = meta.get("backend_env", {})
    device = env.get("device", "cpu")
    here = device_slug(device)
    if here != meta["device_slug"]:
        raise LutError(f"{table_path}: measured on {meta['device_slug']}, this machine is {here}; validate there")
    backend = get_backend(meta["backend"], device=device, dtype=meta["dtype"], threads=threads)
    workload = selection.workload
    picks = tuple(c.subnet for c in selection.top_k)
    contexts = sorted(set(meta["grid"]["contexts"]))
    plan = BuildPlan(ModelArch.from_dict(meta["arch"]), widths=(), prompt_lens=(workload.prompt_len,),
                     contexts=tuple(contexts), batch=workload.batch, whole=picks, components=False)
    result = run_build(plan, backend, Path(table_path).parents[2], protocol, progress)
    if result.path.resolve() != Path(table_path).resolve():
        raise LutError(f"validation wrote {result.path}, not {table_path}: table and machine disagree")
    lut = load_table(result.path)
    stat_col = {"median": "median_ms", "p90": "p90_ms"}[selection.stat]
    out = []
    for cand in selection.top_k:
        measured = measured_metric(lut, cand.subnet, workload, selection.metric, stat_col)
        out.append(Validation(cand.subnet, cand.latency_ms, measured, cand.prediction.source, selection.budget_ms))
    return out, result.path, device_drift(lut, backend, protocol, workload.prompt_len)


def kendall_tau(validations: list[Validation]) -> float | None:
    if len(validations) < 3:
        return None
    from scipy.stats import kendalltau

    return float(kendalltau([v.predicted_ms for v in validations], [v.measured_ms for v in validations]).statistic)
