"""Per-layer exact optimization: one (heads, FFN) option per kept layer, best quality in budget.

For a fixed set of kept layers the problem is a multiple-choice knapsack: maximize the sum of
per-layer quality over one option per layer subject to sum of per-layer latency <= budget - base
(and memory <= budget - fixed memory). Latency composes additively per layer (see predict), so
this is exact; it is solved as a small integer program with scipy's MILP (HiGHS), see solve_counts. Every depth of the
design space is solved and the best answer kept.

The answer respects the table's flow (its sidecar's ``backend``): a flow that takes one query-head
count per model (TensorRT-LLM) or only uniform shapes (MLC-LLM) says so in its declared
``Capabilities`` (``flows.flow_capabilities``), and every kept layer then shares that part of its
shape (see shared_part).

Quality model (additive): option o in layer i scores w_i x params(o) / params(full layer), divided
by the sum of w over all base layers. With w = 1 (the default, a proxy) this equals the retained-
parameter proxy of uniform shapes; a per-layer importance file gives w (e.g. from AmoebaLLM's
layer-importance scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from amoeba_profile.backends import Capabilities
from amoeba_profile.backends.flows import flow_capabilities
from amoeba_profile.core.arch import ModelArch, layer_params
from amoeba_profile.core.errors import InfeasibleBudget, OutOfRange, UsageError
from amoeba_profile.core.inputs import finite_float, positive_float
from amoeba_profile.core.quality import csv_integer, read_small_csv
from amoeba_profile.core.subnet import LayerShape, Subnet, default_depths, kept_layers, width_shape
from amoeba_profile.core.workload import Workload, metric_name
from amoeba_profile.selection.memory import fixed_bytes, layer_bytes
from amoeba_profile.selection.picker import Selection, check_budget
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import Lut


@dataclass(frozen=True)
class PerLayerResult:
    subnet: Subnet
    quality: float
    latency_ms: float
    solver: str
    shape_rule: str
    source: str  # of latency_ms: Prediction.source_of(metric) for the subnet


def load_importance(path: Path | str, arch: ModelArch) -> np.ndarray:
    """CSV with columns layer, importance (finite, non-negative, not all 0); every base layer exactly once."""
    path = Path(path)
    frame = read_small_csv(path, "importance CSV")
    if not {"layer", "importance"} <= set(frame.columns):
        raise UsageError(f"{path}: needs columns 'layer' and 'importance'")
    weights = np.full(arch.num_layers, np.nan)
    for i, row in frame.iterrows():
        where = f"{path}: line {i + 2}:"
        layer = csv_integer(row["layer"], f"{where} layer", minimum=0)
        if layer >= arch.num_layers:
            raise UsageError(f"{where} layer {layer} outside 0..{arch.num_layers - 1}")
        if not np.isnan(weights[layer]):
            raise UsageError(f"{where} layer {layer} appears twice")
        weights[layer] = finite_float(
            pd.to_numeric(row["importance"], errors="coerce"), f"{where} importance", minimum=0
        )
    if np.isnan(weights).any():
        raise UsageError(f"{path}: missing layers {np.flatnonzero(np.isnan(weights)).tolist()}")
    if not weights.sum() > 0:
        raise UsageError(f"{path}: every importance is 0; at least one layer must carry weight")
    return weights


def table_options(predictor: Predictor) -> list[tuple[int, int, int]]:
    """Every measured (heads, kv_heads) x every measured ffn of the table: the per-layer menu.
    In a ``difference`` table the heads come from the heads axis and the FFN sizes from the FFN axis."""
    ok = predictor.lut.ok
    heads_rows = ok[ok.component == ("layer" if predictor.fitted_layers else "attn")]
    ffn_rows = ok[ok.component == ("layer" if predictor.fitted_layers else "mlp")]
    attn = sorted({(int(r.heads), int(r.kv_heads)) for r in heads_rows.itertuples()})
    ffns = sorted({int(f) for f in ffn_rows.ffn})
    return [(h, kv, f) for h, kv in attn for f in ffns]


def width_options(arch: ModelArch, widths: Sequence[float], ffn_multiple: int = 1) -> list[tuple[int, int, int]]:
    """The per-layer menu a --widths list allows: the (heads, kv_heads) of each width x the FFN of
    each width (a layer may narrow attention and FFN to different ratios of the list, never to a
    ratio outside it); the predictor interpolates the ones the table did not measure."""
    shapes = [width_shape(arch, w, ffn_multiple) for w in widths]
    return sorted({(h, kv, f) for h, kv, _ in shapes for _, _, f in shapes})


def additive_quality(arch: ModelArch, subnet: Subnet, importance: np.ndarray | None = None) -> float:
    """``subnet``'s score under the per-layer quality model (see the module docstring): with equal
    importance it equals the retained-parameter proxy. The per-layer optimum and the uniform pick
    are compared on this one scale."""
    weights = np.ones(arch.num_layers) if importance is None else np.asarray(importance, float)
    full = layer_params(arch, arch.num_heads, arch.num_kv_heads, arch.ffn_size)
    kept = sum(weights[l.index] * layer_params(arch, l.heads, l.kv_heads, l.ffn) / full for l in subnet.layers)
    return float(kept / weights.sum())


def shared_part(capabilities: Capabilities, option: tuple[int, int, int]) -> tuple[int, ...]:
    """The part of a (heads, kv_heads, ffn) option that every kept layer must share in this flow:
    () where the flow takes per-layer heads and FFN, (heads, kv_heads) where it takes one
    query-head count per model, the whole option where it takes only uniform shapes."""
    heads, kv, ffn = option
    return (() if capabilities.per_layer_heads else (heads, kv)) + (() if capabilities.per_layer_ffn else (ffn,))


def shape_rule(capabilities: Capabilities) -> str:
    if capabilities.per_layer_heads and capabilities.per_layer_ffn:
        return "heads and FFN per layer"
    if capabilities.per_layer_ffn:
        return "one head count for all layers, FFN per layer"
    if capabilities.per_layer_heads:
        return "one FFN width for all layers, heads per layer"
    return "one shape for all layers"


def solve_counts(
    frac: np.ndarray,
    costs: list[np.ndarray],
    limits: list[float],
    weights: np.ndarray,
    shared: Sequence[tuple] | None = None,
) -> np.ndarray | None:
    """Exact: how many layers take each option, when every layer has the same per-option costs.

    ``frac`` is each option's quality share, ``weights`` the kept layers' importance. Swapping two
    layers' options keeps every cost, so an optimum pairs the highest-quality options with the
    heaviest layers; with options sorted by ``frac`` (descending) and S_o = n_1 + ... + n_o, the
    value is sum_o (frac_o - frac_{o+1}) W(S_o), where W(s) is the sum of the s largest weights -
    concave and piecewise linear, so each W is an epigraph of L linear cuts. The program has one
    integer per option (not per layer and option), which HiGHS solves exactly in milliseconds;
    the per-layer formulation drowns in the symmetry of identical layers.

    ``shared`` gives each option the part of its shape all layers must share (``shared_part``):
    one binary per distinct value, exactly one of them chosen, and n_o <= L x (its value chosen).
    Returns counts per option (in the given order), or None when infeasible.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    order = np.argsort(-frac, kind="stable")
    f = frac[order]
    k, L = len(f), len(weights)
    w = np.sort(np.asarray(weights, float))[::-1]
    W = np.concatenate([[0.0], np.cumsum(w)])
    gaps = f - np.append(f[1:], 0.0)
    shared = [] if shared is None else list(shared)
    values = sorted(set(shared))
    g = len(values) if len(values) > 1 else 0  # one value for every option constrains nothing
    # variables: n_1..n_k (integers), t_1..t_k (t_o <= W(S_o)), y_1..y_g (binary: the shared value chosen)
    cumulative = np.tril(np.ones((k, k)))
    rows: list[np.ndarray] = []
    lower: list[float] = []
    upper: list[float] = []
    rows.append(np.concatenate([np.ones(k), np.zeros(k + g)]))
    lower.append(L)
    upper.append(L)
    for cost, limit in zip(costs, limits):
        rows.append(np.concatenate([cost[order], np.zeros(k + g)]))
        lower.append(-np.inf)
        upper.append(limit)
    for o in range(k):
        for j in range(L):
            # t_o - w_(j+1) * S_o <= W(j) - w_(j+1) * j
            row = np.concatenate([-w[j] * cumulative[o], np.zeros(k + g)])
            row[k + o] = 1.0
            rows.append(row)
            lower.append(-np.inf)
            upper.append(W[j] - w[j] * j)
    if g:
        rows.append(np.concatenate([np.zeros(2 * k), np.ones(g)]))
        lower.append(1)
        upper.append(1)
        for position, o in enumerate(order):
            row = np.zeros(2 * k + g)
            row[position] = 1.0
            row[2 * k + values.index(shared[o])] = -L
            rows.append(row)
            lower.append(-np.inf)
            upper.append(0.0)
    objective = np.concatenate([np.zeros(k), -gaps, np.zeros(g)])
    result = milp(
        objective,
        constraints=LinearConstraint(np.array(rows), lower, upper),
        integrality=np.concatenate([np.ones(k), np.zeros(k), np.ones(g)]),
        bounds=Bounds(
            np.concatenate([np.zeros(k), np.full(k, -np.inf), np.zeros(g)]),
            np.concatenate([np.full(k, L), np.full(k, np.inf), np.ones(g)]),
        ),
    )
    if result.status != 0 or result.x is None:
        return None
    counts = np.zeros(k, dtype=int)
    counts[order] = np.round(result.x[:k]).astype(int)
    return counts


def _undominated(
    frac: np.ndarray, latency: np.ndarray, memory: np.ndarray | None, shared: Sequence[tuple]
) -> list[int]:
    """Options no other option with the same shared part beats on quality, latency and memory at
    once (ties keep the first). Across shared parts nothing is pruned: under a shared-shape rule an
    option of another part is not a substitute."""
    keep = []
    for i in range(len(frac)):
        dominated = any(
            shared[j] == shared[i]
            and frac[j] >= frac[i]
            and latency[j] <= latency[i]
            and (memory is None or memory[j] <= memory[i])
            and (
                frac[j] > frac[i] or latency[j] < latency[i] or (memory is not None and memory[j] < memory[i]) or j < i
            )
            for j in range(len(frac))
            if j != i
        )
        if not dominated:
            keep.append(i)
    return keep


def optimize_per_layer(
    predictor: Predictor,
    arch: ModelArch,
    depths: Sequence[int],
    workload: Workload,
    metric: str,
    budget_ms: float,
    stat: str = "median",
    options: Sequence[tuple[int, int, int]] | None = None,
    importance: np.ndarray | None = None,
    drop_rule: str = "keep-ends",
    memory_gb: float | None = None,
    dtype: str | None = None,
    capabilities: Capabilities | None = None,
) -> PerLayerResult:
    """The best per-layer shape within budget that the flow can run: ``capabilities`` defaults to
    the declaration of the flow named in the table's sidecar."""
    metric = metric_name(metric)
    budget_ms = check_budget(budget_ms)
    if memory_gb is not None:
        memory_gb = positive_float(memory_gb, "--memory-gb")
    if capabilities is None:
        flow = predictor.lut.meta.backend
        if flow is None:
            raise UsageError("the table's sidecar names no backend, so the flow's shape rules are unknown")
        capabilities = flow_capabilities(flow)
    options = list(options or table_options(predictor))
    weights = np.ones(arch.num_layers) if importance is None else np.asarray(importance, float)
    full = layer_params(arch, arch.num_heads, arch.num_kv_heads, arch.ffn_size)
    frac = np.array([layer_params(arch, h, kv, f) / full for h, kv, f in options])
    try:
        layer_ms = np.array([predictor.layer_metric(h, kv, f, workload, metric, stat) for h, kv, f in options])
    except OutOfRange as exc:
        raise OutOfRange(f"per-layer options outside the table: {exc}") from None
    base_ms = predictor.base_metric(workload, metric, stat)
    option_bytes, memory_limit = None, 0.0
    if memory_gb is not None:
        if dtype is None:
            raise UsageError("a memory budget needs the table's dtype")
        option_bytes = np.array([layer_bytes(arch, h, kv, f, workload, dtype) for h, kv, f in options], float)
        weights_fixed, activations = fixed_bytes(arch, workload, dtype, arch.ffn_size)  # conservative headroom
        memory_limit = memory_gb * 1e9 - weights_fixed - activations
    best: tuple[float, float, Subnet] | None = None  # (quality, latency, subnet)
    shared = [shared_part(capabilities, o) for o in options]
    keep = _undominated(frac, layer_ms, option_bytes, shared)
    options, frac, layer_ms, shared = [options[i] for i in keep], frac[keep], layer_ms[keep], [shared[i] for i in keep]
    if option_bytes is not None:
        option_bytes = option_bytes[keep]
    for depth in depths:
        kept = sorted(kept_layers(arch, depth, drop_rule), key=lambda i: -weights[i])  # heaviest first
        costs, limits = [layer_ms], [budget_ms - base_ms]
        if option_bytes is not None:
            costs.append(option_bytes)
            limits.append(memory_limit)
        if any(limit < 0 for limit in limits):
            continue
        counts = solve_counts(frac, costs, limits, weights[kept], shared)
        if counts is None:
            continue
        # Best options to the heaviest layers.
        choice = np.repeat(np.argsort(-frac, kind="stable"), counts[np.argsort(-frac, kind="stable")])
        layers = tuple(sorted((LayerShape(i, *options[o]) for i, o in zip(kept, choice)), key=lambda l: l.index))
        quality = float((weights[kept] * frac[choice]).sum() / weights.sum())
        latency = float(base_ms + layer_ms[choice].sum())
        if best is None or (quality, -latency) > (best[0], -best[1]):
            best = (quality, latency, Subnet(arch, layers))
    if best is None:
        raise InfeasibleBudget(
            f"no per-layer shape ({shape_rule(capabilities)}) fits {budget_ms:g} ms {metric} "
            f"({stat}) at depths {min(depths)}..{max(depths)}"
        )
    quality, latency, subnet = best
    source = predictor.predict(subnet, workload, stat).source_of(metric)
    return PerLayerResult(subnet, quality, latency, "scipy.milp (HiGHS)", shape_rule(capabilities), source)


@dataclass(frozen=True)
class PerLayerPick:
    """The per-layer optimum for a uniform ``Selection``'s workload, metric, budget and statistic.

    ``uniform_quality`` is the uniform pick scored by the per-layer quality model (``quality_model``:
    the proxy, or the importance file's weights), whatever the selection ranked by (a --quality
    table scores uniform shapes only), so that ``gain_over_uniform`` compares like with like."""

    result: PerLayerResult
    quality_model: str
    uniform_quality: float

    @property
    def gain_over_uniform(self) -> float:
        return self.result.quality - self.uniform_quality

    def to_dict(self) -> dict[str, Any]:
        result = self.result
        return {
            "subnet": result.subnet.to_dict(),
            "num_layers": result.subnet.num_layers,
            "quality": result.quality,
            "quality_model": self.quality_model,
            "predicted_ms": {"value": result.latency_ms, "source": result.source},
            "solver": result.solver,
            "shape_rule": result.shape_rule,
            "uniform_quality": self.uniform_quality,
            "gain_over_uniform": self.gain_over_uniform,
        }


def optimize_selection(
    lut: Lut,
    selection: Selection,
    importance: Path | str | None = None,
    memory_gb: float | None = None,
    widths: Sequence[float] | None = None,
) -> PerLayerPick:
    """``optimize_per_layer`` over the design space's depths for the request, metric and budget of a
    uniform selection from ``lut``, with the table's drop rule and dtype; ``importance`` is a CSV
    of per-layer weights (``load_importance``), by default equal weights; ``widths`` (select's
    --widths) limits the per-layer options to those ratios (``width_options``), by default every
    measured option of the table."""
    arch = lut.arch
    weights = load_importance(importance, arch) if importance is not None else None
    predictor = Predictor(lut)
    options = width_options(arch, widths, lut.grid.ffn_multiple) if widths else None
    result = optimize_per_layer(
        predictor,
        arch,
        default_depths(arch),
        selection.workload,
        selection.metric,
        selection.budget_ms,
        selection.stat,
        options=options,
        importance=weights,
        drop_rule=lut.grid.drop_rule,
        memory_gb=memory_gb,
        dtype=lut.dtype,
    )
    model = "per-layer importance from file" if weights is not None else "proxy: retained parameters"
    return PerLayerPick(result, model, additive_quality(arch, selection.pick.subnet, weights))
