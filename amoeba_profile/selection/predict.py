"""Compose any subnet's latency from a table's rows.

latency(phase) = base(phase) + sum over kept layers of layer(heads_i, kv_heads_i, ffn_i), where a
layer is, by the table's method:
- ``components``: attn(heads, kv_heads) + mlp(ffn), blocks timed alone;
- ``difference``: the fitted ``layer`` row of that shape, or, for a shape off the fitted axes,
  layer(h, F) + layer(H, f) - layer(H, F) (heads axis at full FFN, FFN axis at full heads).
A shape the table holds measured whole-model rows of (``model`` rows: validate writes them back,
``build-lut --whole`` measures them as truth rows) is answered from those rows instead, per phase:
prefill at exactly the request's prompt length, decode when the rows' contexts span the request's
(read between them as validate reads them). What was measured of the whole model outranks what is
composed from its parts; ``whole_models=False`` composes anyway (validation's composition error).
Between measured widths, contexts and prompt lengths the predictor interpolates linearly; it
never extrapolates (OutOfRange names what is missing). Every answer carries its source:
``measured`` (grid points, or the shape's own model rows), ``interpolated`` or ``roofline`` (a computed table), per metric:
ttft depends only on prefill rows, tpot only on decode rows, e2e on both; and the
table rows it rests on (those that bracket every interpolation), so a caller can say when they are
flagged.

Every value carries a standard error, composed the same way as the value: each row's own (a
measured row's std / sqrt(n) over the samples of all its rounds, drift between rounds included in
the std; a fitted row's coefficient standard error), summed over the layers of one shape as fully correlated (they are one row) and
over distinct rows as independent; plus the table's model error, the rms residual of its fit
against whole models (the sidecar's ``fit``), as a relative term. A components table has no fit, so its
interval covers the measurement only and says so (``model_error_known``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from amoeba_profile.core.errors import OutOfRange, UsageError
from amoeba_profile.core.schema import TableMeta
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.workload import Workload, compose, metric_name
from amoeba_profile.table.lut import Lut

SOURCES = ("measured", "interpolated", "roofline")
STATS = {"median": "median_ms", "p90": "p90_ms"}


def stat_column(stat: str) -> str:
    """The row column that holds statistic ``stat`` (median or p90), for predicted and measured
    metrics alike."""
    if stat not in STATS:
        raise UsageError(f"unknown statistic {stat!r}: use median or p90")
    return STATS[stat]


def worst_source(*sources: str) -> str:
    return max(sources, key=SOURCES.index)


@dataclass(frozen=True)
class Prediction:
    """Predicted metrics (ms) for one subnet and workload; see ``workload`` for definitions.

    ``source`` is the worst source over both phases (that of e2e); ``ttft_source`` and
    ``tpot_source`` are those of the prefill and decode rows alone."""

    subnet: Subnet
    workload: Workload
    stat: str
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    source: str
    ttft_source: str
    tpot_source: str
    rows: tuple[int, ...] = ()  # labels in ``Lut.frame`` of the rows this prediction rests on
    # standard errors (ms) of the three metrics; NaN where the table cannot say (a computed table)
    se_ms: dict[str, float] = field(default_factory=dict)
    model_error_known: bool = False  # False: the interval covers measurement noise only (no fit to whole models)

    def metric(self, name: str) -> float:
        """``name`` in any spelling ``metric_name`` accepts: 'tpot' or 'tpot_ms'."""
        return float(getattr(self, metric_name(name)))

    def se_of(self, name: str) -> float:
        return float(self.se_ms.get(metric_name(name), math.nan))

    def quantile(self, name: str, q: float) -> float:
        """The ``q``-quantile of metric ``name`` under a normal error of ``se_of(name)``."""
        return self.metric(name) + normal_quantile(q) * self.se_of(name)

    def interval(self, name: str, level: float = 0.9) -> tuple[float, float]:
        """The central ``level`` interval of metric ``name`` (NaN bounds where the error is unknown)."""
        tail = (1 - level) / 2
        return self.quantile(name, tail), self.quantile(name, 1 - tail)

    def p_within(self, name: str, budget_ms: float) -> float:
        """Probability that metric ``name`` is at most ``budget_ms``; NaN where the error is unknown."""
        value, se = self.metric(name), self.se_of(name)
        if math.isnan(se):
            return math.nan
        if se == 0:
            return 1.0 if value <= budget_ms else 0.0
        return 0.5 * (1 + math.erf((budget_ms - value) / (se * math.sqrt(2))))

    def source_of(self, name: str) -> str:
        """Where the value of metric ``name`` comes from."""
        return {"ttft_ms": self.ttft_source, "tpot_ms": self.tpot_source, "e2e_ms": self.source}[metric_name(name)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "e2e_ms": self.e2e_ms,
            "source": self.source,
            "sources": {m: self.source_of(m) for m in ("ttft_ms", "tpot_ms", "e2e_ms")},
            "stat": self.stat,
            "se_ms": {m: _finite_or_none(self.se_of(m)) for m in ("ttft_ms", "tpot_ms", "e2e_ms")},
            "model_error_known": self.model_error_known,
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def normal_quantile(q: float) -> float:
    """The standard normal ``q``-quantile (Acklam's rational approximation, |error| < 1.2e-9): the
    prediction side stays free of scipy's import time."""
    if not 0 < q < 1:
        raise UsageError(f"a probability must lie strictly between 0 and 1, got {q}")
    a = (
        -3.969683028665376e01,
        2.209460984245205e02,
        -2.759285104469687e02,
        1.383577518672690e02,
        -3.066479806614716e01,
        2.506628277459239e00,
    )
    b = (
        -5.447609879822406e01,
        1.615858368580409e02,
        -1.556989798598866e02,
        6.680131188771972e01,
        -1.328068155288572e01,
    )
    c = (
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e00,
        -2.549732539343734e00,
        4.374664141464968e00,
        2.938163982698783e00,
    )
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    if q < 0.02425 or q > 1 - 0.02425:
        t = math.sqrt(-2 * math.log(q if q < 0.5 else 1 - q))
        x = (((((c[0] * t + c[1]) * t + c[2]) * t + c[3]) * t + c[4]) * t + c[5]) / (
            (((d[0] * t + d[1]) * t + d[2]) * t + d[3]) * t + 1
        )
        return x if q < 0.5 else -x
    r = q - 0.5
    t = r * r
    return (
        (((((a[0] * t + a[1]) * t + a[2]) * t + a[3]) * t + a[4]) * t + a[5])
        * r
        / (((((b[0] * t + b[1]) * t + b[2]) * t + b[3]) * t + b[4]) * t + 1)
    )


def _row_se(ok: pd.DataFrame) -> pd.Series:
    """Each row's standard error (ms): a fitted row's is its std_ms already (the coefficient's); a
    measured row's is the std of its samples, pooled over every round (drift between rounds is in
    it), over the square root of their number. NaN (a computed row) stays NaN, so a roofline
    prediction has no interval."""
    fitted = ok["method"].isin(("difference", "calibrated"))
    n = pd.to_numeric(ok["n"], errors="coerce").fillna(1).clip(lower=1)
    se = ok["std_ms"].where(fitted, ok["std_ms"] / np.sqrt(n))
    return se.where(ok["source"] != "roofline", np.nan)


def _model_error(meta: TableMeta) -> dict[str, float]:
    """Relative model error per phase: the median rms residual (%) of the table's fit against whole
    models (difference or calibrated), as a fraction; empty when the table has no fit."""
    by_phase: dict[str, list[float]] = {}
    for group in meta.fit or []:
        by_phase.setdefault(group["phase"], []).append(float(group["rms_residual_pct"]) / 100)
    return {phase: float(np.median(values)) for phase, values in by_phase.items()}


class Curve(NamedTuple):
    """Values read or composed from the table at some points, with their source, the labels of the
    rows they were read from and their standard errors (ms)."""

    values: np.ndarray
    source: str
    used: frozenset[Any]
    se: np.ndarray


def _bracket(xs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The grid points linear interpolation at ``x`` (inside the grid) reads: those from the last
    one at or below min(x) to the first one at or above max(x)."""
    low, high = xs[xs <= x.min()].max(), xs[xs >= x.max()].min()
    return xs[(xs >= low) & (xs <= high)]


def _interp(xs: np.ndarray, ys: np.ndarray, x: np.ndarray | float, what: str) -> tuple[np.ndarray, bool]:
    """Linear interpolation that refuses to leave [xs.min(), xs.max()]; returns (values, all exact)."""
    x = np.atleast_1d(np.asarray(x, dtype=float))
    if len(xs) == 0:
        raise OutOfRange(f"the table has no rows for {what}")
    low, high = xs.min(), xs.max()
    outside = (x < low) | (x > high)
    if outside.any():
        bad = x[outside][0]
        raise OutOfRange(f"{what}: {bad:g} is outside the measured range [{low:g}, {high:g}]; extend the build")
    return np.interp(x, xs, ys), bool(np.isin(x, xs).all())


class Predictor:
    """Latency of any subnet from one table. ``stat`` picks the row statistic: median or p90.

    For p90 the composed value is the sum of component p90s, an upper estimate of the
    whole-model p90 (component tails rarely coincide).
    """

    def __init__(self, lut: Lut, whole_models: bool = True):
        self.lut = lut
        self.roofline = lut.is_roofline
        ok = lut.ok.copy()
        ok["se_ms"] = _row_se(ok)
        self.fitted_layers = bool((ok.component == "layer").any())
        self.arch = lut.arch if self.fitted_layers else None
        self._rows = {key: group for key, group in ok.groupby(["component", "phase", "batch"])}
        # Measured (not computed) whole-model rows by shape: they answer ``predict`` for that shape.
        models = ok[(ok.component == "model") & (ok.source == "measured")] if whole_models else ok.iloc[:0]
        self._models = {key: group for key, group in models.groupby(["subnet_id", "phase", "batch"])}
        self._cache: dict[tuple, Curve] = {}
        self.model_error = _model_error(lut.meta)

    def _rows_for(self, component: str, phase: str, batch: int) -> pd.DataFrame:
        rows = self._rows.get((component, phase, batch))
        if rows is None:
            raise OutOfRange(f"the table has no ok {component} {phase} rows at batch {batch}")
        return rows

    def _curve(
        self,
        component: str,
        phase: str,
        batch: int,
        shape_col: str | None,
        shape_val: float,
        x_col: str,
        x: np.ndarray,
        stat_col: str,
        rows: pd.DataFrame | None = None,
    ) -> Curve:
        """Interpolate first across the width axis at every measured x, then along x; returns the
        values, their source, the labels of the rows they were read from and their standard errors
        (interpolated as the values are)."""
        rows = self._rows_for(component, phase, batch) if rows is None else rows
        what = f"{component} {phase}"
        if shape_col is None:
            grid = rows.groupby(x_col)[stat_col].first().sort_index()
            xs = grid.index.to_numpy(float)
            values, exact = _interp(xs, grid.to_numpy(float), x, f"{what} {x_col}")
            se_grid = rows.groupby(x_col)["se_ms"].first().sort_index()
            se = np.interp(np.atleast_1d(np.asarray(x, dtype=float)), xs, se_grid.to_numpy(float))
            used = rows[rows[x_col].isin(_bracket(xs, np.atleast_1d(x)))]
            return Curve(values, "measured" if exact else "interpolated", frozenset(used.index), se)
        # one grouping for the value and its error (pivot_table twice took most of a select's time)
        grid = rows.groupby([shape_col, x_col], sort=True)[[stat_col, "se_ms"]].first()
        pivot = grid[stat_col].unstack(x_col).dropna(axis=1, how="all").dropna()
        shapes = pivot.index.to_numpy(float)
        at_x = np.array(
            [
                _interp(shapes, pivot[col].to_numpy(float), shape_val, f"{what} {shape_col}")[0][0]
                for col in pivot.columns
            ]
        )
        shape_exact = shape_val in shapes
        xs = pivot.columns.to_numpy(float)
        values, x_exact = _interp(xs, at_x, x, f"{what} {x_col} ({shape_col}={shape_val:g})")
        se_pivot = grid["se_ms"].unstack(x_col).reindex(index=pivot.index, columns=pivot.columns)
        se_at_x = np.array([np.interp(shape_val, shapes, se_pivot[col].to_numpy(float)) for col in pivot.columns])
        se = np.interp(np.atleast_1d(np.asarray(x, dtype=float)), xs, se_at_x)
        used = rows[
            rows[shape_col].isin(_bracket(shapes, np.atleast_1d(float(shape_val))))
            & rows[x_col].isin(_bracket(xs, np.atleast_1d(x)))
        ]
        return Curve(values, "measured" if shape_exact and x_exact else "interpolated", frozenset(used.index), se)

    def _layer(
        self, heads: int, kv_heads: int, ffn: int, phase: str, batch: int, x: np.ndarray, stat_col: str
    ) -> Curve:
        """One decoder-layer shape: prefill ms at prompt lengths ``x``, or decode ms at contexts ``x``."""
        key = (heads, kv_heads, ffn, phase, batch, x.tobytes(), stat_col)
        if key in self._cache:
            return self._cache[key]
        if self.fitted_layers:
            self._cache[key] = self._fitted_layer(heads, kv_heads, ffn, phase, batch, x, stat_col)
        else:
            attn_rows = self._rows_for("attn", phase, batch)
            # Interpolating in heads is only meaningful at the same GQA group size.
            same_group = attn_rows[attn_rows["heads"] == attn_rows["kv_heads"] * (heads // kv_heads)]
            x_col = "tokens" if phase == "prefill" else "context"
            parts = [
                ("attn", "heads", heads, x, same_group),
                # The MLP sees one token per decode step whatever the context: one row at context 0.
                ("mlp", "ffn", ffn, x if phase == "prefill" else np.array([0]), None),
            ]
            self._cache[key] = self._sum(
                [
                    self._curve(component, phase, batch, col, value, x_col, at, stat_col, rows)
                    for component, col, value, at, rows in parts
                ],
                [1, 1],
            )
        return self._cache[key]

    def _sum(self, curves: list[Curve], signs: list[int]) -> Curve:
        """Signed sum of curves; their errors add as independent rows."""
        value = sum((sign * c.values for sign, c in zip(signs, curves)), np.zeros(()))
        se = np.sqrt(sum(c.se**2 for c in curves))
        return Curve(value, worst_source(*(c.source for c in curves)), frozenset().union(*(c.used for c in curves)), se)

    def _fitted_layer(
        self, heads: int, kv_heads: int, ffn: int, phase: str, batch: int, x: np.ndarray, stat_col: str
    ) -> Curve:
        """A ``difference`` table's layer: its own row, or composed additively from the two axes."""
        rows = self._rows_for("layer", phase, batch)
        x_col = "tokens" if phase == "prefill" else "context"
        same = rows[(rows.heads == heads) & (rows.kv_heads == kv_heads) & (rows.ffn == ffn)]
        if not same.empty:
            return self._curve("layer", phase, batch, None, 0, x_col, x, stat_col, same)
        assert self.arch is not None  # set whenever the table has fitted layer rows
        full_h, full_kv, full_f = self.arch.num_heads, self.arch.num_kv_heads, self.arch.ffn_size
        group = heads // kv_heads
        heads_axis = rows[(rows.ffn == full_f) & (rows.heads == rows.kv_heads * group)]
        ffn_axis = rows[(rows.heads == full_h) & (rows.kv_heads == full_kv)]
        full = ffn_axis[ffn_axis.ffn == full_f]
        value, _, used, se = self._sum(
            [
                self._curve("layer", phase, batch, "heads", heads, x_col, x, stat_col, heads_axis),
                self._curve("layer", phase, batch, "ffn", ffn, x_col, x, stat_col, ffn_axis),
                self._curve("layer", phase, batch, None, 0, x_col, x, stat_col, full),
            ],
            [1, 1, -1],
        )
        return Curve(value, "interpolated", used, se)

    def _phase(self, subnet: Subnet, phase: str, batch: int, x: np.ndarray, stat_col: str) -> Curve:
        """base + sum of layers, for prefill at prompt lengths ``x`` or decode at contexts ``x``, with
        the standard error of each value."""
        x_col = "tokens" if phase == "prefill" else "context"
        key = ("base", phase, batch, x.tobytes(), stat_col)
        if key not in self._cache:
            self._cache[key] = self._curve("base", phase, batch, None, 0, x_col, x, stat_col)
        total, source, used, base_se = self._cache[key]
        total = total.copy()
        variance = base_se**2
        sources = [source]
        for (heads, kv_heads, ffn), count in Counter((l.heads, l.kv_heads, l.ffn) for l in subnet.layers).items():
            values, s, rows, se = self._layer(heads, kv_heads, ffn, phase, batch, x, stat_col)
            total += count * values
            variance = variance + (count * se) ** 2  # the layers of one shape read one row: fully correlated
            sources.append(s)
            used = used | rows
        relative = self.model_error.get(phase, 0.0)
        se = np.sqrt(variance + (relative * total) ** 2)
        return Curve(total, ("roofline" if self.roofline else worst_source(*sources)), used, se)

    def _whole(self, subnet: Subnet, phase: str, batch: int, x: np.ndarray, stat_col: str) -> Curve | None:
        """The subnet's own measured model rows for this phase, when they cover ``x`` (prefill at
        exactly the prompt length; decode within the measured contexts), with their standard
        errors; None when they do not."""
        rows = self._models.get((subnet.id, phase, batch))
        if rows is None:
            return None
        x_col = "tokens" if phase == "prefill" else "context"
        xs = rows[x_col].to_numpy(float)
        covered = np.isin(x, xs).all() if phase == "prefill" else xs.min() <= x.min() and x.max() <= xs.max()
        if not covered:
            return None
        values, _, used, se = self._curve("model", phase, batch, None, 0, x_col, x, stat_col, rows)
        return Curve(values, "measured", used, se)

    def _answer(self, subnet: Subnet, phase: str, batch: int, x: np.ndarray, stat_col: str) -> Curve:
        """What ``predict`` reads for one phase: the shape's measured model rows, else the composition."""
        return self._whole(subnet, phase, batch, x, stat_col) or self._phase(subnet, phase, batch, x, stat_col)

    @staticmethod
    def _contexts(workload: Workload, check) -> np.ndarray:
        """The workload's decode contexts, after ``check`` accepted the first and the last: every
        curve refuses to leave an interval, so the two ends decide, and a --gen-len of 10^8 is
        refused before 10^8 contexts (and their interpolations) are allocated."""
        span = workload.decode_span()
        if span is not None:
            check(np.array(span))
        return workload.decode_contexts()

    def predict(self, subnet: Subnet, workload: Workload, stat: str = "median") -> Prediction:
        """Every metric of ``subnet`` for ``workload``: from its measured model rows where the table
        has them (source ``measured``), else composed from the table's parts."""
        stat_col = stat_column(stat)
        prefill, source, used, prefill_se = self._answer(
            subnet, "prefill", workload.batch, np.array([workload.prompt_len]), stat_col
        )
        contexts = self._contexts(workload, lambda ends: self._answer(subnet, "decode", workload.batch, ends, stat_col))
        if len(contexts) == 0:  # no decode step: tpot is undefined (NaN), e2e is the prefill
            decode_curve = Curve(contexts, source, frozenset(), contexts)
        else:
            decode_curve = self._answer(subnet, "decode", workload.batch, contexts, stat_col)
        decode, decode_source, decode_used, decode_se = decode_curve
        m = compose(prefill[0], decode)
        # The decode steps of one request read the same rows: their errors add up, not in quadrature.
        tpot_se = float(np.mean(decode_se)) if len(decode_se) else math.nan
        se = {"ttft_ms": float(prefill_se[0]), "tpot_ms": tpot_se, "e2e_ms": float(prefill_se[0] + np.sum(decode_se))}
        if self.roofline:
            se = {k: math.nan for k in se}
        return Prediction(
            subnet,
            workload,
            stat,
            m.ttft_ms,
            m.tpot_ms,
            m.e2e_ms,
            worst_source(source, decode_source),
            source,
            decode_source,
            tuple(sorted(used | decode_used)),
            se,
            bool(self.model_error),
        )

    def measured_metric(self, subnet: Subnet, workload: Workload, metric: str, stat: str = "median") -> float:
        """``metric`` of ``subnet`` from its measured model rows alone, read as ``predict`` reads them
        (ttft needs only the prefill row); OutOfRange says what the rows lack."""
        metric, stat_col, batch = metric_name(metric), stat_column(stat), workload.batch
        prefill = self._whole(subnet, "prefill", batch, np.array([workload.prompt_len]), stat_col)
        if prefill is None:
            raise OutOfRange(f"{subnet.label}: no measured prefill at {workload.prompt_len} tokens")
        if metric == "ttft_ms":
            return float(prefill.values[0])
        span = workload.decode_span()
        if span is None:
            raise OutOfRange(f"{subnet.label}: the workload has no decode step")
        decode = self._whole(subnet, "decode", batch, np.array(span), stat_col)
        if decode is None:
            rows = self._models.get((subnet.id, "decode", batch))
            measured = sorted(rows.context.astype(int).tolist()) if rows is not None else []
            raise OutOfRange(
                f"{subnet.label}: measured decode contexts {measured} do not cover the decode steps "
                f"{span[0]}..{span[1]}"
            )
        steps = self._whole(subnet, "decode", batch, workload.decode_contexts(), stat_col)
        assert steps is not None  # the rows cover both ends of the span, so every context between them
        return compose(prefill.values[0], steps.values).metric(metric)

    def phase_ms(
        self, subnet: Subnet, phase: str, batch: int, tokens: int, context: int, stat: str = "median"
    ) -> tuple[float, str]:
        """Composed time of one forward: a prefill of ``tokens`` or one decode step at ``context``
        (always from the parts, even for a shape with model rows: it is what those rows check)."""
        x = np.array([tokens if phase == "prefill" else context])
        values, source, _, _ = self._phase(subnet, phase, batch, x, stat_column(stat))
        return float(values[0]), source

    def base_metric(self, workload: Workload, metric: str, stat: str = "median") -> float:
        """The part of ``metric`` that does not depend on the layers (embeddings, lm_head, overhead)."""
        col = stat_column(stat)
        contexts = self._contexts(
            workload, lambda ends: self._curve("base", "decode", workload.batch, None, 0, "context", ends, col)
        )
        prefill = self._curve(
            "base", "prefill", workload.batch, None, 0, "tokens", np.array([workload.prompt_len]), col
        ).values
        decode = (
            self._curve("base", "decode", workload.batch, None, 0, "context", contexts, col).values
            if len(contexts)
            else contexts
        )
        return compose(prefill[0], decode).metric(metric)

    def layer_metric(
        self, heads: int, kv_heads: int, ffn: int, workload: Workload, metric: str, stat: str = "median"
    ) -> float:
        """One decoder layer's contribution to ``metric``; a subnet's metric is base + the sum of these."""
        col, b = stat_column(stat), workload.batch
        contexts = self._contexts(workload, lambda ends: self._layer(heads, kv_heads, ffn, "decode", b, ends, col))
        prefill = self._layer(heads, kv_heads, ffn, "prefill", b, np.array([workload.prompt_len]), col).values
        decode = self._layer(heads, kv_heads, ffn, "decode", b, contexts, col).values if len(contexts) else contexts
        return compose(prefill[0], decode).metric(metric)

    def phase_se_ms(
        self, subnet: Subnet, phase: str, batch: int, tokens: int, context: int, stat: str = "median"
    ) -> float:
        """The standard error of ``phase_ms``'s value."""
        x = np.array([tokens if phase == "prefill" else context])
        return float(self._phase(subnet, phase, batch, x, stat_column(stat)).se[0])
