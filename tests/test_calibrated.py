"""The calibrated method: component rows corrected by a few whole models through the serving loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from amoeba_profile.backends import get_backend
from conftest import FAST_PROTOCOL

from amoeba_profile.core.entry import Entry
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import Measurement
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.fit import calibrate_rows
from amoeba_profile.table.lut import load_table, measured_row


def test_three_engines_whatever_the_grid(tiny_arch):
    plan = BuildPlan(tiny_arch, method="calibrated")
    subnets = plan.calibration_subnets()
    assert len(subnets) == 3 == len(plan.fit_ids())
    assert subnets[0].num_layers == tiny_arch.num_layers and subnets[0].width_ratio == 1.0
    per_layer = {(l.heads, l.ffn) for s in subnets[1:] for l in s.layers}
    assert len(per_layer) >= 3  # narrowest everywhere, and each axis narrowed alone
    models = {e.subnet.id for e in plan.entries() if e.component == "model"}
    assert models == plan.fit_ids()
    assert {e.component for e in plan.entries()} == {"model", "base", "attn", "mlp"}


def _row(component, phase, x, median, heads=0, kv=0, ffn=0, subnet=None, std=0.01):
    tokens, context = (x, 0) if phase == "prefill" else (1, x)
    entry = Entry(
        component,
        phase,
        1,
        tokens,
        context if component != "mlp" or phase == "prefill" else 0,
        heads,
        kv,
        ffn,
        subnet=subnet,
    )
    m = Measurement((median,), median, median * 0.99, median * 1.01, median, std, std / median, 5)
    return measured_row(
        entry, m, "ok", method="whole" if component == "model" else "components", repeat=1, wall_s=1.0, rounds=3
    )


def test_the_fit_recovers_scale_and_per_layer_cost(tiny_arch):
    """Whole models that cost 1.1 x their components plus 0.3 ms per layer give exactly that back,
    and every grid shape a layer row of 1.1 (attn + mlp) + 0.3."""
    plan = BuildPlan(tiny_arch, widths=(1.0, 0.5), method="calibrated", prompt_lens=(16,), contexts=(16,))
    attn = {(8, 4): 2.0, (4, 2): 1.2}
    mlp = {128: 3.0, 64: 1.8}
    rows = [_row("base", "decode", 16, 5.0)]
    rows += [_row("attn", "decode", 16, v, h, kv) for (h, kv), v in attn.items()]
    rows += [_row("mlp", "decode", 16, v, ffn=f) for f, v in mlp.items()]
    for subnet in plan.calibration_subnets():
        cost = sum(1.1 * (attn[(l.heads, l.kv_heads)] + mlp[l.ffn]) + 0.3 for l in subnet.layers)
        rows.append(_row("model", "decode", 16, 5.0 + cost, subnet=subnet))
    derived, residuals, summary = calibrate_rows(rows, plan.fit_ids())
    assert summary[0]["scale"] == pytest.approx(1.1) and summary[0]["per_layer_ms"] == pytest.approx(0.3)
    assert max(abs(r) for r in residuals.values()) < 1e-6
    layers = {(r.heads, r.kv_heads, r.ffn): r.median_ms for r in derived}
    assert layers == pytest.approx(
        {(8, 4, 128): 1.1 * 5.0 + 0.3, (4, 2, 128): 1.1 * 4.2 + 0.3, (8, 4, 64): 1.1 * 3.8 + 0.3}
    )
    assert all(r.std_ms > 0 and math.isnan(r.mean_ms) for r in derived)  # the fit's se; no mean


@pytest.mark.slow
def test_a_calibrated_table_predicts_its_own_calibration_models(tiny_arch, tmp_path):
    backend = get_backend("pytorch", threads=1)
    plan = BuildPlan(
        tiny_arch, widths=(1.0, 0.5), prompt_lens=(16,), contexts=(16, 32), method="calibrated", decode_steps=4
    )
    table = load_table(run_build(plan, backend, tmp_path, FAST_PROTOCOL).path)
    # prefill 16, decode 16 and 32; a tiny model's decode difference may come out <= 0 and leave a group unfitted
    fitted = table.meta.fit
    assert table.meta.method == "calibrated" and "prefill" in {g["phase"] for g in fitted} and len(fitted) >= 2
    layers = table.frame[table.frame.component == "layer"]
    assert set(layers.method) == {"calibrated"} and len(layers) == 3 * len(fitted)  # 3 shapes on the two axes
    assert all(g["scale"] > 0 for g in fitted)
    predictor = Predictor(table)
    for subnet in plan.calibration_subnets():
        row = table.ok[(table.ok.subnet_id == subnet.id) & (table.ok.phase == "prefill")].iloc[0]
        predicted, _ = predictor.phase_ms(subnet, "prefill", 1, 16, 0)
        assert np.isclose(predicted, row.median_ms, rtol=0.5)  # tiny models: noisy, but the same scale
    three = predictor.phase_ms(Subnet.uniform(tiny_arch, 3, 1.0), "decode", 1, 1, 24)[0]
    two = predictor.phase_ms(Subnet.uniform(tiny_arch, 2, 1.0), "decode", 1, 1, 24)[0]
    assert three > two > 0  # an unmeasured shape, composed from the calibrated layer rows
