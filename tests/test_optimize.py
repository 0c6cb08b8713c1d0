import itertools
from pathlib import Path

import numpy as np
import pytest
from amoeba_profile.backends import Capabilities
from amoeba_profile.backends.flows import flow_capabilities
from conftest import synthetic_lut

from amoeba_profile.core.arch import ModelArch, layer_params
from amoeba_profile.core.errors import InfeasibleBudget
from amoeba_profile.core.schema import meta_fields
from amoeba_profile.core.subnet import LayerShape, Subnet, kept_layers
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.memory import estimate
from amoeba_profile.selection.optimize import optimize_per_layer, shared_part, solve_counts, table_options
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import load_one

LUT = Path(__file__).resolve().parent.parent / "lut"
FREE = Capabilities(per_layer_heads=True, per_layer_ffn=True, methods=(), dtypes=(), devices=())
ONE_HEAD_COUNT = Capabilities(per_layer_heads=False, per_layer_ffn=True, methods=(), dtypes=(), devices=())
UNIFORM = Capabilities(per_layer_heads=False, per_layer_ffn=False, methods=(), dtypes=(), devices=())


def _lut(arch):
    return synthetic_lut(
        arch,
        lambda h, p, c: 0.3 * h if p == "prefill" else 0.05 * h + 0.001 * c,
        lambda f, p: 0.01 * f if p == "prefill" else 0.0043 * f,
        lambda p, c: 2.0 if p == "prefill" else 0.5,
    )


def brute(predictor, arch, depths, workload, metric, budget, weights, memory_gb=None, capabilities=FREE):
    options = table_options(predictor)
    full = layer_params(arch, arch.num_heads, arch.num_kv_heads, arch.ffn_size)
    best = None
    for depth in depths:
        kept = kept_layers(arch, depth)
        for combo in itertools.product(options, repeat=len(kept)):
            if len({shared_part(capabilities, o) for o in combo}) > 1:
                continue
            subnet = Subnet(arch, tuple(LayerShape(i, *o) for i, o in zip(kept, combo)))
            latency = predictor.predict(subnet, workload).metric(metric)
            if latency > budget + 1e-9:
                continue
            if memory_gb is not None and estimate(subnet, workload, "float32").total_gb > memory_gb:
                continue
            quality = sum(weights[i] * layer_params(arch, *o) / full for i, o in zip(kept, combo)) / weights.sum()
            if best is None or quality > best + 1e-12:
                best = quality
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_layer_optimum_matches_brute_force(tiny_arch, seed):
    rng = np.random.default_rng(seed)
    predictor, workload = Predictor(_lut(tiny_arch)), Workload(1, 16, 20)
    weights = rng.random(tiny_arch.num_layers) + 0.1 if seed else np.ones(tiny_arch.num_layers)
    options = table_options(predictor)
    assert len(options) == 8  # 4 attention widths x 2 FFN widths
    smallest = Subnet(tiny_arch, tuple(LayerShape(i, 2, 1, 64) for i in kept_layers(tiny_arch, 3)))
    low = predictor.predict(smallest, workload).tpot_ms
    high = predictor.predict(Subnet.uniform(tiny_arch, 4, 1.0), workload).tpot_ms
    for budget in np.linspace(low, high, 5):
        result = optimize_per_layer(predictor, tiny_arch, [3, 4], workload, "tpot_ms", budget, importance=weights)
        assert result.latency_ms <= budget + 1e-9
        assert predictor.predict(result.subnet, workload).tpot_ms == pytest.approx(result.latency_ms)
        assert result.source == predictor.predict(result.subnet, workload).source_of("tpot")
        assert result.quality == pytest.approx(
            brute(predictor, tiny_arch, [3, 4], workload, "tpot_ms", budget, weights)
        )


def test_memory_constraint_matches_brute_force(tiny_arch):
    predictor, workload = Predictor(_lut(tiny_arch)), Workload(1, 16, 20)
    weights = np.ones(tiny_arch.num_layers)
    full = estimate(Subnet.uniform(tiny_arch, 4, 1.0), workload, "float32").total_gb
    limit = full * 0.9
    result = optimize_per_layer(predictor, tiny_arch, [4], workload, "e2e_ms", 1e6, memory_gb=limit, dtype="float32")
    assert estimate(result.subnet, workload, "float32").total_gb <= limit
    assert result.quality == pytest.approx(brute(predictor, tiny_arch, [4], workload, "e2e_ms", 1e6, weights, limit))


def test_infeasible_per_layer_budget(tiny_arch):
    with pytest.raises(InfeasibleBudget, match=r"no per-layer shape \(heads and FFN per layer\) fits"):
        optimize_per_layer(Predictor(_lut(tiny_arch)), tiny_arch, [4], Workload(1, 16, 20), "tpot_ms", 0.01)


def test_counts_solver_pairs_best_options_with_heaviest_layers():
    frac = np.array([1.0, 0.5])
    cost = np.array([3.0, 1.0])
    counts = solve_counts(frac, [cost], [3 * 1 + 1 * 2], np.array([5.0, 1.0, 1.0]))
    assert counts.tolist() == [1, 2]
    assert solve_counts(frac, [cost], [2.0], np.ones(3)) is None


def _smallest(arch):
    return Subnet(arch, tuple(LayerShape(i, 2, 1, 64) for i in kept_layers(arch, 3)))


def _heads(subnet):
    return {layer.heads for layer in subnet.layers}


@pytest.mark.parametrize("capabilities", [ONE_HEAD_COUNT, UNIFORM])
def test_shared_shape_rules_match_brute_force(tiny_arch, capabilities):
    predictor, workload = Predictor(_lut(tiny_arch)), Workload(1, 16, 20)
    weights = np.random.default_rng(3).random(tiny_arch.num_layers) + 0.1
    low = predictor.predict(_smallest(tiny_arch), workload).tpot_ms
    high = predictor.predict(Subnet.uniform(tiny_arch, 4, 1.0), workload).tpot_ms
    for budget in np.linspace(low, high, 5):
        result = optimize_per_layer(
            predictor, tiny_arch, [3, 4], workload, "tpot_ms", budget, importance=weights, capabilities=capabilities
        )
        assert len({shared_part(capabilities, (l.heads, l.kv_heads, l.ffn)) for l in result.subnet.layers}) == 1
        assert result.quality == pytest.approx(
            brute(predictor, tiny_arch, [3, 4], workload, "tpot_ms", budget, weights, capabilities=capabilities)
        )


def test_pytorch_table_may_mix_heads_across_layers(tiny_arch):
    predictor, workload = Predictor(_lut(tiny_arch)), Workload(1, 16, 20)
    assert predictor.lut.meta.backend == "pytorch" and flow_capabilities("pytorch").per_layer_heads
    low = predictor.predict(_smallest(tiny_arch), workload).tpot_ms
    high = predictor.predict(Subnet.uniform(tiny_arch, 4, 1.0), workload).tpot_ms
    picks = [
        optimize_per_layer(predictor, tiny_arch, [3, 4], workload, "tpot_ms", b).subnet
        for b in np.linspace(low, high, 7)
    ]
    assert any(len(_heads(p)) > 1 for p in picks)


def _shipped(flow_dir):
    table = load_one(LUT / flow_dir)
    return table, Predictor(table), ModelArch.from_dict(table.meta.arch)


def test_tensorrt_llm_table_gets_one_query_head_count():
    table, predictor, arch = _shipped("rtx-a5000/tensorrt-llm")
    assert table.meta.backend == "tensorrt-llm"
    workload, depths = Workload(1, 128, 128), [30, 31, 32]
    free = optimize_per_layer(predictor, arch, depths, workload, "tpot_ms", 20.0, capabilities=FREE)
    assert len(_heads(free.subnet)) > 1  # the table alone would mix head counts
    result = optimize_per_layer(predictor, arch, depths, workload, "tpot_ms", 20.0)
    assert len(_heads(result.subnet)) == 1 and result.latency_ms <= 20.0
    assert len({l.ffn for l in result.subnet.layers}) > 1  # FFN still per layer (ffn_mult)
    assert result.shape_rule == "one head count for all layers, FFN per layer"


def test_mlc_llm_table_gets_a_uniform_shape():
    table, predictor, arch = _shipped("orin-nx-16gb/mlc-llm")
    assert table.meta.backend == "mlc-llm"
    workload, depths = Workload(1, 128, 128), [20, 21, 22, 23]
    free = optimize_per_layer(predictor, arch, depths, workload, "tpot_ms", 80.0, capabilities=FREE)
    assert len({(l.heads, l.ffn) for l in free.subnet.layers}) > 1
    result = optimize_per_layer(predictor, arch, depths, workload, "tpot_ms", 80.0)
    assert result.subnet.is_uniform and result.latency_ms <= 80.0


@pytest.mark.parametrize(
    "rows, message",
    [
        ("0,1\n1,inf\n2,1\n3,1\n", "line 3: importance must be a finite number, got inf"),
        ("0,0\n1,0\n2,0\n3,0\n", "every importance is 0"),
        ("0,1\n1.5,1\n2,1\n3,1\n", "line 3: layer must be an integer >= 0, got 1.5"),
        ("0,1\n1,-2\n2,1\n3,1\n", "line 3: importance must be >= 0, got -2"),
        ("0,1\n1,1\n2,1\n9,1\n", r"line 5: layer 9 outside 0..3"),
        ("0,1\n1,1\n2,1\n", r"missing layers \[3\]"),
    ],
)
def test_importance_file_is_refused_unless_every_row_is_sound(tmp_path, tiny_arch, rows, message):
    from amoeba_profile.core.errors import UsageError
    from amoeba_profile.selection.optimize import load_importance

    path = tmp_path / "importance.csv"
    path.write_text("layer,importance\n" + rows)
    with pytest.raises(UsageError, match=message) as info:
        load_importance(path, tiny_arch)
    assert str(info.value).startswith(str(path))


def test_importance_file_with_whole_layers_in_float_form(tmp_path, tiny_arch):
    from amoeba_profile.selection.optimize import load_importance

    path = tmp_path / "importance.csv"
    path.write_text("layer,importance\n0,1\n1.0,2\n2,0.5\n3,0\n")
    assert load_importance(path, tiny_arch).tolist() == [1.0, 2.0, 0.5, 0.0]


def test_optimize_selection_answers_the_selections_request(tiny_arch, tmp_path):
    """What `select --per-layer` prints, from Python: the optimum over the design space's depths for the
    selection's workload, metric and budget, with its gain over the uniform pick."""
    from amoeba_profile.selection.optimize import optimize_selection
    from amoeba_profile.selection.picker import select, table_space
    from amoeba_profile.table.lut import Lut

    lut = _lut(tiny_arch)
    lut = Lut(lut.frame, {**meta_fields(lut.meta), "dtype": "float32"})
    workload = Workload(1, 16, 20)
    selection = select(Predictor(lut), table_space(lut), workload, "tpot", 3.0)
    pick = optimize_selection(lut, selection)
    direct = optimize_per_layer(Predictor(lut), tiny_arch, [3, 4], workload, "tpot_ms", 3.0, dtype="float32")
    assert pick.result == direct and pick.quality_model == "proxy: retained parameters"
    assert (
        pick.gain_over_uniform == pytest.approx(direct.quality - selection.pick.quality) and pick.gain_over_uniform >= 0
    )
    assert (
        pick.to_dict()["subnet"] == direct.subnet.to_dict()
        and pick.to_dict()["predicted_ms"]["value"] == direct.latency_ms
    )
    importance = tmp_path / "importance.csv"
    importance.write_text("layer,importance\n0,4\n1,1\n2,1\n3,4\n")
    weighted = optimize_selection(lut, selection, importance)
    assert weighted.quality_model == "per-layer importance from file"
    # the uniform pick scored by the same weights: (4 + 1 + 1 + 4) x its layers' share of the full layer / 10
    share = selection.pick.quality  # uniform: every kept layer has the same share, and it keeps all 4 layers here
    assert selection.pick.subnet.num_layers == 4
    assert weighted.uniform_quality == pytest.approx(share)
    assert weighted.gain_over_uniform == pytest.approx(weighted.result.quality - share)
    assert weighted.result == optimize_per_layer(
        Predictor(lut),
        tiny_arch,
        [3, 4],
        workload,
        "tpot_ms",
        3.0,
        importance=np.array([4.0, 1, 1, 4]),
        dtype="float32",
    )
