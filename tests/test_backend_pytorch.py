import pytest
import torch
from amoeba_profile.backends import get_backend

from amoeba_profile.core.entry import Entry
from amoeba_profile.core.subnet import LayerShape, Subnet
from amoeba_profile.core.timing import TimingProtocol, sample, warm_up
from amoeba_profile.selection.memory import weight_params


def _engine(backend, arch, layers, tmp_path):
    from amoeba_profile.backends import EngineSpec

    from amoeba_profile.measure.artifacts import ArtifactCache

    spec = EngineSpec(arch, tuple(layers), 1, 64, 80)
    artifact = ArtifactCache(tmp_path).ensure(backend, spec)
    return backend.load(spec, artifact.path)


def test_per_layer_widths_are_really_built(tiny_arch, tmp_path):
    backend = get_backend("pytorch")
    subnet = Subnet(tiny_arch, (LayerShape(0, 8, 4, 128), LayerShape(2, 4, 2, 40), LayerShape(3, 2, 1, 96)))
    engine = _engine(backend, tiny_arch, [(l.heads, l.kv_heads, l.ffn) for l in subnet.layers], tmp_path)
    layers = engine.model.model.layers
    assert len(layers) == 3
    for layer, shape in zip(layers, subnet.layers):
        assert layer.self_attn.q_proj.out_features == shape.heads * tiny_arch.head_dim
        assert layer.self_attn.k_proj.out_features == shape.kv_heads * tiny_arch.head_dim
        assert layer.mlp.gate_proj.out_features == shape.ffn
        assert torch.isfinite(layer.mlp.down_proj.weight).all() and layer.mlp.down_proj.weight.abs().sum() > 0
    assert sum(p.numel() for p in engine.model.parameters()) == weight_params(subnet)  # the one parameter count
    engine.close()


def test_serving_loop_decode_window_is_centred_and_restored(tiny_arch, tmp_path):
    """tpot = (e2e(1 + n) - e2e(1)) / n through generate(); the cached prefix is cropped back each time."""
    backend = get_backend("pytorch")
    engine = _engine(backend, tiny_arch, [(8, 4, 128)] * 2, tmp_path)
    piece = engine.tpot(1, 32, 8)
    assert piece.prefix == 28 and piece.cache.get_seq_length() == 28
    calls = []
    generate = engine.generate
    engine.generate = lambda ids, cache, n: (
        calls.append((ids.shape[1], cache.get_seq_length(), n)) or generate(ids, cache, n)
    )
    protocol = TimingProtocol(warmup_min=1, warmup_max=2, samples_per_round=3, min_round_s=0.0)
    runs, steps = warm_up(piece, protocol)
    assert steps == 1 and len(sample(piece, protocol, steps)) == 3
    assert calls[:2] == [(29, 28, 9), (29, 28, 1)]  # the uncached token + n decode steps, then 1
    assert piece.cache.get_seq_length() == 28
    out = generate(piece.ids, None, 5)
    assert out.shape[1] == 29 + 5  # fixed output length: no early stop
    engine.close()


def test_base_is_the_model_without_layers(tiny_arch, tmp_path):
    backend = get_backend("pytorch")
    engine = _engine(backend, tiny_arch, [], tmp_path)
    assert len(engine.model.model.layers) == 0
    protocol = TimingProtocol(warmup_min=1, warmup_max=2, samples_per_round=2, min_round_s=0.0)
    for piece in (engine.ttft(1, 16), engine.tpot(1, 32, 4)):
        _, steps = warm_up(piece, protocol)
        assert all(s > 0 for s in sample(piece, protocol, steps)) or piece.max_steps == 1
    assert engine.device_busy(engine.ttft(1, 16)) is None  # CPU: the host is the device


def test_components_chain_to_defeat_cache_reuse(tiny_arch):
    backend = get_backend("pytorch")
    backend.chain_bytes = 1 << 20
    n = backend.chain_length(tiny_arch, "mlp", 8, 4, 128)
    assert n == -(-(1 << 20) // (3 * 64 * 128 * 4))
    unit = backend.build_component(tiny_arch, Entry("attn", "decode", 1, 1, 8, 4, 2))
    assert unit.repeat == backend.chain_length(tiny_arch, "attn", 4, 2, 0) == len(unit.layers)
    assert all(isinstance(layer.mlp, torch.nn.Identity) for layer in unit.layers)


def test_unknown_dtype_and_missing_cuda():
    from amoeba_profile.core.errors import UsageError

    with pytest.raises(UsageError, match="dtype"):
        get_backend("pytorch", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="torch sees 0 CUDA device"):
            get_backend("pytorch", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_cuda_measures_with_events(tmp_path, tiny_arch):
    from amoeba_profile.measure.artifacts import ArtifactCache
    from amoeba_profile.measure.build import run_build
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.table.lut import load_table

    backend = get_backend("pytorch", device="cuda")
    assert backend.dtype == "float16" and backend.device_arch().startswith("sm_")
    for method in ("components", "difference"):
        plan = BuildPlan(
            tiny_arch,
            (1.0, 0.5),
            (16,),
            (16, 32),
            whole=(Subnet.uniform(tiny_arch, 4, 1.0),),
            method=method,
            depths=(1, 2, 4) if method == "difference" else (),
        )
        lut = load_table(
            run_build(
                plan,
                backend,
                tmp_path / method,
                TimingProtocol.quick(),
                artifacts=ArtifactCache(tmp_path / "artifacts"),
            ).path
        )
        assert (lut.frame.status == "ok").all() and lut.meta.clock == "cuda-events"
        models = lut.frame[lut.frame.component == "model"]
        assert models.device_busy.between(0, 1).all()  # measured by the profiler on the GPU

    compiled = get_backend("pytorch-compiled", device="cuda")
    assert compiled.config.mode == "reduce-overhead" and "triton" in compiled.versions()
    plan = BuildPlan(tiny_arch, (1.0, 0.5), (16,), (16, 32), method="difference", depths=(1, 2, 4))
    result = run_build(
        plan, compiled, tmp_path / "compiled", TimingProtocol.quick(), artifacts=ArtifactCache(tmp_path / "artifacts")
    )
    lut = load_table(result.path)
    models = lut.frame[lut.frame.component == "model"]
    layered = models[models.num_layers > 0]
    assert (layered.status == "ok").all() and (layered.compile_s > 0).all() and result.recompiled == []
    assert lut.meta.clock == "cuda-events" and (lut.ok[lut.ok.component == "layer"].median_ms > 0).all()


def test_default_threads_are_the_idle_cores(monkeypatch):
    """torch's one-thread-per-core oversubscribes a shared CPU; the default takes the idle cores."""
    from amoeba_profile.backends.pytorch.eager import default_threads
    from conftest import SimulatedLoad

    monkeypatch.delenv("OMP_NUM_THREADS")
    threads, why = default_threads("cpu", SimulatedLoad(lambda t: 1.3, cores=4, step_s=0.0), cap=4)
    assert threads == 2 and why.startswith("2 of 4 cores idle (other processes used 1.3)")
    assert default_threads("cpu", SimulatedLoad(lambda t: 0.0, cores=4, step_s=0.0), cap=4)[0] == 4
    assert default_threads("cpu", SimulatedLoad(lambda t: 0.0, cores=4, step_s=0.0), cap=2)[0] == 2  # torch's cap
    assert default_threads("cpu", SimulatedLoad(lambda t: 4.0, cores=4, step_s=0.0), cap=4)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads("cpu", SimulatedLoad(lambda t: 4.0, cores=4), cap=3) == (
        3,
        "torch's default under OMP_NUM_THREADS=3",
    )


def test_thread_count_is_recorded_and_sets_the_cores_needed():
    backend = get_backend("pytorch")  # conftest pins OMP_NUM_THREADS=1
    assert backend.config_dict()["threads"] == 1 == torch.get_num_threads() == backend.host_cores()
    assert "OMP_NUM_THREADS=1" in backend.environment()["threads_reason"]
    given = get_backend("pytorch", threads=2)
    assert given.config_dict()["threads"] == 2 == given.host_cores()
    assert given.environment()["threads_reason"] == "given"


def test_cache_keyword_follows_the_installed_transformers():
    """transformers 5.17 takes ``past_key_values``, 5.24 ``cache``: generate() refuses the other name."""
    from amoeba_profile.backends.pytorch.eager import cache_keyword

    def old_forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...

    def new_forward(self, input_ids=None, cache=None, use_cache=None, **kwargs): ...

    assert cache_keyword(old_forward) == "past_key_values" and cache_keyword(new_forward) == "cache"
