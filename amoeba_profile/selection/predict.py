"""Compose any subnet's latency from a table's rows.

latency(phase) = base(phase) + sum over kept layers of layer(heads_i, kv_heads_i, ffn_i), where a
layer is, by the table's method:
- ``components``: attn(heads, kv_heads) + mlp(ffn), blocks timed alone;
- ``difference``: the fitted ``layer`` row of that shape, or, for a shape off the fitted axes,
  layer(h, F) + layer(H, f) - layer(H, F) (heads axis at full FFN, FFN axis at full heads).
Between measured widths, contexts and prompt lengths the predictor interpolates linearly; it
never extrapolates (OutOfRange names what is missing). Every answer carries its source:
``measured`` (only grid points), ``interpolated`` or ``roofline`` (a computed table), per metric:
ttft depends only on prefill rows, tpot only on decode rows, e2e on both; and the
table rows it rests on (those that bracket every interpolation), so a caller can say when they are
flagged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import OutOfRange, UsageError
from amoeba_profile.table.lut import Lut
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.workload import Workload, compose, metric_name

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

    def metric(self, name: str) -> float:
        """``name`` in any spelling ``metric_name`` accepts: 'tpot' or 'tpot_ms'."""
        return float(getattr(self, metric_name(name)))

    def source_of(self, name: str) -> str:
        """Where the value of metric ``name`` comes from."""
        return {"ttft_ms": self.ttft_source, "tpot_ms": self.tpot_source, "e2e_ms": self.source}[metric_name(name)]

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms, "source": self.source,
                "sources": {m: self.source_of(m) for m in ("ttft_ms", "tpot_ms", "e2e_ms")}, "stat": self.stat}


def _bracket(xs: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The grid points linear interpolation at ``x`` (inside the grid) reads: those from the last
    one at or below min(x) to the first one at or above max(x)."""
    low, high = xs[xs <= x.min()].max(), xs[xs >= x.max()].min()
    return xs[(xs >= low) & (xs <= high)]


def _interp(xs: np.ndarray, ys: np.ndarray, x: np.ndarray, what: str) -> tuple[np.ndarray, bool]:
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

    def __init__(self, lut: Lut):
        self.lut = lut
        self.roofline = lut.is_roofline
        ok = lut.ok
        self.fitted_layers = bool((ok.component == "layer").any())
        self.arch = ModelArch.from_dict(lut.meta["arch"]) if self.fitted_layers else None
        self._rows = {key: group for key, group in ok.groupby(["component", "phase", "batch"])}
        self._cache: dict[tuple, tuple[np.ndarray, str]] = {}

    def _rows_for(self, component: str, phase: str, batch: int) -> pd.DataFrame:
        rows = self._rows.get((component, phase, batch))
        if rows is None:
            raise OutOfRange(f"the table has no ok {component} {phase} rows at batch {batch}")
        return rows

    def _curve(self, component: str, phase: str, batch: int, shape_col: str | None, shape_val: float,
               x_col: str, x: np.ndarray, stat_col: str,
               rows: pd.DataFrame | None = None) -> tuple[np.ndarray, str, frozenset]:
        """Interpolate first across the width axis at every measured x, then along x; returns the
        values, their source and the labels of the rows they were read from."""
        rows = self._rows_for(component, phase, batch) if rows is None else rows
        what = f"{component} {phase}"
        if shape_col is None:
            grid = rows.groupby(x_col)[stat_col].first().sort_index()
            xs = grid.index.to_numpy(float)
            values, exact = _interp(xs, grid.to_numpy(float), x, f"{what} {x_col}")
            used = rows[rows[x_col].isin(_bracket(xs, np.atleast_1d(x)))]
            return values, "measured" if exact else "interpolated", frozenset(used.index)
        pivot = rows.pivot_table(index=shape_col, columns=x_col, values=stat_col, aggfunc="first").dropna()
        shapes = pivot.index.to_numpy(float)
        at_x = np.array([_interp(shapes, pivot[col].to_numpy(float), shape_val, f"{what} {shape_col}")[0][0]
                         for col in pivot.columns])
        shape_exact = shape_val in shapes
        xs = pivot.columns.to_numpy(float)
        values, x_exact = _interp(xs, at_x, x, f"{what} {x_col} ({shape_col}={shape_val:g})")
        used = rows[rows[shape_col].isin(_bracket(shapes, np.atleast_1d(float(shape_val))))
                    & rows[x_col].isin(_bracket(xs, np.atleast_1d(x)))]
        return values, "measured" if shape_exact and x_exact else "interpolated", frozenset(used.index)

    def _layer(self, heads: int, kv_heads: int, ffn: int, phase: str, batch: int, x: np.ndarray,
               stat_col: str) -> tuple[np.ndarray, str, frozenset]:
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
            attn, s1, r1 = self._curve("attn", phase, batch, "heads", heads, x_col, x, stat_col, same_group)
            # The MLP sees one token per decode step whatever the context: one row at context 0.
            mlp_x = x if phase == "prefill" else np.array([0])
            mlp, s2, r2 = self._curve("mlp", phase, batch, "ffn", ffn, x_col, mlp_x, stat_col)
            self._cache[key] = (attn + mlp, worst_source(s1, s2), r1 | r2)
        return self._cache[key]

    def _fitted_layer(self, heads: int, kv_heads: int, ffn: int, phase: str, batch: int, x: np.ndarray,
                      stat_col: str) -> tuple[np.ndarray, str, frozenset]:
        """A ``difference`` table's layer: its own row, or composed additively from the two axes."""
        rows = self._rows_for("layer", phase, batch)
        x_col = "tokens" if phase == "prefill" else "context"
        same = rows[(rows.heads == heads) & (rows.kv_heads == kv_heads) & (rows.ffn == ffn)]
        if not same.empty:
            return self._curve("layer", phase, batch, None, 0, x_col, x, stat_col, same)
        full_h, full_kv, full_f = self.arch.num_heads, self.arch.num_kv_heads, self.arch.ffn_size
        group = heads // kv_heads
        heads_axis = rows[(rows.ffn == full_f) & (rows.heads == rows.kv_heads * group)]
        ffn_axis = rows[(rows.heads == full_h) & (rows.kv_heads == full_kv)]
        full = ffn_axis[ffn_axis.ffn == full_f]
        a, _, ra = self._curve("layer", phase, batch, "heads", heads, x_col, x, stat_col, heads_axis)
        m, _, rm = self._curve("layer", phase, batch, "ffn", ffn, x_col, x, stat_col, ffn_axis)
        f, _, rf = self._curve("layer", phase, batch, None, 0, x_col, x, stat_col, full)
        return a + m - f, "interpolated", ra | rm | rf

    def _phase(self, subnet: Subnet, phase: str, batch: int, x: np.ndarray,
               stat_col: str) -> tuple[np.ndarray, str, frozenset]:
        """base + sum of layers, for prefill at prompt lengths ``x`` or decode at contexts ``x``."""
        x_col = "tokens" if phase == "prefill" else "context"
        key = ("base", phase, batch, x.tobytes(), stat_col)
        if key not in self._cache:
            self._cache[key] = self._curve("base", phase, batch, None, 0, x_col, x, stat_col)
        total, source, used = self._cache[key]
        total = total.copy()
        sources = [source]
        for (heads, kv_heads, ffn), count in Counter((l.heads, l.kv_heads, l.ffn) for l in subnet.layers).items():
            values, s, rows = self._layer(heads, kv_heads, ffn, phase, batch, x, stat_col)
            total += count * values
            sources.append(s)
            used = used | rows
        return total, ("roofline" if self.roofline else worst_source(*sources)), used

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
        stat_col = stat_column(stat)
        prefill, source, used = self._phase(subnet, "prefill", workload.batch, np.array([workload.prompt_len]),
                                            stat_col)
        contexts = self._contexts(workload, lambda ends: self._phase(subnet, "decode", workload.batch, ends, stat_col))
        if len(contexts) == 0:  # no decode step: tpot is undefined (NaN), e2e is the prefill
            decode, decode_source, decode_used = contexts, source, set()
        else:
            decode, decode_source, decode_used = self._phase(subnet, "decode", workload.batch, contexts, stat_col)
        m = compose(prefill[0], decode)
        return Prediction(subnet, workload, stat, m.ttft_ms, m.tpot_ms, m.e2e_ms, worst_source(source, decode_source),
                          source, decode_source, tuple(sorted(used | decode_used)))

    def phase_ms(self, subnet: Subnet, phase: str, batch: int, tokens: int, context: int,
                 stat: str = "median") -> tuple[float, str]:
        """Predicted time of one forward: a prefill of ``tokens`` or one decode step at ``context``."""
        x = np.array([tokens if phase == "prefill" else context])
        values, source, _ = self._phase(subnet, phase, batch, x, stat_column(stat))
        return float(values[0]), source

    def base_metric(self, workload: Workload, metric: str, stat: str = "median") -> float:
        """The part of ``metric`` that does not depend on the layers (embeddings, lm_head, overhead)."""
        col = stat_column(stat)
        contexts = self._contexts(workload, lambda ends: self._curve("base", "decode", workload.batch, None, 0,
                                                                      "context", ends, col))
        prefill = self._curve("base", "prefill", workload.batch, None, 0, "tokens", np.array([workload.prompt_len]), col)[0]
        decode = self._curve("base", "decode", workload.batch, None, 0, "context", contexts, col)[0] if len(contexts) else contexts
        return compose(prefill[0], decode).metric(metric)

    def layer_metric(self, heads: int, kv_heads: int, ffn: int, workload: Workload, metric: str,
                     stat: str = "median") -> float:
        """One decoder layer's contribution to ``metric``; a subnet's metric is base + the sum of these."""
        col, b = stat_column(stat), workload.batch
        contexts = self._contexts(workload, lambda ends: self._layer(heads, kv_heads, ffn, "decode", b, ends, col))
        prefill = self._layer(heads, kv_heads, ffn, "prefill", b, np.array([workload.prompt_len]), col)[0]
        decode = self._layer(heads, kv_heads, ffn, "decode", b, contexts, col)[0] if len(contexts) else contexts
        return compose(prefill[0], decode).metric(metric)
