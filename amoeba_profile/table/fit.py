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
from amoeba_profile.core.schema import Row
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import Measurement
from amoeba_profile.table.lut import measured_row


def _shapes(row: Row) -> Counter:
    if not row.subnet_json:  # the 0-layer model
        return Counter()
    subnet = Subnet.from_json(row.subnet_json)
    return Counter((l.heads, l.kv_heads, l.ffn) for l in subnet.layers)


def _solve(X: np.ndarray, rows: list[Row]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Coefficients per statistic (least squares weighted by 1/median), the median fit's standard
    errors (ms) and its residuals (%)."""
    y = np.array([r.median_ms for r in rows], dtype=float)
    Xw = X / y[:, None]
    coefs = {
        stat: np.linalg.lstsq(Xw, np.array([getattr(r, stat) for r in rows], dtype=float) / y, rcond=None)[0]
        for stat in ("median_ms", "p10_ms", "p90_ms")
    }
    resid = (y - X @ coefs["median_ms"]) / y
    dof = len(y) - X.shape[1]
    sigma2 = float(np.sum(resid**2) / dof) if dof > 0 else math.nan
    stderr = np.sqrt(np.diag(sigma2 * np.linalg.inv(Xw.T @ Xw)))
    return coefs, stderr, resid * 100


def fit_rows(model_rows: list[Row], fit_ids: set[str]) -> tuple[list[Row], dict[str, float], list[dict[str, Any]]]:
    """(derived base and layer rows, residual % per model row's entry key, one summary per fitted group)."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in model_rows:
        if row.status == "ok" and row.subnet_id in fit_ids:
            groups[(row.phase, int(row.batch), int(row.tokens), int(row.context))].append(row)
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
            residuals[row.key] = float(r)
        depths = sorted({sum(c.values()) for c in counts})
        rms = float(np.sqrt(np.mean(resid**2)))
        note = f"fit of {len(rows)} models (depths {','.join(map(str, depths))}); rms residual {rms:.2f} %"
        summary.append(
            {
                "phase": phase,
                "batch": batch,
                "tokens": tokens,
                "context": context,
                "models": len(rows),
                "shapes": len(shapes),
                "rms_residual_pct": round(rms, 3),
                "max_abs_residual_pct": round(float(np.abs(resid).max()), 3),
            }
        )
        if unconstrained_base is not None:
            summary[-1]["unconstrained_base_ms"] = round(unconstrained_base[0], 4)
        entries = [Entry("base", phase, batch, tokens, context)]
        entries += [Entry("layer", phase, batch, tokens, context, h, kv, f) for h, kv, f in shapes]
        flags = ";".join(sorted({flag for r in rows for flag in r.flags.split(";") if flag}))
        for i, entry in enumerate(entries):
            if i == 0 and unconstrained_base is not None:
                derived.append(_zero_base_row(entry, *unconstrained_base, len(rows), note, flags))
                continue
            derived.append(
                _derived_row(
                    entry,
                    coefs["median_ms"][i],
                    coefs["p10_ms"][i],
                    coefs["p90_ms"][i],
                    float(stderr[i]),
                    len(rows),
                    note,
                    flags,
                )
            )
    return derived, residuals, summary


def _zero_base_row(entry: Entry, unconstrained_ms: float, stderr_ms: float, n: int, note: str, flags: str) -> Row:
    measurement = Measurement((), 0.0, 0.0, 0.0, math.nan, math.nan, math.nan, n)
    return measured_row(
        entry,
        measurement,
        "ok",
        method="difference",
        repeat=1,
        wall_s=0.0,
        flags=flags,
        note=f"base held at 0 ms: the unconstrained fit gave {unconstrained_ms:.4g} ± {stderr_ms:.2g} ms, "
        f"below zero, so the non-layer cost is within the noise; layers refit without it; {note}",
    )


def _derived_row(
    entry: Entry, median: float, p10: float, p90: float, stderr: float, n: int, note: str, flags: str
) -> Row:
    if not median > 0:
        return measured_row(
            entry,
            None,
            "error",
            method="difference",
            repeat=1,
            wall_s=0.0,
            flags=flags,
            note=f"fit gave {median:.4g} ms <= 0: the cost is below the noise; fit deeper models",
        )
    # p10/p90 are fitted separately; noise can cross them over the median, which a row may not show.
    p10, p90 = min(p10, median), max(p90, median)
    p10 = p10 if p10 > 0 else median
    cv = stderr / median if math.isfinite(stderr) else math.nan
    measurement = Measurement((), float(median), float(p10), float(p90), math.nan, stderr, cv, n)
    return measured_row(entry, measurement, "ok", method="difference", repeat=1, wall_s=0.0, note=note, flags=flags)


def _component_ms(rows: list[Row]) -> dict[tuple, Row]:
    """The ok attn, mlp and base rows by (component, phase, batch, tokens, context, heads, kv_heads, ffn)."""
    return {
        (
            r.component,
            r.phase,
            int(r.batch),
            int(r.tokens),
            int(r.context),
            int(r.heads),
            int(r.kv_heads),
            int(r.ffn),
        ): r
        for r in rows
        if r.status == "ok" and r.component in ("attn", "mlp", "base")
    }


def _se(row: Row) -> float:
    """Standard error of a measured row's central value: the std of its samples, pooled over every
    round (so drift between rounds is in it), over the square root of their number."""
    std = float(row.std_ms)
    n = max(1, int(row.n or 1))
    return std / math.sqrt(n) if math.isfinite(std) else 0.0


def calibrate_rows(
    rows: list[Row],
    calibration_ids: set[str],
) -> tuple[list[Row], dict[str, float], list[dict[str, Any]]]:
    """The calibrated method's fit: per (phase, batch, prompt length or context), the whole
    calibration models' serving-loop latencies y against their composed component cost C and
    layer count n: y - base = a * C + d * n, least squares weighted by 1/y (relative residuals).
    Every layer shape of the grid's two axes gets a ``layer`` row a * (attn + mlp) + d, with the
    standard error of that value (coefficient covariance from the models' own spread, or from the
    residuals where they are larger) as std_ms. Returns (derived rows, residual % per model row's
    entry key, one summary per group)."""
    comps = _component_ms(rows)
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        if row.component == "model" and row.status == "ok" and row.subnet_id in calibration_ids:
            groups[(row.phase, int(row.batch), int(row.tokens), int(row.context))].append(row)
    derived, residuals, summary = [], {}, []
    for (phase, batch, tokens, context), models in sorted(groups.items()):
        mlp_context = 0 if phase == "decode" else context  # the MLP sees one token whatever the context
        group = {"attn": context, "base": context, "mlp": mlp_context}

        def comp(
            component: str,
            heads: int = 0,
            kv: int = 0,
            ffn: int = 0,
            at: tuple = (phase, batch, tokens),
            x: dict[str, int] = group,
        ) -> Row | None:
            return comps.get((component, *at, x[component], heads, kv, ffn))

        base = comp("base")
        usable = []
        for row in models:
            total, missing = 0.0, False
            for heads, kv, ffn in _shapes(row).elements():
                attn, mlp = comp("attn", heads, kv), comp("mlp", ffn=ffn)
                if attn is None or mlp is None:
                    missing = True
                    break
                total += attn.median_ms + mlp.median_ms
            if not missing and base is not None:
                usable.append((row, total, sum(_shapes(row).values())))
        if base is None or len(usable) < 2:
            continue  # nothing to calibrate against: the group keeps only its component rows
        y = np.array([r.median_ms for r, _, _ in usable]) - base.median_ms
        X = np.array([[c, n] for _, c, n in usable], dtype=float)
        weight = 1.0 / np.array([r.median_ms for r, _, _ in usable])
        Xw, yw = X * weight[:, None], y * weight
        coef = np.linalg.lstsq(Xw, yw, rcond=None)[0]
        held = not coef[0] > 0  # a non-positive scale is noise, not physics: keep the components' scale
        if held:
            coef = np.array([1.0, float(np.sum(Xw[:, 1] * (yw - Xw[:, 0])) / np.sum(Xw[:, 1] ** 2))])
        bread = np.linalg.pinv(Xw.T @ Xw)
        model_se = np.array([_se(r) for r, _, _ in usable]) * weight
        cov = bread @ (Xw.T * model_se**2) @ Xw @ bread  # from the models' own spread
        resid = (y - X @ coef) * weight
        dof = len(y) - 2
        if dof > 0:
            from_residuals = bread * float(np.sum(resid**2) / dof)
            cov = from_residuals if np.trace(from_residuals) > np.trace(cov) else cov
        scale, per_layer = float(coef[0]), float(coef[1])
        for (row, _, _), r in zip(usable, resid):
            residuals[row.key] = float(100 * r)
        rms = float(np.sqrt(np.mean((100 * resid) ** 2)))
        summary.append(
            {
                "phase": phase,
                "batch": batch,
                "tokens": tokens,
                "context": context,
                "models": len(usable),
                "scale": round(scale, 5),
                "per_layer_ms": round(per_layer, 5),
                "scale_se": round(float(math.sqrt(cov[0, 0])), 5),
                "per_layer_se_ms": round(float(math.sqrt(cov[1, 1])), 5),
                "rms_residual_pct": round(rms, 3),
                "max_abs_residual_pct": round(float(np.abs(100 * resid).max()), 3),
            }
        )
        note = (
            f"calibrated: {scale:.4f} x (attn + mlp) + {per_layer:.4g} ms per layer, from {len(usable)} whole "
            f"models (rms residual {rms:.2f} %)"
            + ("; the fitted scale was not positive, so it is held at 1" if held else "")
        )
        if held:
            summary[-1]["scale_held"] = True
        flags = ";".join(sorted({f for r, _, _ in usable for f in r.flags.split(";") if f}))
        heads_axis = sorted(
            {(k[5], k[6]) for k in comps if k[0] == "attn" and k[1:5] == (phase, batch, tokens, context)}
        )
        ffn_axis = sorted({k[7] for k in comps if k[0] == "mlp" and k[1:5] == (phase, batch, tokens, mlp_context)})
        arch_full = max(heads_axis, default=None), max(ffn_axis, default=None)
        if arch_full[0] is None or arch_full[1] is None:
            continue
        shapes = {(h, kv, arch_full[1]) for h, kv in heads_axis} | {(*arch_full[0], f) for f in ffn_axis}
        for heads, kv, ffn in sorted(shapes):
            attn, mlp = comp("attn", heads, kv), comp("mlp", ffn=ffn)
            assert attn is not None and mlp is not None  # both axes were read from the measured components
            composed = {stat: getattr(attn, stat) + getattr(mlp, stat) for stat in ("median_ms", "p10_ms", "p90_ms")}
            grad = np.array([composed["median_ms"], 1.0])
            se = math.sqrt(float(grad @ cov @ grad) + scale**2 * (_se(attn) ** 2 + _se(mlp) ** 2))
            entry = Entry("layer", phase, batch, tokens, context, heads, kv, ffn)
            median = scale * composed["median_ms"] + per_layer
            if not median > 0:
                derived.append(
                    measured_row(
                        entry,
                        None,
                        "error",
                        method="calibrated",
                        repeat=1,
                        wall_s=0.0,
                        flags=flags,
                        note=f"calibration gave {median:.4g} ms <= 0; {note}",
                    )
                )
                continue
            p10 = min(scale * composed["p10_ms"] + per_layer, median)
            p90 = max(scale * composed["p90_ms"] + per_layer, median)
            measurement = Measurement(
                (), median, p10 if p10 > 0 else median, p90, math.nan, se, se / median, len(usable)
            )
            derived.append(
                measured_row(
                    entry, measurement, "ok", method="calibrated", repeat=1, wall_s=0.0, note=note, flags=flags
                )
            )
    return derived, residuals, summary
