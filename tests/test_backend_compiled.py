"""The compiled PyTorch flow (static KV cache + torch.compile): its pure parts fast, a tiny real build slow."""

import pytest
import torch
from amoeba_profile.backends import EngineSpec, get_backend
from amoeba_profile.backends.pytorch.compiled import (
    CompiledEngine,
    EnginePool,
    JitCount,
    compile_config,
    engine_bytes,
    raise_recompile_limits,
    resolve_mode,
)

from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import UnsupportedShape, UsageError
from amoeba_profile.measure.methods import choose_method


def test_mode_defaults_per_device_and_refuses_cuda_graphs_on_cpu():
    assert resolve_mode("cpu", None) == "default"
    assert resolve_mode("cuda:0", None) == "reduce-overhead"  # transformers' CompileConfig default
    assert resolve_mode("cuda", "max-autotune") == "max-autotune"
    with pytest.raises(UsageError, match="unknown compile mode"):
        resolve_mode("cpu", "fast")
    with pytest.raises(UsageError, match="use 'default'"):
        resolve_mode("cpu", "reduce-overhead")
    with pytest.raises(UsageError, match="use 'max-autotune-no-cudagraphs'"):
        resolve_mode("cpu", "max-autotune")


def test_compile_config_is_what_generate_compiles_with():
    cpu = compile_config("cpu", "default")
    assert cpu.mode == "default" and cpu._compile_all_devices is True and cpu.fullgraph is False
    cuda = compile_config("cuda:0", "reduce-overhead")
    assert cuda.mode == "reduce-overhead" and not cuda._compile_all_devices


def test_config_is_stored_and_rebuilds_the_backend():
    backend = get_backend("pytorch-compiled", mode="max-autotune-no-cudagraphs", threads=1)
    stored = backend.config_dict()
    assert stored == {
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
        "attn_impl": "sdpa",
        "mode": "max-autotune-no-cudagraphs",
    }
    assert type(backend)(**stored).config == backend.config
    assert backend.compile_config.mode == "max-autotune-no-cudagraphs"
    assert backend.environment()["compile_mode"] == "max-autotune-no-cudagraphs"
    with pytest.raises(UsageError, match=r"has no option \['mode'\]"):
        get_backend("pytorch", mode="default")  # the eager flow's config has no compile mode


def test_only_whole_models_through_the_serving_loop(tiny_arch):
    backend = get_backend("pytorch-compiled", threads=1)
    assert backend.capabilities().methods == ("difference",)
    method, why = choose_method("pytorch-compiled", backend.capabilities().methods, "cpu")
    assert method == "difference" and "fuses" in why
    with pytest.raises(UnsupportedShape, match="use --method difference"):
        backend.build_component(tiny_arch, Entry("mlp", "decode", 1, 1, 0, ffn=128))
    with pytest.raises(UnsupportedShape, match="no KV cache"):
        backend.check_spec(EngineSpec(tiny_arch, (), 1, 64, 66))
    backend.check_spec(EngineSpec(tiny_arch, ((8, 4, 128),), 1, 64, 66))


def test_jit_count_sees_compiles_recompiles_and_eager_fallback():
    def toy(x):
        return torch.sin(x) * 2

    compiled = torch.compile(toy, backend="eager")
    before = JitCount.now()
    compiled(torch.ones(3))
    first = JitCount.now() - before
    compiled(torch.ones(3))
    again = JitCount.now() - before
    compiled(torch.ones(3, dtype=torch.float64))  # a new dtype fails the guards: a recompile
    recompiled = JitCount.now() - before
    assert (first.frames, first.compiled) == (1, 1) and again == first
    assert (recompiled.frames, recompiled.fell_back) == (2, 0)

    def other(x):
        return torch.cos(x) + 1

    limited = torch.compile(other, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        before = JitCount.now()
        limited(torch.ones(3))
        limited(torch.ones(3, dtype=torch.float64))  # over the limit: dynamo runs it eager
        assert (JitCount.now() - before).fell_back == 1


def test_recompile_limit_is_raised_for_one_entry_per_engine_shape():
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        raise_recompile_limits(512)
        assert torch._dynamo.config.recompile_limit == 512
        assert torch._dynamo.config.accumulated_recompile_limit == 512


def test_engine_bytes_counts_weights_and_static_cache(tiny_arch):
    backend = get_backend("pytorch-compiled", threads=1)
    spec = EngineSpec(tiny_arch, ((8, 4, 128), (4, 2, 64)), 2, 40, 42)
    engine = CompiledEngine(backend, spec)  # built, not compiled: compiling happens in warm_compile
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    cache = engine.filled_cache(2, 5)
    slots = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert engine_bytes(spec, "float32") == weights + slots * 4
    assert int(cache.get_seq_length()) == 5 and cache.layers[1].keys.shape == (2, 2, 42, tiny_arch.head_dim)


class _Held:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def release(self):
        self.log.append(self.name)


def test_pool_keeps_engines_until_full_then_releases_all_with_the_compiled_code():
    """Dynamo's code cache keeps released engines' weights alive, so a full pool drops every engine
    and that cache together; releasing one engine alone would free nothing."""
    released: list[str] = []
    forgotten = []
    pool = EnginePool(budget_bytes=10, forget_compiled=lambda: forgotten.append(len(pool)))
    for name in ("a", "b"):
        pool.make_room(4)
        pool.put(name, _Held(released, name), 4)
    assert pool.get("a").name == "a" and released == [] and forgotten == []
    pool.make_room(4)
    assert released == ["b", "a"] and forgotten == [0] and len(pool) == 0  # released first, then forgotten
    pool.put("c", _Held(released, "c"), 4)
    pool.make_room(20)  # larger than the budget: everything goes, the new engine still loads
    assert released == ["b", "a", "c"] and forgotten == [0, 0]


@pytest.mark.slow
def test_compiled_build_reuses_engines_and_never_compiles_while_timed(tmp_path, tiny_arch):
    """A tiny difference build through the compiled flow; a second build reuses the in-process engines."""
    from amoeba_profile.core.timing import TimingProtocol
    from amoeba_profile.measure.artifacts import ArtifactCache
    from amoeba_profile.measure.build import run_build
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.table.lut import load_table

    protocol = TimingProtocol(warmup_min=1, warmup_max=2, rounds=2, samples_per_round=2, min_round_s=0.0)
    backend = get_backend("pytorch-compiled", threads=1)
    artifacts = ArtifactCache(tmp_path / "artifacts")
    plan = BuildPlan(tiny_arch, (1.0,), (16,), (16, 32), method="difference", depths=(1, 2, 4))
    result = run_build(plan, backend, tmp_path, protocol, artifacts=artifacts)
    assert result.path.parent.name == "pytorch-compiled" and result.recompiled == []
    lut = load_table(result.path)
    assert lut.meta.backend_config["mode"] == "default" and "StaticCache" in lut.meta.backend_env["serving_loop"]
    models = lut.frame[lut.frame.component == "model"]
    layered, bare = models[models.num_layers > 0], models[models.num_layers == 0]
    assert (layered.status == "ok").all() and (bare.status == "unsupported").all()
    assert (layered.compile_s > 0).all() and not lut.frame["flags"].str.contains("recompiled").any()
    layers = lut.frame[lut.frame.component == "layer"]  # a fit a busy machine spoils is an error row, not a number
    assert len(layers) == 3 and (layers[layers.status == "ok"].median_ms > 0).all()
    assert len(backend.pool) == 3

    before = JitCount.now()
    # Same engine limits (longest context unchanged), so the same engines serve the new context.
    wider = BuildPlan(tiny_arch, (1.0,), (16,), (16, 24, 32), method="difference", depths=(1, 2, 4))
    again = load_table(run_build(wider, backend, tmp_path, protocol, artifacts=artifacts).path)
    new = again.frame[(again.frame.component == "model") & (again.frame.context == 24) & (again.frame.num_layers > 0)]
    assert len(new) == 3 and (new.status == "ok").all() and (new.compile_s == 0).all()
    assert (JitCount.now() - before).frames == 0  # pooled engines: nothing compiled again


@pytest.mark.slow
def test_static_cache_window_is_cropped_back(tiny_arch, tmp_path):
    """tpot's cached prefix in a StaticCache is cropped back after each request; ttft sizes the cache to max_seq_len."""
    from amoeba_profile.core.timing import TimingProtocol, sample, warm_up
    from amoeba_profile.measure.artifacts import ArtifactCache

    backend = get_backend("pytorch-compiled", threads=1)
    spec = EngineSpec(tiny_arch, ((8, 4, 128),), 1, 64, 66)
    artifact = ArtifactCache(tmp_path).ensure(backend, spec)
    assert artifact.compile_s > 0
    engine = backend.load(spec, artifact.path)
    assert engine.compile_s == 0.0 and backend.load(spec, artifact.path) is engine  # pooled, not rebuilt
    piece = engine.tpot(1, 32, 8)
    assert piece.prefix == 28 and int(piece.cache.get_seq_length()) == 28
    protocol = TimingProtocol(warmup_min=1, warmup_max=2, samples_per_round=3, min_round_s=0.0)
    before = JitCount.now()
    _, steps = warm_up(piece, protocol)
    assert all(s > 0 for s in sample(piece, protocol, steps))
    assert int(piece.cache.get_seq_length()) == 28 and (JitCount.now() - before).frames == 0
    other = engine.tpot(1, 16, 8)  # the engine's one cache, refilled: the compiled step's addresses stay
    assert other.cache is piece.cache and int(other.cache.get_seq_length()) == 12
    out = engine.generate(piece.ids[:, :16], None, 3)
    assert out.shape[1] == 19 and engine.model._previous_max_cache_length == spec.max_seq_len
