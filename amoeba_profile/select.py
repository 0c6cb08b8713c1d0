"""Pick the highest-quality subnet whose predicted latency fits a budget.

Uniform grids are small (AmoebaLLM's llama2-7b grid has 52 shapes), so the picker enumerates
them exactly; it never samples, so an impossible budget is a clear answer, not a hang.

Quality proxy (until a measured quality table is given): the fraction of the base model's
decoder parameters the subnet retains. It orders shapes sensibly (more layers and width score
higher) but is a proxy, and every output names it as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable

from .arch import ModelArch
from .errors import InfeasibleBudget, OutOfRange, UsageError
from .predict import Prediction, Predictor
from .subnet import Subnet
from .workload import Workload

QUALITY_PROXY = "proxy: retained decoder parameters (fraction of base)"


def layer_params(arch: ModelArch, heads: int, kv_heads: int, ffn: int) -> int:
    """Decoder-layer parameters: q/o (heads), k/v (kv_heads), gate/up/down (ffn), two RMSNorms."""
    return arch.hidden_size * arch.head_dim * 2 * (heads + kv_heads) + 3 * arch.hidden_size * ffn + 2 * arch.hidden_size


def retained_params(subnet: Subnet) -> float:
    arch = subnet.arch
    full = arch.num_layers * layer_params(arch, arch.num_heads, arch.num_kv_heads, arch.ffn_size)
    return sum(layer_params(arch, l.heads, l.kv_heads, l.ffn) for l in subnet.layers) / full


def width_text(ratio: float | None) -> str:
    if ratio is None:
        return "per-layer"
    return str(Fraction(ratio).limit_denominator(64))


def describe(subnet: Subnet) -> str:
    return f"{subnet.num_layers} layers, width {width_text(subnet.width_ratio)}"


@dataclass(frozen=True)
class Candidate:
    subnet: Subnet
    quality: float
    latency_ms: float
    prediction: Prediction

    def to_dict(self) -> dict[str, Any]:
        return {
            "subnet": self.subnet.to_dict(),
            "label": self.subnet.label,
            "quality": self.quality,
            "predicted_ms": {"value": self.latency_ms, "source": self.prediction.source, **self.prediction.to_dict()},
        }


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "subnet": self.pick.subnet.to_dict(),
            "label": self.pick.subnet.label,
            "quality": self.pick.quality,
            "quality_source": self.quality_source,
            "predicted_ms": {"value": self.pick.latency_ms, "source": self.pick.prediction.source},
            "predicted": self.pick.prediction.to_dict(),
            "metric": self.metric,
            "stat": self.stat,
            "budget_ms": self.budget_ms,
            "workload": {"batch": self.workload.batch, "prompt_len": self.workload.prompt_len, "gen_len": self.workload.gen_len},
            "top_k": [c.to_dict() for c in self.top_k],
            "pareto": [c.to_dict() for c in self.pareto],
            "considered": self.considered,
            "skipped": self.skipped,
        }


def evaluate(predictor: Predictor, subnets: Iterable[Subnet], workload: Workload, metric: str,
             stat: str = "median") -> tuple[list[Candidate], list[str]]:
    """Predict every subnet; shapes the table cannot cover are listed, not guessed."""
    candidates, skipped = [], []
    for subnet in subnets:
        try:
            prediction = predictor.predict(subnet, workload, stat)
        except OutOfRange as exc:
            skipped.append(f"{subnet.label}: {exc}")
            continue
        candidates.append(Candidate(subnet, retained_params(subnet), prediction.metric(metric), prediction))
    return candidates, skipped


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Shapes no other shape beats on both latency (lower) and quality (higher), fastest first."""
    front: list[Candidate] = []
    for cand in sorted(candidates, key=lambda c: (c.latency_ms, -c.quality)):
        if not front or cand.quality > front[-1].quality:
            front.append(cand)
    return front


def select(predictor: Predictor, subnets: Iterable[Subnet], workload: Workload, metric: str, budget_ms: float,
           stat: str = "median", top_k: int = 5) -> Selection:
    if metric == "tpot_ms" and workload.gen_len < 2:
        raise UsageError("tpot needs --gen-len >= 2 (there is no decode step otherwise)")
    if not budget_ms > 0:
        raise UsageError(f"budget must be a positive number of ms, got {budget_ms}")
    candidates, skipped = evaluate(predictor, subnets, workload, metric, stat)
    if not candidates:
        first = skipped[0] if skipped else "the design space is empty"
        raise OutOfRange(f"the table covers no shape of the design space for this workload ({first})")
    feasible = [c for c in candidates if c.latency_ms <= budget_ms]
    if not feasible:
        fastest = min(candidates, key=lambda c: c.latency_ms)
        raise InfeasibleBudget(
            f"no shape fits {budget_ms:g} ms {metric} ({stat}); fastest is {fastest.latency_ms:.1f} ms: "
            f"{describe(fastest.subnet)}"
        )
    ranked = sorted(feasible, key=lambda c: (-c.quality, c.latency_ms))
    return Selection(ranked[0], ranked[:top_k], pareto_front(candidates), metric, stat, budget_ms, workload,
                     QUALITY_PROXY, len(candidates), skipped)
