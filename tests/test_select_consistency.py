"""Every command that selects answers the same question the same way: measured whole models outrank
composition, validate and plot rank with select's options, and --per-layer compares, restricts and
exports what it prints."""

import json
import sys

import pytest
from conftest import synthetic_lut

from amoeba_profile.cli import main as cli
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import Measurement
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.picker import evaluate, select, table_space
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import Lut, frame_rows, load_table, measured_row, rows_frame, write_table

WORKLOAD = Workload(1, 16, 20)  # decode steps at contexts 16..34, inside the tables' 16 and 64


def run_main(monkeypatch, capsys, *args):
    """(exit code, stdout, stderr) of ``amoeba-profile ARGS`` through the entry point, in-process."""
    monkeypatch.setattr(sys, "argv", ["amoeba-profile", *args])
    monkeypatch.setitem(cli._state, "debug", False)
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def _table(arch, meta=None):
    # attention 0.1 ms per head, MLP 1 us per channel, base 1 ms: full model tpot = 1 + 4 x (0.8 + 0.128)
    return synthetic_lut(
        arch,
        lambda h, p, c: 0.1 * h,
        lambda f, p: 0.001 * f,
        lambda p, c: 1.0,
        meta={"dtype": "float32", "device_slug": "cpu-test", **(meta or {})},
    )


def _with_models(lut, subnet, prefill_ms, decode_ms, contexts=(16, 64)):
    """``lut`` plus measured model rows of ``subnet`` (as validate writes them back)."""

    def row(entry, value):
        return measured_row(entry, Measurement.from_samples([value] * 3), "ok", method="whole", repeat=1, wall_s=0.0)

    rows = [row(Entry("model", "prefill", 1, 16, 0, subnet=subnet), prefill_ms)] if prefill_ms is not None else []
    rows += [row(Entry("model", "decode", 1, 1, c, subnet=subnet), decode_ms) for c in contexts]
    frame = rows_frame(frame_rows(lut.frame) + rows)
    return Lut(frame, lut.meta)


def test_measured_model_rows_outrank_composition(tiny_arch):
    lut = _table(tiny_arch)
    full = Subnet.uniform(tiny_arch, 4, 1.0)
    composed = Predictor(lut).predict(full, WORKLOAD)
    assert composed.tpot_ms == pytest.approx(4.712) and composed.tpot_source == "interpolated"
    assert select(Predictor(lut), table_space(lut), WORKLOAD, "tpot", 4.8).pick.subnet == full
    # validate measured the full model at 5.0 ms per decode step: it breaks a 4.8 ms budget
    measured = _with_models(lut, full, 7.0, 5.0)
    prediction = Predictor(measured).predict(full, WORKLOAD)
    assert (prediction.ttft_ms, prediction.tpot_ms) == (pytest.approx(7.0), pytest.approx(5.0))
    assert prediction.source == prediction.tpot_source == prediction.ttft_source == "measured"
    model_rows = set(measured.frame.index[measured.frame.component == "model"])
    assert set(prediction.rows) == model_rows  # what the answer rests on: the model rows alone
    again = select(Predictor(measured), table_space(measured), WORKLOAD, "tpot", 4.8)
    assert again.pick.subnet != full and again.pick.latency_ms <= 4.8
    candidates, _ = evaluate(Predictor(measured), [full], WORKLOAD, "tpot")
    assert (candidates[0].latency_ms, candidates[0].source) == (pytest.approx(5.0), "measured")
    # composition on request (validate's fresh-components prediction), and for every other shape
    assert Predictor(measured, whole_models=False).predict(full, WORKLOAD).tpot_ms == pytest.approx(4.712)
    other = Subnet.uniform(tiny_arch, 3, 1.0)
    assert Predictor(measured).predict(other, WORKLOAD) == Predictor(lut).predict(other, WORKLOAD)


def test_model_rows_answer_only_the_phases_they_cover(tiny_arch):
    lut = _table(tiny_arch)
    full = Subnet.uniform(tiny_arch, 4, 1.0)
    composed = Predictor(lut).predict(full, WORKLOAD)
    # decode measured at 32 and 64 only: steps at contexts 16..34 leave the span, so decode is composed
    partial = Predictor(_with_models(lut, full, 7.0, 5.0, contexts=(32, 64))).predict(full, WORKLOAD)
    assert (partial.ttft_ms, partial.ttft_source) == (pytest.approx(7.0), "measured")
    assert (partial.tpot_ms, partial.tpot_source) == (pytest.approx(composed.tpot_ms), "interpolated")
    assert partial.source == "interpolated"


def test_select_cli_shows_the_measured_model(tiny_arch, tmp_path, monkeypatch, capsys):
    full = Subnet.uniform(tiny_arch, 4, 1.0)
    lut = _with_models(_table(tiny_arch, {"backend": "pytorch"}), full, 7.0, 5.0)
    table = tmp_path / "tiny-float32.csv"
    write_table(table, lut.frame, lut.meta)
    args = ("select", "--lut", str(table), "--prompt-len", "16", "--gen-len", "20")
    code, out, err = run_main(monkeypatch, capsys, *args, "--budget-ms", "4.8", "--json")
    assert code == 0, err
    assert json.loads(out)["subnet_id"] != full.id
    code, out, err = run_main(monkeypatch, capsys, *args, "--budget-ms", "6", "--json")
    data = json.loads(out)
    assert data["subnet_id"] == full.id and {k: data["predicted_ms"][k] for k in ("value", "source")} == {
        "value": pytest.approx(5.0),
        "source": "measured",
    }
    code, out, err = run_main(monkeypatch, capsys, *args, "--budget-ms", "6")
    assert "predicted tpot_ms = 5.0 ms (median, measured" in out


@pytest.fixture
def ranked(tiny_arch, tmp_path):
    """A table whose p90 rows are twice their medians, and a quality CSV that prefers narrow shapes
    (the proxy prefers wide ones): rankings that differ by option are easy to tell apart."""
    lut = _table(tiny_arch, {"backend": "pytorch"})
    lut.frame["p90_ms"] = 2 * lut.frame["median_ms"]
    table = tmp_path / "tiny-float32.csv"
    write_table(table, lut.frame, lut.meta)
    quality = tmp_path / "quality.csv"
    quality.write_text("num_layers,width_ratio,score\n3,1,0.5\n4,1,0.6\n3,1/2,0.9\n4,1/2,0.8\n")
    return table, quality


def test_validate_measures_the_ranking_select_prints(ranked, tiny_arch, monkeypatch, capsys):
    """validate takes select's ranking options: --quality and --memory-gb change what it measures."""
    import amoeba_profile.measure.validate as validate
    from amoeba_profile.core.errors import AmoebaError

    table, quality = ranked
    measured = []

    def capture(path, selection, *args, **kwargs):
        measured.append(selection)
        raise AmoebaError("captured before measuring")

    monkeypatch.setattr(validate, "measure_picks", capture)
    ranking = (
        "--lut",
        str(table),
        "--budget-ms",
        "100",
        "--prompt-len",
        "16",
        "--gen-len",
        "20",
        "--quality",
        str(quality),
        "--memory-gb",
        "0.0007",
        "--stat",
        "p90",
        "--batch",
        "1",
    )
    code, out, err = run_main(monkeypatch, capsys, "select", *ranking, "--top-k", "3", "--json")
    assert code == 0, err
    chosen = json.loads(out)
    code, _, err = run_main(monkeypatch, capsys, "validate", *ranking, "--top-k", "3")
    assert code == 1 and "captured before measuring" in err
    [selection] = measured
    assert [c.subnet.id for c in selection.top_k] == [c["subnet_id"] for c in chosen["top_k"]]
    assert selection.pick.subnet.id == chosen["subnet_id"] and selection.pick.subnet.layers[0].heads == 4  # narrow
    assert selection.quality_source == chosen["quality_source"] and selection.stat == "p90"
    assert selection.memory_gb == 0.0007 and all(c.memory.total_gb <= 0.0007 for c in selection.top_k)
    narrow, wide = (Subnet.uniform(tiny_arch, depth, 0.5) for depth in (3, 4)), Subnet.uniform(tiny_arch, 3, 1.0)
    assert [c.subnet.id for c in selection.top_k] == [*(s.id for s in narrow), wide.id]  # 4 x 1 is over 0.0007 GB


def test_plot_draws_the_ranking_select_prints(ranked, tmp_path, monkeypatch, capsys):
    """plot takes --stat, --widths and --memory-gb: its candidates and pick are select's."""
    import amoeba_profile.cli.plots as plots

    table, quality = ranked
    drawn = {}

    def capture(lut, candidates, metric, out, budget_ms=None, pick=None, quality_name=""):
        drawn.update(candidates=candidates, pick=pick, quality_name=quality_name)
        return out

    monkeypatch.setattr(plots, "plot_pareto", capture)
    ranking = (
        "--lut",
        str(table),
        "--budget-ms",
        "10",
        "--prompt-len",
        "16",
        "--gen-len",
        "20",
        "--stat",
        "p90",
        "--widths",
        "1",
        "--memory-gb",
        "0.0007",
        "--quality",
        str(quality),
    )
    code, out, err = run_main(monkeypatch, capsys, "select", *ranking, "--json")
    assert code == 0, err
    chosen = json.loads(out)
    code, out, err = run_main(monkeypatch, capsys, "plot", *ranking, "--out", str(tmp_path / "plots"))
    assert code == 0, err
    assert (
        drawn["pick"].subnet.id == chosen["subnet_id"] and drawn["pick"].latency_ms == chosen["predicted_ms"]["value"]
    )
    assert {c.subnet.layers[0].heads for c in drawn["candidates"]} == {8}  # --widths 1 only
    assert all(c.memory.total_gb <= 0.0007 for c in drawn["candidates"])
    lut = load_table(table)
    for cand in drawn["candidates"]:  # p90 rows: twice the medians
        assert cand.latency_ms == pytest.approx(Predictor(lut).predict(cand.subnet, WORKLOAD, "p90").tpot_ms)
        assert cand.latency_ms == pytest.approx(2 * Predictor(lut).predict(cand.subnet, WORKLOAD).tpot_ms)
    assert drawn["quality_name"] == chosen["quality_source"]
    code, _, err = run_main(
        monkeypatch, capsys, "plot", "--lut", str(table), "--memory-gb", "nan", "--out", str(tmp_path / "plots")
    )
    assert code == 2 and "--memory-gb must be a finite number" in err


@pytest.fixture
def mixed(tiny_arch, tmp_path):
    """A pytorch table where the per-layer optimum at 4.5 ms keeps 3 full layers and narrows one to 4
    query heads: full layers cost 0.928 ms, (4 heads, FFN 128) 0.528 ms, base 1 ms, so 4 full
    layers (4.712 ms) miss the budget by 0.212 ms."""
    table = tmp_path / "tiny-float32.csv"
    lut = _table(tiny_arch, {"backend": "pytorch"})
    write_table(table, lut.frame, lut.meta)
    return table, (
        "select",
        "--lut",
        str(table),
        "--budget-ms",
        "4.5",
        "--prompt-len",
        "16",
        "--gen-len",
        "20",
        "--per-layer",
    )


def test_per_layer_options_keep_to_widths(mixed, monkeypatch, capsys):
    _, args = mixed
    code, out, err = run_main(monkeypatch, capsys, *args, "--json")
    assert code == 0, err
    free = json.loads(out)["per_layer"]["subnet"]["layers"]
    assert sorted(l["heads"] for l in free) == [4, 8, 8, 8]  # without --widths: the half-width heads too
    code, out, err = run_main(monkeypatch, capsys, *args, "--widths", "1", "--json")
    assert code == 0, err
    per = json.loads(out)["per_layer"]
    assert {(l["heads"], l["kv_heads"], l["ffn"]) for l in per["subnet"]["layers"]} == {(8, 4, 128)}
    assert per["num_layers"] == 3  # 4 full layers do not fit; no narrower option is allowed


def test_gain_over_uniform_compares_one_quality_score(mixed, tiny_arch, tmp_path, monkeypatch, capsys):
    """With --quality the uniform pick ranks by the table's scores; the gain compares both shapes on
    the per-layer model's scale (the retained-parameter proxy), not the proxy against the table."""
    from amoeba_profile.core.quality import retained_params

    _, args = mixed
    quality = tmp_path / "quality.csv"
    quality.write_text("num_layers,width_ratio,score\n3,1,0.5\n4,1,0.6\n3,1/2,0.9\n4,1/2,0.8\n")
    code, out, err = run_main(monkeypatch, capsys, *args, "--quality", str(quality), "--json")
    assert code == 0, err
    data = json.loads(out)
    uniform = Subnet.uniform(tiny_arch, 3, 0.5)
    assert data["subnet_id"] == uniform.id and data["quality"] == 0.9  # ranked by the table's scores
    per = data["per_layer"]
    assert per["uniform_quality"] == pytest.approx(retained_params(uniform))
    assert per["gain_over_uniform"] == pytest.approx(per["quality"] - retained_params(uniform))
    assert per["gain_over_uniform"] > 0.4  # the proxy's 0.958 against the narrow pick's 0.375
    code, out, err = run_main(monkeypatch, capsys, *args, "--quality", str(quality))
    assert f"({per['gain_over_uniform']:+.4f} over the uniform pick, both scored by proxy: retained parameters)" in out


def test_per_layer_export_writes_and_names_the_printed_optimum(mixed, tiny_arch, tmp_path, monkeypatch, capsys):
    _, args = mixed
    args = (*args, "--widths", "1,1/2")  # options: 8 or 4 query heads, FFN 128 or 64
    folder = tmp_path / "pick"
    code, out, err = run_main(monkeypatch, capsys, *args, "--export", str(folder), "--json")
    assert code == 1  # the optimum mixes 4 and 8 query heads: no deployment form holds it
    data = json.loads(out)  # the selection is printed in full all the same
    per = Subnet.from_dict(data["per_layer"]["subnet"])
    assert sorted(l.heads for l in per.layers) == [4, 8, 8, 8]
    assert data["subnet_id"] and data["top_k"] and "exported" not in data
    assert data["export_error"].startswith(
        f"export of the per-layer optimum {per.label} failed: layer 3 has 4 query heads and layer 0 has 8"
    )
    assert err.strip() == f"error: {data['export_error']}" and not folder.exists()
    code, out, err = run_main(monkeypatch, capsys, *args, "--export", str(folder))
    assert code == 1 and "pick: L3-w1.000" in out and f"per-layer optimum: {per.label}, 4 layers" in out
    assert "layers 0-2: 8 heads (4 kv), ffn 128" in out
    assert err.strip().splitlines()[-1] == f"error: {data['export_error']}"
    # where FFN channels cost most (1.28 of a full layer's 1.36 ms), 6 ms keeps 8 heads and halves
    # one FFN: that optimum is exported (DeciLM block_configs), and the output says which shape
    lut = synthetic_lut(
        tiny_arch,
        lambda h, p, c: 0.01 * h,
        lambda f, p: 0.01 * f,
        lambda p, c: 1.0,
        meta={"dtype": "float32", "device_slug": "cpu-test", "backend": "pytorch"},
    )
    table = tmp_path / "ffn-heavy" / "tiny-float32.csv"
    table.parent.mkdir()
    write_table(table, lut.frame, lut.meta)
    heavy = ("select", "--lut", str(table), "--budget-ms", "6", *args[5:], "--export", str(folder))
    code, out, err = run_main(monkeypatch, capsys, *heavy, "--json")
    assert code == 0, err
    data = json.loads(out)
    per = Subnet.from_dict(data["per_layer"]["subnet"])
    assert {l.heads for l in per.layers} == {8} and sorted(l.ffn for l in per.layers) == [64, 128, 128, 128]
    assert data["exported"]["shape"] == "per_layer" and data["exported"]["label"] == per.label
    assert Subnet.from_json((folder / "subnet.json").read_text()) == per
    assert data["subnet"]["num_layers"] == 3  # the uniform pick: another shape, not the one exported
    code, out, err = run_main(monkeypatch, capsys, *heavy)
    assert code == 0 and f"exported the per-layer optimum {per.label} to {folder}: subnet.json" in out


def test_validate_drift_compares_components_with_components(tmp_path, tiny_arch, fake_backend):
    """A pick the table holds model rows of is predicted from them; validate's device drift must
    still set today's components against the stored components, not against that measured model
    (whose gap to composition is the interaction, not drift)."""
    from amoeba_profile.backends import get_backend

    from amoeba_profile.core.timing import TimingProtocol
    from amoeba_profile.measure.artifacts import ArtifactCache
    from amoeba_profile.measure.build import run_build
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.measure.validate import measure_picks

    protocol = TimingProtocol(warmup_min=1, warmup_max=2, rounds=2, samples_per_round=3, min_round_s=0.0)
    narrow = Subnet.uniform(tiny_arch, 4, 0.5)  # heads and FFN both halved: 0.5 ms of interaction per layer
    backend = get_backend("fake-engine", interaction_ms=0.5, noise=0.001)
    plan = BuildPlan(tiny_arch, (1.0, 0.5), (16,), (16, 64), method="difference", depths=(1, 2, 4), whole=(narrow,))
    path = run_build(plan, backend, tmp_path, protocol, artifacts=ArtifactCache(tmp_path / "artifacts")).path
    lut = load_table(path)
    selection = select(Predictor(lut), [narrow], WORKLOAD, "tpot", 1000.0, top_k=1)
    composed = Predictor(lut, whole_models=False).predict(narrow, WORKLOAD).tpot_ms
    assert selection.pick.source == "measured" and selection.pick.latency_ms > composed + 1.5  # 4 x 0.5 ms
    run = measure_picks(path, selection, protocol)
    [checked] = run.validations
    assert checked.measured_ms == pytest.approx(selection.pick.latency_ms, rel=0.05)
    assert checked.fresh_predicted_ms == pytest.approx(composed, rel=0.05)  # composed, though model rows exist
    assert run.drift == pytest.approx(1.0, abs=0.05)  # same fake device: no drift
