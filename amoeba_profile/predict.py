"""Compose any subnet's latency from a table's component rows.

latency(phase) = base(phase) + sum over kept layers of [attn(heads_i, kv_heads_i) + mlp(ffn_i)].
Between measured widths, contexts and prompt lengths the predictor interpolates linearly; it
never extrapolates (OutOfRange names what is missing). Every answer carries its source:
``measured`` (only grid points), ``interpolated`` or ``roofline`` (a computed table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import OutOfRange, UsageError
from .lut import Lut
from .subnet import Subnet
from .workload import Workload

SOURCES = ("measured", "interpolated", "roofline")
STATS = {"median": "median_ms", "p90": "p90_ms"}


def worst_source(*sources: str) -> str:
    return max(sources, key=SOURCES.index)


@dataclass(frozen=True)
class Prediction:
    """Predicted metrics (ms) for one subnet and workload; see ``workload`` for definitions."""

    subnet: Subnet
    workload: Workload
    stat: str
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    source: str

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms, "source": self.source,
                "stat": self.stat}


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
        self._rows = {key: group for key, group in ok.groupby(["component", "phase", "batch"])}
        self._cache: dict[tuple, tuple[float, np.ndarray, str]] = {}

    def _rows_for(self, component: str, phase: str, batch: int) -> pd.DataFrame:
        rows = self._rows.get((component, phase, batch))
        if rows is None:
            raise OutOfRange(f"the table has no ok {component} {phase} rows at batch {batch}")
        return rows

    def _curve(self, component: str, phase: str, batch: int, shape_col: str | None, shape_val: float,
               x_col: str, x: np.ndarray, stat_col: str, rows: pd.DataFrame | None = None) -> tuple[np.ndarray, str]:
        """Interpolate first across the width axis at every measured x, then along x."""
        rows = self._rows_for(component, phase, batch) if rows is None else rows
        what = f"{component} {phase}"
        if shape_col is None:
            grid = rows.groupby(x_col)[stat_col].first().sort_index()
            values, exact = _interp(grid.index.to_numpy(float), grid.to_numpy(float), x, f"{what} {x_col}")
            return values, "measured" if exact else "interpolated"
        pivot = rows.pivot_table(index=shape_col, columns=x_col, values=stat_col, aggfunc="first").dropna()
        shapes = pivot.index.to_numpy(float)
        at_x = np.array([_interp(shapes, pivot[col].to_numpy(float), shape_val, f"{what} {shape_col}")[0][0]
                         for col in pivot.columns])
        shape_exact = shape_val in shapes
        values, x_exact = _interp(pivot.columns.to_numpy(float), at_x, x, f"{what} {x_col} ({shape_col}={shape_val:g})")
        return values, "measured" if shape_exact and x_exact else "interpolated"

    def _layer(self, heads: int, kv_heads: int, ffn: int, workload: Workload, stat_col: str) -> tuple[float, np.ndarray, str]:
        """(prefill ms, decode ms per context, source) of one decoder layer shape."""
        key = (heads, kv_heads, ffn, workload, stat_col)
        if key in self._cache:
            return self._cache[key]
        b, p, contexts = workload.batch, np.array([workload.prompt_len]), workload.decode_contexts()
        attn_rows = {ph: self._rows_for("attn", ph, b) for ph in ("prefill", "decode")}
        # Interpolating in heads is only meaningful at the same GQA group size.
        group = {ph: r[r["heads"] == r["kv_heads"] * (heads // kv_heads)] for ph, r in attn_rows.items()}
        attn_pre, s1 = self._curve("attn", "prefill", b, "heads", heads, "tokens", p, stat_col, group["prefill"])
        mlp_pre, s2 = self._curve("mlp", "prefill", b, "ffn", ffn, "tokens", p, stat_col)
        sources = [s1, s2]
        decode = np.zeros(len(contexts))
        if len(contexts):
            attn_dec, s3 = self._curve("attn", "decode", b, "heads", heads, "context", contexts, stat_col, group["decode"])
            mlp_dec, s4 = self._curve("mlp", "decode", b, "ffn", ffn, "context", np.array([0]), stat_col)
            decode = attn_dec + mlp_dec[0]
            sources += [s3, s4]
        result = (float(attn_pre[0] + mlp_pre[0]), decode, worst_source(*sources))
        self._cache[key] = result
        return result

    def predict(self, subnet: Subnet, workload: Workload, stat: str = "median") -> Prediction:
        if stat not in STATS:
            raise UsageError(f"unknown statistic {stat!r}: use median or p90")
        stat_col = STATS[stat]
        b, contexts = workload.batch, workload.decode_contexts()
        base_pre, source = self._curve("base", "prefill", b, None, 0, "tokens", np.array([workload.prompt_len]), stat_col)
        prefill = float(base_pre[0])
        decode = np.zeros(len(contexts))
        sources = [source]
        if len(contexts):
            base_dec, s = self._curve("base", "decode", b, None, 0, "context", contexts, stat_col)
            decode += base_dec
            sources.append(s)
        for layer in subnet.layers:
            pre, dec, s = self._layer(layer.heads, layer.kv_heads, layer.ffn, workload, stat_col)
            prefill += pre
            decode += dec
            sources.append(s)
        source = "roofline" if self.roofline else worst_source(*sources)
        tpot = float(decode.mean()) if len(contexts) else float("nan")
        return Prediction(subnet, workload, stat, prefill, tpot, prefill + float(decode.sum()), source)

    def phase_ms(self, subnet: Subnet, phase: str, batch: int, tokens: int, context: int, stat: str = "median") -> tuple[float, str]:
        """Predicted time of one forward (a prefill of ``tokens`` or one decode step at ``context``)."""
        if phase == "prefill":
            prediction = self.predict(subnet, Workload(batch, tokens, 1), stat)
            return prediction.ttft_ms, prediction.source
        prediction = self.predict(subnet, Workload(batch, context, 2), stat)
        return prediction.tpot_ms, prediction.source
