import itertools

import pytest
from conftest import synthetic_lut
from hypothesis import given, settings
from hypothesis import strategies as st

from amoeba_profile.core.errors import InfeasibleBudget, UsageError
from amoeba_profile.core.quality import retained_params
from amoeba_profile.core.subnet import DesignSpace, LayerShape, Subnet
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.picker import best_within, evaluate, pareto_front, select, table_space, table_workload
from amoeba_profile.selection.predict import Predictor


def attn(heads, phase, context):
    return 0.3 * heads if phase == "prefill" else 0.05 * heads + 0.001 * context


def mlp(ffn, phase):
    return 0.01 * ffn if phase == "prefill" else 0.004 * ffn


def base(phase, context):
    return 2.0 if phase == "prefill" else 0.5


@pytest.fixture
def setup(tiny_arch):
    lut = synthetic_lut(tiny_arch, attn, mlp, base, contexts=(16, 64), prompt_len=16)
    space = DesignSpace(tiny_arch, (2, 3, 4), (1.0, 0.75, 0.5))
    return Predictor(lut), space, Workload(1, 16, 20)


def brute_force(predictor, subnets, workload, metric, budget):
    best = None
    for subnet in subnets:
        latency = predictor.predict(subnet, workload).metric(metric)
        quality = retained_params(subnet)
        if latency <= budget and (best is None or (quality, -latency) > best[0]):
            best = ((quality, -latency), subnet)
    return best and best[1]


@pytest.mark.parametrize("metric", ["ttft_ms", "tpot_ms", "e2e_ms"])
def test_pick_matches_brute_force(setup, metric):
    predictor, space, workload = setup
    subnets = list(space.subnets())
    latencies = sorted(predictor.predict(s, workload).metric(metric) for s in subnets)
    for budget in latencies:
        chosen = select(predictor, subnets, workload, metric, budget)
        assert chosen.pick.subnet == brute_force(predictor, subnets, workload, metric, budget)
        assert chosen.pick.latency_ms <= budget


@settings(max_examples=40, deadline=None)
@given(budget=st.floats(0.1, 200.0))
def test_never_exceeds_budget_on_per_layer_space(budget):
    from amoeba_profile.core.arch import ModelArch

    tiny_arch = ModelArch("tiny", 64, 4, 8, 4, 8, 128, 256)
    lut = synthetic_lut(tiny_arch, attn, mlp, base, contexts=(16, 64), prompt_len=16)
    predictor, workload = Predictor(lut), Workload(1, 16, 20)
    options = [(8, 4, 128), (4, 2, 64)]
    subnets = [
        Subnet(tiny_arch, tuple(LayerShape(i, *o) for i, o in zip((0, 3), combo)))
        for combo in itertools.product(options, repeat=2)
    ]
    try:
        chosen = select(predictor, subnets, workload, "e2e_ms", budget)
    except InfeasibleBudget:
        assert all(predictor.predict(s, workload).e2e_ms > budget for s in subnets)
        return
    assert chosen.pick.latency_ms <= budget
    assert all(c.latency_ms <= budget for c in chosen.top_k)


def test_infeasible_budget_names_fastest(setup):
    predictor, space, workload = setup
    with pytest.raises(InfeasibleBudget, match=r"fastest is \d+\.\d ms: 2 layers, width 1/2"):
        select(predictor, space.subnets(), workload, "tpot_ms", 0.01)


def test_pareto_front_is_monotone(setup):
    predictor, space, workload = setup
    candidates, skipped = evaluate(predictor, space.subnets(), workload, "tpot_ms")
    assert not skipped
    front = pareto_front(candidates)
    assert [c.latency_ms for c in front] == sorted(c.latency_ms for c in front)
    assert [c.quality for c in front] == sorted(c.quality for c in front)
    for cand in candidates:  # every shape is dominated by (or is) a front member
        assert any(f.latency_ms <= cand.latency_ms and f.quality >= cand.quality for f in front)


def test_selection_json_shape(setup):
    predictor, space, workload = setup
    data = select(predictor, space.subnets(), workload, "tpot_ms", 100.0, top_k=3).to_dict()
    assert data["subnet"]["num_layers"] == 4 and data["subnet"]["width_ratio"] == 1.0
    assert data["subnet"]["kept_layers"] == [0, 1, 2, 3]
    assert {"heads", "kv_heads", "ffn", "index"} <= set(data["subnet"]["layers"][0])
    assert data["predicted_ms"]["source"] in ("measured", "interpolated")
    assert data["metric"] == "tpot_ms" and data["budget_ms"] == 100.0 and len(data["top_k"]) == 3
    assert "proxy" in data["quality_source"]


def test_selection_json_refers_to_subnets_by_id(setup):
    predictor, space, workload = setup
    selection = select(predictor, space.subnets(), workload, "tpot_ms", 100.0, top_k=3)
    data = selection.to_dict()
    listed = data["top_k"] + data["pareto"]
    assert all("subnet" not in entry and entry["subnet_id"] in data["subnets"] for entry in listed)
    assert set(data["subnets"]) == {entry["subnet_id"] for entry in listed}
    full = Subnet.uniform(space.arch, 4, 1.0)
    assert data["subnets"][full.id] == {
        "id": full.id,
        "label": "L4-w1.000",
        "num_layers": 4,
        "width_ratio": 1.0,
        "kept_layers": [0, 1, 2, 3],
        "layer_runs": [{"layers": [0, 1, 2, 3], "heads": 8, "kv_heads": 4, "ffn": 128}],
    }
    assert [e["fits"] for e in data["pareto"]] == [c.latency_ms <= 100.0 for c in selection.pareto]
    # The pick's prediction is an object with value, source and uncertainty, as every listed entry's is.
    assert (
        set(data["predicted_ms"])
        == {"value", "source", "se", "interval_90", "p_within_budget"}
        == set(data["top_k"][0]["predicted_ms"])
    )
    without = selection.to_dict(pareto=False)
    assert "pareto" not in without and set(without["subnets"]) == {e["subnet_id"] for e in data["top_k"]}


def test_metric_spellings_and_unknown_metric(setup):
    predictor, space, workload = setup
    short = select(predictor, space.subnets(), workload, "tpot", 100.0)
    assert (
        short.metric == "tpot_ms" and short.pick == select(predictor, space.subnets(), workload, "tpot_ms", 100.0).pick
    )
    with pytest.raises(UsageError, match="unknown metric 'latency'"):
        select(predictor, space.subnets(), workload, "latency", 100.0)


def test_bad_requests(setup):
    predictor, space, _ = setup
    with pytest.raises(UsageError, match="gen-len"):
        select(predictor, space.subnets(), Workload(1, 16, 1), "tpot_ms", 10)
    with pytest.raises(UsageError, match="positive"):
        select(predictor, space.subnets(), Workload(1, 16, 4), "tpot_ms", -1)


def test_quality_proxy(tiny_arch):
    assert retained_params(Subnet.uniform(tiny_arch, 4, 1.0)) == pytest.approx(1.0)
    assert retained_params(Subnet.uniform(tiny_arch, 2, 1.0)) == pytest.approx(0.5)
    assert retained_params(Subnet.uniform(tiny_arch, 4, 0.5)) < 0.55


def _flag(lut, flags, **where):
    mask = True
    for column, value in where.items():
        mask = mask & (lut.frame[column] == value)
    lut.frame.loc[mask, "flags"] = flags
    return list(lut.frame.index[mask])


def test_pick_lists_the_flagged_rows_it_rests_on(tiny_arch):
    from amoeba_profile.table.lut import Lut

    lut = synthetic_lut(tiny_arch, attn, mlp, base, contexts=(16, 64), prompt_len=16)
    attn_row = _flag(lut, "high_cv;contended", component="attn", phase="decode", heads=8, context=64)[0]
    mlp_row = _flag(lut, "high_cv", component="mlp", phase="decode", ffn=64)[0]
    _flag(lut, "high_cv", component="attn", phase="decode", heads=4)  # neither shape reads these
    base_row = _flag(lut, "host_bound", component="base", phase="prefill")[0]  # the flow's nature: not warned
    lut = Lut(lut.frame, lut.meta)
    space = DesignSpace(tiny_arch, (2, 3, 4), (1.0, 0.75, 0.5))
    chosen = select(Predictor(lut), space.subnets(), Workload(1, 16, 20), "tpot_ms", 100.0)
    assert chosen.pick.subnet.num_layers == 4 and chosen.pick.subnet.width_ratio == 1.0
    # The runner-up (6 heads, FFN 96) interpolates its MLP between the 64 and 128 rows.
    assert chosen.top_k[1].subnet.width_ratio == 0.75
    lines = {who: {r["line"] - 2: r["flags"] for r in rows} for who, rows in chosen.flagged.items()}
    # A tpot answer rests on decode rows only: the flagged prefill row is not behind it.
    assert lines == {"pick": {attn_row: ["high_cv", "contended"]}, "runner_up": {mlp_row: ["high_cv"]}}
    e2e = select(Predictor(lut), space.subnets(), Workload(1, 16, 20), "e2e_ms", 10_000.0)
    assert base_row in {r["line"] - 2 for r in e2e.flagged["pick"]}
    assert chosen.flagged["pick"][0]["row"].startswith("attn|decode|b1|t1|c64|h8")
    assert chosen.warning == (
        "the pick rests on 1 disturbed rows (contended 1, high_cv 1); the runner-up rests on "
        "1 disturbed rows (high_cv 1); its latencies may be off - rebuild the table on an idle "
        "machine (build-lut --busy wait) before relying on it"
    )
    data = chosen.to_dict()
    assert data["flagged_rows"] == chosen.flagged and data["measurement_warning"] == chosen.warning
    # Rows that are only noisy call for more samples, not an idle machine: a build without --quick
    # takes more where the table was measured with fewer rounds than a default build; where it was
    # measured in full, only a quieter machine helps.
    noisy = synthetic_lut(tiny_arch, attn, mlp, base, contexts=(16, 64), prompt_len=16)
    _flag(noisy, "high_cv", component="attn", phase="decode", heads=8, context=64)
    noisy.frame["rounds"], noisy.frame["n"] = 3, 21  # the default protocol's 3 rounds x 7 samples
    chosen = select(Predictor(Lut(noisy.frame, noisy.meta)), space.subnets(), Workload(1, 16, 20), "tpot_ms", 100.0)
    assert chosen.warning == (
        "the pick rests on 1 disturbed rows (high_cv 1); its latencies may be off - rebuild the "
        "table on a quieter machine before relying on it"
    )
    noisy.frame["rounds"], noisy.frame["n"] = 2, 8  # --quick: 2 rounds x 4 samples
    chosen = select(Predictor(Lut(noisy.frame, noisy.meta)), space.subnets(), Workload(1, 16, 20), "tpot_ms", 100.0)
    assert chosen.warning == (
        "the pick rests on 1 disturbed rows (high_cv 1); its latencies may be off - build the "
        "table again without --quick (it re-measures the rows holding fewer rounds) or on a "
        "quieter machine before relying on it"
    )


def test_clean_or_informative_rows_give_no_warning(setup, tiny_arch):
    predictor, space, workload = setup
    chosen = select(predictor, space.subnets(), workload, "tpot_ms", 100.0)
    assert chosen.flagged == {"pick": [], "runner_up": []} and chosen.warning is None
    lut = synthetic_lut(tiny_arch, attn, mlp, base, contexts=(16, 64), prompt_len=16)
    _flag(lut, "host_bound", component="base")
    chosen = select(Predictor(lut), space.subnets(), workload, "tpot_ms", 100.0)
    assert chosen.flagged["pick"] and chosen.warning is None


def test_best_within_is_the_pick_select_makes(setup):
    """The plot's pick for a budget, from already evaluated shapes, is the one select returns."""
    predictor, space, workload = setup
    candidates, _ = evaluate(predictor, space.subnets(), workload, "tpot_ms")
    latencies = sorted(c.latency_ms for c in candidates)
    for budget in latencies:
        assert best_within(candidates, budget) == select(predictor, space.subnets(), workload, "tpot_ms", budget).pick
    assert best_within(candidates, latencies[0] / 2) is None


def test_table_space_and_workload_come_from_the_table(tiny_arch, tmp_path):
    from test_strategy import write_strategy

    from amoeba_profile.core.strategy import Strategy

    lut = synthetic_lut(
        tiny_arch, attn, mlp, base, meta={"grid": {"widths": [1.0, 0.5], "batch": 2, "drop_rule": "uniform"}}
    )
    assert table_space(lut) == list(DesignSpace.amoeba(tiny_arch, (1.0, 0.5), drop_rule="uniform").subnets())
    assert {s.width_ratio for s in table_space(lut, (0.75,))} == {0.75}
    path = write_strategy(tmp_path / "s.npy")
    assert table_space(lut, strategy=path) == Strategy.load(path, tiny_arch).subnets()
    assert [s.width_ratio for s in table_space(lut, (0.8,), path)] == [0.8] * 3
    assert table_workload(lut, 16, 20) == Workload(2, 16, 20) and table_workload(lut, 16, 20, batch=1).batch == 1


@pytest.mark.parametrize(
    "prompts, contexts, given, expected",
    [
        ([128], [128, 256, 512], (None, None), (128, 128)),  # the README's grid: 128/128 as before
        ([16], [16, 64], (None, None), (16, 50)),  # decode steps at contexts 16..64
        ([16, 256], [64, 512], (None, None), (128, 128)),  # 128 interpolates between prompts and contexts
        ([32, 64], [64, 128], (None, 10), (64, 10)),  # 32 is outside the contexts: the shortest usable prompt
        ([16], [16, 64], (16, 30), (16, 30)),  # given values are kept
        ([16], [16, 64], (64, None), (64, 2)),  # tpot needs a step even at the last context
    ],
)
def test_a_request_defaults_to_what_the_table_covers(tiny_arch, prompts, contexts, given, expected):
    lut = synthetic_lut(
        tiny_arch, attn, mlp, base, meta={"grid": {"prompt_lens": prompts, "contexts": contexts, "batch": 2}}
    )
    workload = table_workload(lut, *given)
    assert (workload.batch, workload.prompt_len, workload.gen_len) == (2, *expected)
