"""The difference method and the whole-engine contract, proven on a pure-Python fake engine."""

import math

import pytest
from amoeba_profile.backends import get_backend
from amoeba_profile.backends.base import EngineSpec

from amoeba_profile.core.errors import AmoebaError, LutError, UsageError
from amoeba_profile.core.subnet import LayerShape, Subnet
from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.measure.artifacts import ArtifactCache
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.methods import choose_method
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import entry_key_of_row, load_table

PROTOCOL = TimingProtocol(warmup_min=1, warmup_max=2, rounds=3, samples_per_round=5, min_round_s=0.0)


def _plan(arch, **kw):
    return BuildPlan(arch, (1.0, 0.5), (16, 32), (16, 64), method="difference", depths=(1, 2, 4), **kw)


def _build(tmp_path, arch, backend, **kw):
    return load_table(
        run_build(_plan(arch, **kw), backend, tmp_path, PROTOCOL, artifacts=ArtifactCache(tmp_path / "artifacts")).path
    )


def test_difference_recovers_the_engines_per_layer_costs(tmp_path, tiny_arch, fake_backend):
    lut = _build(tmp_path, tiny_arch, get_backend("fake-engine"))
    layers = lut.ok[lut.ok.component == "layer"]
    # heads axis at full FFN, FFN axis at full heads: (4, 2, 128), (8, 4, 64), (8, 4, 128)
    assert {(r.heads, r.kv_heads, r.ffn) for r in layers.itertuples()} == {(4, 2, 128), (8, 4, 64), (8, 4, 128)}
    for row in layers.itertuples():
        x = row.tokens if row.phase == "prefill" else row.context
        truth = fake_backend.layer_ms(row.heads, row.ffn, row.phase, x)
        assert row.median_ms == pytest.approx(truth, rel=0.05), row
        assert row.method == "difference" and row.source == "measured" and row.std_ms > 0
        assert math.isnan(row.mean_ms)  # a fitted coefficient is no mean of samples
    for row in lut.ok[lut.ok.component == "base"].itertuples():
        x = row.tokens if row.phase == "prefill" else row.context
        assert row.median_ms == pytest.approx(fake_backend.base_ms(row.phase, x), rel=0.05)
    models = lut.frame[lut.frame.component == "model"]
    assert (models.method == "whole").all() and models.residual_pct.notna().all()
    assert models.residual_pct.abs().max() < 5
    assert lut.meta.method == "difference" and lut.meta.clock == "fake-engine-timer"
    assert lut.meta.versions == {"fakelib": "1.0"} and lut.meta.backend_config["noise"] == 0.01
    # 3 shapes x 3 depths, plus the 0-layer model that pins the base
    assert len(lut.meta.fit) == 4 and all(f["models"] == 10 for f in lut.meta.fit)
    assert set(models[models.num_layers == 0].subnet_id) == {""}


def test_additivity_and_measured_interaction(tmp_path, tiny_arch, fake_backend):
    """Heads and FFN narrowed in one layer compose additively from the axes; an interaction the
    axes cannot see shows up, measured, as the error on mixed-shape models."""
    mixed = Subnet(tiny_arch, (LayerShape(0, 4, 2, 64), LayerShape(1, 8, 4, 128), LayerShape(3, 4, 2, 64)))
    for interaction, expected_error_ms in ((0.0, 0.0), (0.2, -0.4)):
        out = tmp_path / f"i{interaction}"
        lut = _build(
            out, tiny_arch, get_backend("fake-engine", interaction_ms=interaction, noise=0.002), whole=(mixed,)
        )
        predictor = Predictor(lut)
        row = lut.ok[(lut.ok.subnet_id == mixed.id) & (lut.ok.phase == "decode") & (lut.ok.context == 64)].iloc[0]
        predicted, source = predictor.phase_ms(mixed, "decode", 1, 1, 64)
        assert source in ("measured", "interpolated")
        assert predicted - row.median_ms == pytest.approx(expected_error_ms, abs=0.05)


def test_noisy_rows_are_remeasured_then_flagged(tmp_path, tiny_arch, fake_backend):
    lut = _build(tmp_path, tiny_arch, get_backend("fake-engine", noisy_ffn=64))
    models = lut.frame[lut.frame.component == "model"]
    noisy = models[models.subnet_json.str.contains('"ffn":64')]
    quiet = models.drop(noisy.index)
    assert (noisy.rounds == PROTOCOL.rounds + 1).all() and noisy["flags"].str.contains("high_cv").all()
    assert (quiet.rounds == PROTOCOL.rounds).all() and not quiet["flags"].str.contains("high_cv").any()


def test_engines_compile_once_and_are_reused(tmp_path, tiny_arch, fake_backend):
    backend = get_backend("fake-engine")
    lut = _build(tmp_path, tiny_arch, backend)
    n_models = lut.frame[lut.frame.component == "model"].subnet_id.nunique()
    assert len(fake_backend.COMPILES) == n_models == 10  # 3 rounds, each engine compiled once
    assert (lut.frame[lut.frame.component == "model"].compile_s >= 0).all()
    # a wider plan on the same engines (another context within their limits) compiles nothing new
    wider = BuildPlan(tiny_arch, (1.0, 0.5), (16, 32), (16, 32, 64), method="difference", depths=(1, 2, 4))
    run_build(wider, backend, tmp_path, PROTOCOL, artifacts=ArtifactCache(tmp_path / "artifacts"))
    assert len(fake_backend.COMPILES) == 10
    extended = load_table(lut.path)
    assert 32 in set(extended.ok[extended.ok.component == "layer"].context)
    # another library version is another artifact, and another table identity
    newer = get_backend("fake-engine", version="2.0")
    with pytest.raises(LutError, match="versions"):
        run_build(wider, newer, tmp_path, PROTOCOL, artifacts=ArtifactCache(tmp_path / "artifacts"))


def test_host_bound_rows_are_flagged(tmp_path, tiny_arch, fake_backend):
    lut = _build(tmp_path, tiny_arch, get_backend("fake-engine", device_busy=0.2))
    models = lut.frame[lut.frame.component == "model"]
    assert (models.device_busy == 0.2).all() and models["flags"].str.contains("host_bound").all()
    busy = _build(tmp_path / "busy", tiny_arch, get_backend("fake-engine", device_busy=0.95))
    assert not busy.frame["flags"].str.contains("host_bound").any()


def test_unsupported_shapes_are_rows_not_crashes(tmp_path, tiny_arch, fake_backend):
    mixed = Subnet(tiny_arch, (LayerShape(0, 4, 2, 64), LayerShape(3, 8, 4, 128)))
    result = run_build(
        _plan(tiny_arch, whole=(mixed,)),
        get_backend("fake-engine", uniform_only=True),
        tmp_path,
        PROTOCOL,
        artifacts=ArtifactCache(tmp_path / "artifacts"),
    )
    lut = load_table(result.path)
    rows = lut.frame[lut.frame.subnet_id == mixed.id]
    assert (rows.status == "unsupported").all() and rows.note.str.contains("one width").all()
    assert (lut.frame[lut.frame.component == "layer"].status == "ok").all()
    # A shape the flow cannot run is skipped by design: listed as such, never counted as a failure.
    assert len(result.unsupported) == len(rows) == 4 and all(label.startswith("model") for label in result.unsupported)
    assert not set(result.unsupported) & set(result.failed)


def test_method_choice_follows_validation_data(tiny_arch, fake_backend):
    assert choose_method("pytorch", ("components", "calibrated", "difference"), "cpu")[0] == "calibrated"
    assert choose_method("pytorch", ("components", "difference"), "cpu")[0] == "difference"  # not supported: fallback
    method, why = choose_method("pytorch", ("components", "difference"), "cuda:0")
    assert method == "difference" and "H100" in why
    assert choose_method("fake-engine", ("difference",), "cpu")[0] == "difference"
    assert choose_method("pytorch", ("components", "difference"), "cpu", "difference")[0] == "difference"
    with pytest.raises(UsageError, match="supports"):
        choose_method("fake-engine", ("difference",), "cpu", "components")
    with pytest.raises(AmoebaError, match="supports"):
        run_build(BuildPlan(tiny_arch), get_backend("fake-engine"), "/nonexistent")


def test_plan_rejects_too_few_depths(tiny_arch):
    with pytest.raises(UsageError, match="at least 3 depths"):
        BuildPlan(tiny_arch, method="difference", depths=(2, 4))
    with pytest.raises(UsageError, match="outside"):
        BuildPlan(tiny_arch, method="difference", depths=(1, 2, 9))


def test_backend_is_rebuilt_from_its_stored_config(fake_backend):
    backend = get_backend("fake-engine", noise=0.03, version="1.1")
    again = type(backend)(**backend.config_dict())
    assert again.config == backend.config and again.versions() == {"fakelib": "1.1"}


def test_compiling_inside_timed_samples_is_flagged(tmp_path, tiny_arch, fake_backend):
    """A JIT flow compiles in warm-up (fine); a compile during the timed samples flags the row."""
    warm_only = _build(tmp_path / "warm", tiny_arch, get_backend("fake-engine", jit=True))
    assert not warm_only.frame["flags"].str.contains("recompiled").any()
    result = run_build(
        _plan(tiny_arch),
        get_backend("fake-engine", jit=True, compiles_while_timed=True),
        tmp_path / "timed",
        PROTOCOL,
        artifacts=ArtifactCache(tmp_path / "artifacts"),
    )
    models = load_table(result.path).frame.query("component == 'model'")
    assert models["flags"].str.contains("recompiled").all()
    assert sorted(result.recompiled) == sorted(models.apply(entry_key_of_row, axis=1))


def test_compile_time_spent_in_load_reaches_the_rows(tmp_path, tiny_arch, fake_backend):
    """A JIT flow compiles at load (its code lives in the process): that time is the row's compile_s."""
    lut = _build(tmp_path, tiny_arch, get_backend("fake-engine", load_compile_s=5.0))
    models = lut.frame[lut.frame.component == "model"]
    assert models.compile_s.between(5.0, 6.0).all()


def test_build_lut_warns_about_rows_compiled_while_timed(tmp_path, tiny_config_path, fake_backend):
    from typer.testing import CliRunner

    from amoeba_profile.cli.main import app

    args = [
        "build-lut",
        "--backend",
        "fake-engine",
        "--model",
        str(tiny_config_path),
        "--out",
        str(tmp_path),
        "--quick",
        "--widths",
        "1",
        "--depths",
        "1,2,4",
        "--prompt-len",
        "16",
        "--contexts",
        "16",
        "--artifacts",
        str(tmp_path / "artifacts"),
        "--backend-option",
        "jit=on",
    ]
    quiet = CliRunner().invoke(app, args)
    assert quiet.exit_code == 0 and "recompiled" not in quiet.output
    noisy = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "timed"), "--backend-option", "compiles_while_timed=on"]
    )
    assert noisy.exit_code == 0, noisy.output
    assert "8 rows compiled inside their timed samples (flagged 'recompiled'" in noisy.output


def test_a_base_below_zero_is_held_at_zero_and_the_layers_refit(tmp_path, tiny_arch, fake_backend, monkeypatch):
    """llama.cpp serves no 0-layer model, so its base is extrapolated; a prefill that grows faster
    than linearly in depth puts it below zero. The fit then holds the base at 0 ms (least squares
    under base >= 0) instead of leaving the table unable to predict prefill at all."""
    from amoeba_profile.core.errors import UnsupportedShape

    def superlinear(engine, phase, x):  # each layer also slows the others: 0.05 ms per layer pair
        n = len(engine.spec.layers)
        return sum(fake_backend.layer_ms(h, f, phase, x) for h, _, f in engine.spec.layers) + 0.05 * n * (n - 1) / 2

    def no_empty_model(backend, spec):
        if not spec.layers:
            raise UnsupportedShape("no model without decoder layers")

    monkeypatch.setattr(fake_backend.FakeEngine, "true_ms", superlinear)
    monkeypatch.setattr(fake_backend.FakeEngineBackend, "check_spec", no_empty_model)
    lut = _build(tmp_path, tiny_arch, get_backend("fake-engine", noise=0.0))
    base = lut.ok[lut.ok.component == "base"]
    assert len(base) == 4 and (base[["median_ms", "p10_ms", "p90_ms"]] == 0).all().all()
    assert base.note.str.startswith("base held at 0 ms: the unconstrained fit gave -").all()
    assert all(f["unconstrained_base_ms"] < 0 for f in lut.meta.fit)
    # The refit layers absorb the superlinear term, so whole models are still predicted within it.
    full = Subnet.uniform(tiny_arch, 4, 1.0)
    layers = tuple((l.heads, l.kv_heads, l.ffn) for l in full.layers)
    engine = fake_backend.FakeEngine(get_backend("fake-engine"), EngineSpec(tiny_arch, layers, 1, 32, 64))
    predicted, _ = Predictor(lut).phase_ms(full, "prefill", 1, 16, 0)
    assert predicted == pytest.approx(superlinear(engine, "prefill", 16), rel=0.1)
