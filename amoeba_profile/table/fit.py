"""The ``difference`` method's fit: base + per-layer cost by least squares over whole models.

For every (phase, batch, prompt length or context), the serving-loop latencies y of models with
n_s layers of shape s satisfy y = base + sum_s n_s * layer_s. Timing noise is multiplicative (a
machine state that is 10 % slower slows every model by 10 %), so the fit is weighted by 1/y: it
minimizes relative residuals, and the 0-layer model (where the flow can serve one) pins the base
instead of the base being a small difference of large numbers. The fit is solved for the median,
p10 and p90 of the model rows separately; every model row gets its residual, every derived row the
coefficient's standard error (as std_ms, and cv = std_ms / value) and the flags of the model rows
it was fitted from (a fit over noisy or contended models is no better than they are). A
coefficient that comes out non-positive is physically impossible: a layer's is stored with status
``error`` and the reason, never used. A base below zero is the fit's extrapolation to 0 layers
where the flow serves no 0-layer model (llama.cpp) and the non-layer work is within the noise of
the deepest models (llama-bench's prefill computes logits for one token only): the group is refit
with the base held at 0 ms, the least-squares optimum under base >= 0, and the base row says so.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from amoeba_profile.core.entry import Entry
from amoeba_profile.table.lut import entry_key_of_row, measured_row
from amoeba_profile.core.timing import Measurement
from amoeba_profile.core.subnet import Subnet

_GROUP = ("phase", "batch", "tokens", "context")


def _shapes(row: dict[str, Any]) -> Counter:
    if not row["subnet_json"]:  # the 0-layer model
        return Counter()
    subnet = Subnet.from_json(row["subnet_json"])
    return Counter((l.heads, l.kv_heads, l.ffn) for l in subnet.layers)


def _solve(X: np.ndarray, rows: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Coefficients per statistic (least squares weighted by 1/median), the median fit's standard
    errors (ms) and its residuals (%)."""
    y = np.array([r["median_ms"] for r in rows], dtype=float)
    Xw = X / y[:, None]
    coefs = {stat: np.linalg.lstsq(Xw, np.array([r[stat] for r in rows], dtype=float) / y, rcond=None)[0]
             for stat in ("median_ms", "p10_ms", "p90_ms")}
    resid = (y - X @ coefs["median_ms"]) / y
    dof = len(y) - X.shape[1]
    sigma2 = float(np.sum(resid ** 2) / dof) if dof > 0 else math.nan
    stderr = np.sqrt(np.diag(sigma2 * np.linalg.inv(Xw.T @ Xw)))
    return coefs, stderr, resid * 100


def fit_rows(model_rows: list[dict[str, Any]],
             fit_ids: set[str]) -> tuple[list[dict[str, Any]], dict[str, float], list[dict[str, Any]]]:
    """(derived base and layer rows, residual % per model row's entry key, one summary per fitted group)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in model_rows:
        if row["status"] == "ok" and row["subnet_id"] in fit_ids:
            groups[tuple(int(row[k]) if k != "phase" else row[k] for k in _GROUP)].append(row)
    derived, residuals, summary = [], {}, []
    for (phase, batch, tokens, context), rows in sorted(groups.items()):
        counts = [_shapes(r) for r in rows]
        shapes = sorted(set().union(*counts))
        X = np.array([[1.0] + [c.get(s, 0) for s in shapes] for c in counts])
        if np.linalg.matrix_rank(X) < X.shape[1]:
            continue  # not identifiable (too few depths measured ok): no derived rows for this group
        coefs, stderr, resid = _solve(X, rows)
        unconstrained_base = None
        if not coefs["median_ms"][0] > 0:
            unconstrained_base = (float(coefs["median_ms"][0]), float(stderr[0]))
            layer_coefs, layer_stderr, resid = _solve(X[:, 1:], rows)
            coefs = {stat: np.concatenate([[0.0], c]) for stat, c in layer_coefs.items()}
            stderr = np.concatenate([[math.nan], layer_stderr])
        for row, r in zip(rows, resid):
            residuals[entry_key_of_row(row)] = float(r)
        depths = sorted({sum(c.values()) for c in counts})
        rms = float(np.sqrt(np.mean(resid ** 2)))
        note = f"fit of {len(rows)} models (depths {','.join(map(str, depths))}); rms residual {rms:.2f} %"
        summary.append({"phase": phase, "batch": batch, "tokens": tokens, "context": context, "models": len(rows),
                        "shapes": len(shapes), "rms_residual_pct": round(rms, 3),
                        "max_abs_residual_pct": round(float(np.abs(resid).max()), 3)})
        if unconstrained_base is not None:
            summary[-1]["unconstrained_base_ms"] = round(unconstrained_base[0], 4)
        entries = [Entry("base", phase, batch, tokens, context)]
        entries += [Entry("layer", phase, batch, tokens, context, h, kv, f) for h, kv, f in shapes]
        flags = ";".join(sorted({flag for r in rows if isinstance(r.get("flags"), str)
                                 for flag in r["flags"].split(";") if flag}))
        for i, entry in enumerate(entries):
            if i == 0 and unconstrained_base is not None:
                derived.append(_zero_base_row(entry, *unconstrained_base, len(rows), note, flags))
                continue
            derived.append(_derived_row(entry, coefs["median_ms"][i], coefs["p10_ms"][i], coefs["p90_ms"][i],
                                        float(stderr[i]), len(rows), note, flags))
    return derived, residuals, summary


def _zero_base_row(entry: Entry, unconstrained_ms: float, stderr_ms: float, n: int, note: str,
                   flags: str) -> dict[str, Any]:
    measurement = Measurement((), 0.0, 0.0, 0.0, 0.0, math.nan, math.nan, n)
    return measured_row(entry, measurement, "ok", method="difference", repeat=1, wall_s=0.0, flags=flags,
                        note=f"base held at 0 ms: the unconstrained fit gave {unconstrained_ms:.4g} ± {stderr_ms:.2g} ms, "
                             f"below zero, so the non-layer cost is within the noise; layers refit without it; {note}")


def _derived_row(entry: Entry, median: float, p10: float, p90: float, stderr: float, n: int, note: str,
                 flags: str) -> dict[str, Any]:
    if not median > 0:
        return measured_row(entry, None, "error", method="difference", repeat=1, wall_s=0.0, flags=flags,
                            note=f"fit gave {median:.4g} ms <= 0: the cost is below the noise; fit deeper models")
    # p10/p90 are fitted separately; noise can cross them over the median, which a row may not show.
    p10, p90 = min(p10, median), max(p90, median)
    p10 = p10 if p10 > 0 else median
    cv = stderr / median if math.isfinite(stderr) else math.nan
    measurement = Measurement((), float(median), float(p10), float(p90), float(median), stderr, cv, n)
    return measured_row(entry, measurement, "ok", method="difference", repeat=1, wall_s=0.0, note=note, flags=flags)
