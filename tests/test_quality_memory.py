import pytest

from amoeba_profile.arch import BUILTIN_ARCHS
from amoeba_profile.errors import InfeasibleBudget, UsageError
from amoeba_profile.memory import estimate, weight_params
from amoeba_profile.predict import Predictor
from amoeba_profile.quality import PROXY_NAME, load_quality
from amoeba_profile.select import select
from amoeba_profile.subnet import DesignSpace, Subnet
from amoeba_profile.workload import Workload

from conftest import synthetic_lut

LLAMA2 = BUILTIN_ARCHS["llama2-7b"]


def test_memory_model_llama2_7b_fp16_at_4k_by_hand():
    mem = estimate(Subnet.uniform(LLAMA2, 32, 1.0), Workload(1, 4000, 96), "float16")
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert mem.weights_bytes == (32 * per_layer + 2 * 32000 * 4096 + 4096) * 2 == 13_476_831_232
    assert mem.kv_cache_bytes == 2 * 32 * 32 * 128 * 4096 * 2 == 2 * 1024**3
    assert mem.activation_bytes == 4000 * (3 * 4096 + 2 * 11008) * 2 + 32000 * 4
    assert 15.8 < mem.total_gb < 16.0
    half = estimate(Subnet.uniform(LLAMA2, 20, 0.625), Workload(1, 4000, 96), "float16")
    assert half.kv_cache_bytes == 2 * 20 * 20 * 128 * 4096 * 2


def test_memory_of_a_llama_cpp_table_counts_quantized_blocks(tiny_arch):
    """GGUF weights take their block size per element; the KV cache stays f16, activations f32."""
    subnet, workload = Subnet.uniform(tiny_arch, 4, 1.0), Workload(1, 16, 20)
    f16, q8, q4 = (estimate(subnet, workload, dtype) for dtype in ("f16", "q8_0", "q4_0"))
    params = weight_params(subnet)
    assert params == 4 * (64 * 8 * (8 + 4 + 4 + 8) + 3 * 64 * 128 + 2 * 64) + 2 * 256 * 64 + 64
    assert (f16.weights_bytes, q8.weights_bytes, q4.weights_bytes) == (params * 2, round(params * 34 / 32),
                                                                       round(params * 18 / 32))
    assert f16.kv_cache_bytes == q4.kv_cache_bytes == 2 * 4 * 4 * 8 * 36 * 2
    assert f16.activation_bytes == q4.activation_bytes == 16 * (3 * 64 + 2 * 128) * 4 + 256 * 4
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        estimate(subnet, workload, "int3")
    space = list(DesignSpace(tiny_arch, (2, 4), (1.0, 0.5)).subnets())  # a llama.cpp table's dtype selects
    chosen = select(Predictor(_lut(tiny_arch)), space, workload, "tpot_ms", 1e6, memory_gb=1, dtype="q4_0")
    assert chosen.pick.memory == estimate(chosen.pick.subnet, workload, "q4_0")


def _lut(arch):
    return synthetic_lut(arch, lambda h, p, c: 0.3 * h if p == "prefill" else 0.05 * h + 0.001 * c,
                         lambda f, p: 0.01 * f if p == "prefill" else 0.004 * f,
                         lambda p, c: 2.0 if p == "prefill" else 0.5)


def test_memory_budget_excludes_shapes(tiny_arch):
    predictor, workload = Predictor(_lut(tiny_arch)), Workload(1, 16, 20)
    space = list(DesignSpace(tiny_arch, (2, 3, 4), (1.0, 0.5)).subnets())
    sizes = sorted(estimate(s, workload, "float32").total_gb for s in space)
    limit = (sizes[2] + sizes[3]) / 2
    chosen = select(predictor, space, workload, "tpot_ms", 1e6, memory_gb=limit, dtype="float32")
    assert chosen.pick.memory.total_gb <= limit
    assert all(c.memory.total_gb <= limit for c in chosen.top_k)
    with pytest.raises(InfeasibleBudget, match=r"no shape fits .* GB; smallest needs"):
        select(predictor, space, workload, "tpot_ms", 1e6, memory_gb=sizes[0] / 2, dtype="float32")


def test_quality_table_formats(tmp_path, tiny_arch):
    by_shape = tmp_path / "q.csv"
    by_shape.write_text("num_layers,width_ratio,score\n4,1.0,0.40\n4,0.5,0.45\n2,1.0,0.30\n2,0.5,0.20\n")
    q = load_quality(by_shape)
    assert q.score(Subnet.uniform(tiny_arch, 4, 0.5)) == 0.45
    by_name = tmp_path / "names.csv"
    by_name.write_text("name,score\nllama2-7b_l24w0.875,0.61\nllama2-7b_l32w1.0,0.66\n")
    assert load_quality(by_name).score(Subnet.uniform(LLAMA2, 24, 0.875)) == 0.61
    subnet = Subnet.uniform(tiny_arch, 2, 0.5)
    by_id = tmp_path / "ids.csv"
    by_id.write_text(f"subnet_id,score\n{subnet.id},0.9\n")
    assert load_quality(by_id).score(subnet) == 0.9


def test_quality_table_changes_the_pick_and_names_itself(tmp_path, tiny_arch):
    path = tmp_path / "q.csv"
    path.write_text("num_layers,width_ratio,score\n4,1.0,0.40\n4,0.5,0.45\n2,1.0,0.30\n2,0.5,0.20\n")
    predictor, workload = Predictor(_lut(tiny_arch)), Workload(1, 16, 20)
    space = list(DesignSpace(tiny_arch, (2, 4), (1.0, 0.5)).subnets())
    proxy = select(predictor, space, workload, "tpot_ms", 1e6)
    measured = select(predictor, space, workload, "tpot_ms", 1e6, quality=load_quality(path))
    assert proxy.pick.subnet == Subnet.uniform(tiny_arch, 4, 1.0) and proxy.quality_source == PROXY_NAME
    assert measured.pick.subnet == Subnet.uniform(tiny_arch, 4, 0.5) and str(path) in measured.quality_source


@pytest.mark.parametrize("text, message", [
    ("num_layers,width_ratio,score\n4,1.0,0.4\n4,1.0,0.5\n", "line 3 repeats the shape of line 2"),
    ("num_layers,width_ratio,score\n4,1.0,high\n", "line 2: score 'high' is not a number"),
    ("name,score\nmodel-final,0.4\n", "no AmoebaLLM suffix"),
    ("num_layers,width_ratio\n4,1.0\n", "missing column 'score'"),
    ("layers,score\n4,0.4\n", "needs columns"),
])
def test_quality_table_errors(tmp_path, text, message):
    path = tmp_path / "q.csv"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_quality(path)


def test_quality_table_must_cover_the_space(tmp_path, tiny_arch):
    path = tmp_path / "q.csv"
    path.write_text("num_layers,width_ratio,score\n4,1.0,0.4\n")
    space = list(DesignSpace(tiny_arch, (2, 4), (1.0, 0.5)).subnets())
    with pytest.raises(UsageError, match="lacks 3 shapes of the design space"):
        select(Predictor(_lut(tiny_arch)), space, Workload(1, 16, 20), "tpot_ms", 1e6, quality=load_quality(path))
