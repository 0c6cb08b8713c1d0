"""Pick the highest-quality subnet whose predicted latency (and memory) fits the budget.

Uniform grids are small (AmoebaLLM's llama2-7b grid has 52 shapes), so the picker enumerates
them exactly; it never samples, so an impossible budget is a clear answer, not a hang.
Quality comes from a measured table (``quality.load_quality``) or the documented proxy
(retained decoder parameters), and every output names which. A pick is only as good as the rows it
rests on: the flagged ones behind the pick and the runner-up are listed, with a warning when their
flags say the measurement itself was disturbed (noise, contention, throttling, drift).

A pick is also only as sure as its prediction: every candidate carries its standard error
(``predict``), the probability that it fits the budget, and a 90 % interval. With ``confidence``
q a shape fits only when its q-quantile does. Shapes that rank above the pick and may fit too
(probability of fitting at least ``TIE_FLOOR``) are reported as tied with it: the table cannot tell
which of them is the answer, and ``select --verify`` measures them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

from amoeba_profile.core.errors import InfeasibleBudget, OutOfRange, UsageError
from amoeba_profile.core.inputs import positive_float
from amoeba_profile.core.quality import ProxyQuality
from amoeba_profile.core.strategy import Strategy
from amoeba_profile.core.subnet import AMOEBA_WIDTHS, DesignSpace, Subnet
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.core.workload import Workload, metric_name
from amoeba_profile.selection.memory import MemoryEstimate, estimate
from amoeba_profile.selection.predict import Prediction, Predictor
from amoeba_profile.table.lut import Lut, entry_key_of_row, short_of


def width_text(ratio: float | None) -> str:
    if ratio is None:
        return "per-layer"
    return str(Fraction(ratio).limit_denominator(64))


def describe(subnet: Subnet) -> str:
    kind = "" if subnet.is_uniform or subnet.width_ratio is None else " (per-layer widths)"
    return f"{subnet.num_layers} layers, width {width_text(subnet.width_ratio)}{kind}"


INTERVAL_LEVEL = 0.9  # the interval every candidate is shown with
TIE_FLOOR = 0.05  # a shape above the pick with at least this probability of fitting is tied with it

# A flag that describes the flow, not a disturbed measurement: listed, never warned about.
INFORMATIVE_FLAGS = frozenset({"host_bound"})


# The phases a metric reads: ttft prefill rows only, tpot decode rows only, e2e both.
METRIC_PHASES = {"ttft_ms": ("prefill",), "tpot_ms": ("decode",), "e2e_ms": ("prefill", "decode")}


def flagged_rows(lut: Lut, prediction: Prediction, metric: str = "e2e_ms") -> list[dict[str, Any]]:
    """The rows ``prediction``'s ``metric`` rests on that carry flags: entry key, flags, CV and host
    contention (a tpot answer does not rest on prefill rows)."""
    rows = lut.frame.loc[list(prediction.rows)]
    rows = rows[rows["phase"].isin(METRIC_PHASES[metric_name(metric)])]
    out = []
    for label, row in rows[rows["flags"] != ""].iterrows():
        contention = row.get("host_contention")
        out.append(
            {
                "row": entry_key_of_row(row),
                "line": int(label) + 2,
                "flags": row["flags"].split(";"),
                "cv": None if row["cv"] != row["cv"] else round(float(row["cv"]), 4),
                "host_contention": None if contention is None or contention != contention else float(contention),
            }
        )
    return out


def flag_warning(flagged: dict[str, list[dict[str, Any]]], coarse: bool = False) -> str | None:
    """One line when the rows behind the pick or runner-up were disturbed, with what to do; None if not.

    ``coarse``: the table holds rows measured with fewer rounds or samples than a default build
    takes (``lut.short_of``, a ``--quick`` build); only then is a build without --quick a remedy."""
    parts, seen = [], set()
    for who, rows in flagged.items():
        counts = Counter(f for row in rows for f in row["flags"] if f not in INFORMATIVE_FLAGS)
        if counts:
            disturbed = sum(1 for row in rows if set(row["flags"]) - INFORMATIVE_FLAGS)
            listed = ", ".join(f"{flag} {n}" for flag, n in sorted(counts.items()))
            parts.append(f"the {who.replace('_', '-')} rests on {disturbed} disturbed rows ({listed})")
            seen |= set(counts)
    if not parts:
        return None
    # The remedy follows the cause: other processes (contended, recompiled under load) want an idle
    # machine; rows that are only noisy (high_cv, e.g. inherited by a fit from its noisy models on a
    # host-bound GPU) want more samples - which a default build over a --quick table takes, while a
    # table measured in full already had its noisy rows re-measured once; a hot device wants
    # cooling and locked clocks.
    if seen <= {"high_cv"} and coarse:
        advice = (
            "build the table again without --quick (it re-measures the rows holding fewer rounds) or on a "
            "quieter machine"
        )
    elif seen <= {"high_cv"}:
        advice = "rebuild the table on a quieter machine"
    else:
        advice = "rebuild the table on an idle machine (build-lut --busy wait)"
    if "throttled" in seen:
        advice += " with the device cool and its clocks locked"
    return f"{'; '.join(parts)}; its latencies may be off - {advice} before relying on it"


@dataclass(frozen=True)
class Candidate:
    subnet: Subnet
    quality: float
    latency_ms: float
    prediction: Prediction
    source: str  # where latency_ms (the selected metric) comes from: Prediction.source_of
    memory: MemoryEstimate | None = None
    metric: str = "tpot_ms"
    p_fit: float = field(default=math.nan, compare=False)  # probability of fitting the budget (``select`` fills it)

    @property
    def se_ms(self) -> float:
        return self.prediction.se_of(self.metric)

    def interval(self, level: float = INTERVAL_LEVEL) -> tuple[float, float]:
        return self.prediction.interval(self.metric, level)

    @property
    def memory_needed(self) -> MemoryEstimate:
        """``memory`` where a memory budget is checked: ``evaluate`` estimates it given the table's dtype."""
        if self.memory is None:
            raise UsageError("a memory budget needs the table's dtype")
        return self.memory

    def to_dict(self) -> dict[str, Any]:
        """One ranked shape; the subnet by id (``Selection.to_dict`` maps ids to shapes once)."""
        low, high = self.interval()
        finite = all(math.isfinite(v) for v in (low, high, self.se_ms))
        out = {
            "subnet_id": self.subnet.id,
            "label": self.subnet.label,
            "quality": self.quality,
            "predicted_ms": {
                "value": self.latency_ms,
                "source": self.source,
                "se": self.se_ms if finite else None,
                "interval_90": [low, high] if finite else None,
                "p_within_budget": self.p_fit if math.isfinite(self.p_fit) else None,
            },
        }
        if self.memory is not None:
            out["memory_gb"] = round(self.memory.total_gb, 3)
        return out


@dataclass(frozen=True)
class Selection:
    pick: Candidate
    top_k: list[Candidate]
    pareto: list[Candidate]
    metric: str
    stat: str
    budget_ms: float
    workload: Workload
    quality_source: str
    considered: int
    skipped: list[str]
    memory_gb: float | None = None
    # Flagged rows behind the pick and the runner-up (``flagged_rows``), and the warning they call for.
    flagged: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    warning: str | None = None
    confidence: float | None = None  # a shape fits when this quantile of its metric does (None: the value)
    tied: list[Candidate] = field(default_factory=list)  # shapes above the pick that may fit too
    quality_warning: str | None = None  # the quality CSV names another model (``TableQuality.check_model``)

    def to_dict(self, pareto: bool = True) -> dict[str, Any]:
        """The pick in full; top-k and (with ``pareto``) the Pareto front refer to shapes by
        ``subnet_id``, each listed once in ``subnets`` (every entry repeating its model made the
        JSON ~20x larger)."""
        listed = self.top_k + self.tied + (self.pareto if pareto else [])
        return {
            **self.pick.to_dict(),
            "subnet": self.pick.subnet.to_dict(),
            "predicted": self.pick.prediction.to_dict(),
            "quality_source": self.quality_source,
            "metric": self.metric,
            "stat": self.stat,
            "budget_ms": self.budget_ms,
            "memory_budget_gb": self.memory_gb,
            "workload": {
                "batch": self.workload.batch,
                "prompt_len": self.workload.prompt_len,
                "gen_len": self.workload.gen_len,
            },
            "confidence": self.confidence,
            "model_error_known": self.pick.prediction.model_error_known,
            "tied": [c.to_dict() for c in self.tied],
            "top_k": [c.to_dict() for c in self.top_k],
            **(
                {"pareto": [{**c.to_dict(), "fits": c.latency_ms <= self.budget_ms} for c in self.pareto]}
                if pareto
                else {}
            ),
            "subnets": {c.subnet.id: c.subnet.to_compact_dict() for c in listed},
            "considered": self.considered,
            "skipped": self.skipped,
            "flagged_rows": self.flagged,
            "measurement_warning": self.warning,
            "quality_warning": self.quality_warning,
        }


def table_space(lut: Lut, widths: Sequence[float] | None = None, strategy: Path | str | None = None) -> list[Subnet]:
    """The shapes to choose from for a table: an AmoebaLLM strategy file's exact shapes (at ``widths``,
    default every ratio it holds), or the uniform AmoebaLLM grid at ``widths`` (default the table's
    own), with the table's drop rule and FFN rounding."""
    arch = lut.arch
    if strategy is not None:
        return Strategy.load(strategy, arch).subnets(ratios=widths)
    grid = lut.grid
    space = DesignSpace.amoeba(
        arch, tuple(widths or grid.widths or AMOEBA_WIDTHS), drop_rule=grid.drop_rule, ffn_multiple=grid.ffn_multiple
    )
    return list(space.subnets())


DEFAULT_PROMPT_LEN = 128
DEFAULT_GEN_LEN = 128


def table_workload(
    lut: Lut, prompt_len: int | None = None, gen_len: int | None = None, batch: int | None = None
) -> Workload:
    """A request for this table; what is not given defaults to what the table covers.

    ``batch``: the batch the table was measured at. ``prompt_len``: 128 where the table's prompt
    lengths and decode contexts cover it, else its shortest prompt length its contexts cover.
    ``gen_len``: 128, or fewer when the decode steps would run past the longest context (at least 2,
    so tpot has a step). A given value is kept, and refused later if the table cannot cover it."""
    prompts, contexts = sorted(lut.grid.prompt_lens), sorted(lut.grid.contexts)
    if prompt_len is None:
        prompt_len = DEFAULT_PROMPT_LEN
        if prompts and contexts:
            low, high = max(prompts[0], contexts[0]), min(prompts[-1], contexts[-1])
            if not low <= prompt_len <= high:
                usable = [p for p in prompts if contexts[0] <= p <= contexts[-1]]
                prompt_len = usable[0] if usable else prompts[0]
    if gen_len is None:
        gen_len = DEFAULT_GEN_LEN
        if contexts and prompt_len + gen_len - 2 > contexts[-1]:
            gen_len = max(2, contexts[-1] - prompt_len + 2)
    return Workload(batch if batch is not None else lut.grid.batch, prompt_len, gen_len)


def rank(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Best first: highest quality, the lower latency between equals."""
    return sorted(candidates, key=lambda c: (-c.quality, c.latency_ms))


def best_within(candidates: Iterable[Candidate], budget_ms: float) -> Candidate | None:
    """The pick for ``budget_ms`` among already evaluated shapes (``rank``'s first within budget),
    or None when none fits; ``select`` adds the checks and the memory budget."""
    budget_ms = check_budget(budget_ms)
    fitting = rank(c for c in candidates if c.latency_ms <= budget_ms)
    return fitting[0] if fitting else None


def evaluate(
    predictor: Predictor,
    subnets: Iterable[Subnet],
    workload: Workload,
    metric: str,
    stat: str = "median",
    quality=None,
    dtype: str | None = None,
) -> tuple[list[Candidate], list[str]]:
    """Predict every subnet; shapes the table cannot cover are listed, not guessed."""
    metric = metric_name(metric)
    quality = quality or ProxyQuality()
    candidates, skipped = [], []
    for subnet in subnets:
        try:
            prediction = predictor.predict(subnet, workload, stat)
        except OutOfRange as exc:
            skipped.append(f"{subnet.label}: {exc}")
            continue
        memory = estimate(subnet, workload, dtype) if dtype else None
        candidates.append(
            Candidate(
                subnet,
                quality.score(subnet),
                prediction.metric(metric),
                prediction,
                prediction.source_of(metric),
                memory,
                metric,
            )
        )
    return candidates, skipped


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Shapes no other shape beats on both latency (lower) and quality (higher), fastest first."""
    front: list[Candidate] = []
    for cand in sorted(candidates, key=lambda c: (c.latency_ms, -c.quality)):
        if not front or cand.quality > front[-1].quality:
            front.append(cand)
    return front


def check_budget(budget_ms: float) -> float:
    """A latency budget: a finite number of milliseconds above 0 (inf or NaN would admit everything or nothing)."""
    return positive_float(budget_ms, "--budget-ms")


def fit_bound(candidate: Candidate, confidence: float | None) -> float:
    """What must be within the budget: the predicted value, or its ``confidence``-quantile."""
    if confidence is None:
        return candidate.latency_ms
    bound = candidate.prediction.quantile(candidate.metric, confidence)
    if math.isnan(bound):
        raise UsageError("--confidence needs a table whose rows carry their spread; this one (computed) has none")
    return bound


def check_confidence(confidence: float | None) -> float | None:
    if confidence is not None and not 0.5 <= confidence < 1:
        raise UsageError(f"--confidence {confidence:g}: give a probability in [0.5, 1), e.g. 0.95")
    return confidence


def select(
    predictor: Predictor,
    subnets: Iterable[Subnet],
    workload: Workload,
    metric: str,
    budget_ms: float,
    stat: str = "median",
    top_k: int = 5,
    quality=None,
    memory_gb: float | None = None,
    dtype: str | None = None,
    confidence: float | None = None,
) -> Selection:
    """``metric`` is ttft, tpot or e2e (with or without ``_ms``); ``memory_gb`` (with ``dtype``)
    also bounds weights + KV cache + activation headroom; with ``confidence`` q a shape fits when
    the q-quantile of its predicted metric is within the budget."""
    metric = metric_name(metric)
    confidence = check_confidence(confidence)
    if metric == "tpot_ms" and workload.gen_len < 2:
        raise UsageError("tpot needs --gen-len >= 2 (there is no decode step otherwise)")
    budget_ms = check_budget(budget_ms)
    if memory_gb is not None:
        memory_gb = positive_float(memory_gb, "--memory-gb")
        if dtype is None:
            raise UsageError("a memory budget needs the table's dtype")
    subnets = list(subnets)
    quality = quality or ProxyQuality()
    quality_warning = quality.check_model(subnets[0].arch) if subnets else None
    quality.check_covers(subnets)
    candidates, skipped = evaluate(predictor, subnets, workload, metric, stat, quality, dtype)
    if not candidates:
        first = skipped[0] if skipped else "the design space is empty"
        raise OutOfRange(f"the table covers no shape of the design space for this workload ({first})")
    fitting = candidates
    if memory_gb is not None:
        fitting = [c for c in candidates if c.memory_needed.total_gb <= memory_gb]
        if not fitting:
            smallest = min(candidates, key=lambda c: c.memory_needed.total_bytes)
            raise InfeasibleBudget(
                f"no shape fits {memory_gb:g} GB; smallest needs {smallest.memory_needed.total_gb:.2f} GB: "
                f"{describe(smallest.subnet)}"
            )
    fitting = [replace(c, p_fit=c.prediction.p_within(metric, budget_ms)) for c in fitting]
    feasible = [c for c in fitting if fit_bound(c, confidence) <= budget_ms]
    if not feasible:
        fastest = min(fitting, key=lambda c: fit_bound(c, confidence))
        within = f" within {memory_gb:g} GB" if memory_gb is not None else ""
        sure = f" at {confidence:g} confidence" if confidence is not None else ""
        raise InfeasibleBudget(
            f"no shape fits {budget_ms:g} ms {metric} ({stat}){sure}{within}; fastest is "
            f"{fit_bound(fastest, confidence):.1f} ms: {describe(fastest.subnet)}"
        )
    ranked = rank(feasible)
    pick = ranked[0]
    ahead = rank(fitting)
    tied = [c for c in ahead[: ahead.index(pick)] if c.p_fit >= TIE_FLOOR]
    flagged = {
        who: flagged_rows(predictor.lut, cand.prediction, metric) for who, cand in zip(("pick", "runner_up"), ranked)
    }
    return Selection(
        pick,
        ranked[:top_k],
        pareto_front(fitting),
        metric,
        stat,
        budget_ms,
        workload,
        quality.name,
        len(candidates),
        skipped,
        memory_gb,
        flagged,
        flag_warning(flagged, bool(short_of(predictor.lut.frame, TimingProtocol()).any())),
        confidence,
        tied,
        quality_warning,
    )
