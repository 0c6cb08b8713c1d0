import pytest
import torch

from amoeba_profile.backends import get_backend
from amoeba_profile.entry import Entry
from amoeba_profile.measure import Clock, TimingProtocol, sample, warm_up
from amoeba_profile.subnet import LayerShape, Subnet


def test_per_layer_widths_are_really_built(tiny_arch):
    backend = get_backend("pytorch")
    subnet = Subnet(tiny_arch, (LayerShape(0, 8, 4, 128), LayerShape(2, 4, 2, 40), LayerShape(3, 2, 1, 96)))
    unit = backend.build(tiny_arch, Entry("model", "decode", 1, 1, 8, subnet=subnet))
    layers = unit.model.model.layers
    assert len(layers) == 3
    for layer, shape in zip(layers, subnet.layers):
        assert layer.self_attn.q_proj.out_features == shape.heads * tiny_arch.head_dim
        assert layer.self_attn.k_proj.out_features == shape.kv_heads * tiny_arch.head_dim
        assert layer.mlp.gate_proj.out_features == shape.ffn
        assert torch.isfinite(layer.mlp.down_proj.weight).all() and layer.mlp.down_proj.weight.abs().sum() > 0
    # the decode step really runs at the requested context and leaves the cache there
    entry = Entry("model", "decode", 1, 1, 8, subnet=subnet)
    piece = unit.workpiece(entry)
    protocol = TimingProtocol(warmup_min=1, warmup_max=2, samples_per_round=3, min_round_s=0.0)
    warm_up(piece, Clock(), protocol)
    assert len(sample(piece, Clock(), protocol)) == 3
    unit.close()


def test_components_chain_to_defeat_cache_reuse(tiny_arch):
    backend = get_backend("pytorch")
    backend.chain_bytes = 1 << 20
    n = backend.chain_length(tiny_arch, "mlp", 8, 4, 128)
    assert n == -(-(1 << 20) // (3 * 64 * 128 * 4))
    unit = backend.build(tiny_arch, Entry("attn", "decode", 1, 1, 8, 4, 2))
    assert unit.repeat == backend.chain_length(tiny_arch, "attn", 4, 2, 0) == len(unit.layers)
    assert all(isinstance(layer.mlp, torch.nn.Identity) for layer in unit.layers)


def test_unknown_dtype_and_missing_cuda():
    from amoeba_profile.errors import UsageError

    with pytest.raises(UsageError, match="dtype"):
        get_backend("pytorch", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            get_backend("pytorch", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_cuda_measures_with_events(tmp_path, tiny_arch):
    from amoeba_profile.build import BuildPlan, run_build
    from amoeba_profile.lut import load_table

    backend = get_backend("pytorch", device="cuda")
    assert backend.dtype == "float16"
    plan = BuildPlan(tiny_arch, (1.0,), (16,), (16, 32), whole=(Subnet.uniform(tiny_arch, 4, 1.0),))
    lut = load_table(run_build(plan, backend, tmp_path, TimingProtocol.quick()).path)
    assert (lut.frame.status == "ok").all() and lut.meta["clock"] == "cuda-events"
