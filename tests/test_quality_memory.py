import pytest
from conftest import synthetic_lut

from amoeba_profile.core.arch import BUILTIN_ARCHS
from amoeba_profile.core.errors import InfeasibleBudget, UsageError
from amoeba_profile.core.quality import PROXY_NAME, load_quality
from amoeba_profile.core.subnet import DesignSpace, Subnet
from amoeba_profile.core.workload import Workload
from amoeba_profile.selection.memory import estimate, weight_params
from amoeba_profile.selection.picker import select
from amoeba_profile.selection.predict import Predictor

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
    assert (f16.weights_bytes, q8.weights_bytes, q4.weights_bytes) == (
        params * 2,
        round(params * 34 / 32),
        round(params * 18 / 32),
    )
    assert f16.kv_cache_bytes == q4.kv_cache_bytes == 2 * 4 * 4 * 8 * 36 * 2
    assert f16.activation_bytes == q4.activation_bytes == 16 * (3 * 64 + 2 * 128) * 4 + 256 * 4
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        estimate(subnet, workload, "int3")
    space = list(DesignSpace(tiny_arch, (2, 4), (1.0, 0.5)).subnets())  # a llama.cpp table's dtype selects
    chosen = select(Predictor(_lut(tiny_arch)), space, workload, "tpot_ms", 1e6, memory_gb=1, dtype="q4_0")
    assert chosen.pick.memory == estimate(chosen.pick.subnet, workload, "q4_0")


def _lut(arch):
    return synthetic_lut(
        arch,
        lambda h, p, c: 0.3 * h if p == "prefill" else 0.05 * h + 0.001 * c,
        lambda f, p: 0.01 * f if p == "prefill" else 0.004 * f,
        lambda p, c: 2.0 if p == "prefill" else 0.5,
    )


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


def test_quality_widths_take_the_cli_syntax(tmp_path, tiny_arch):
    path = tmp_path / "q.csv"
    path.write_text("num_layers,width_ratio,score\n4,1,0.40\n4,7/8,0.45\n4,0.75,0.5\n")
    q = load_quality(path)
    assert q.score(Subnet.uniform(tiny_arch, 4, 0.875)) == 0.45 and q.score(Subnet.uniform(tiny_arch, 4, 0.75)) == 0.5
    names = tmp_path / "names.csv"
    names.write_text("name,score\nllama2-7b_l24w7/8,0.61\n")
    assert load_quality(names).score(Subnet.uniform(LLAMA2, 24, 0.875)) == 0.61


def test_quality_table_changes_the_pick_and_names_itself(tmp_path, tiny_arch):
    path = tmp_path / "q.csv"
    path.write_text("num_layers,width_ratio,score\n4,1.0,0.40\n4,0.5,0.45\n2,1.0,0.30\n2,0.5,0.20\n")
    predictor, workload = Predictor(_lut(tiny_arch)), Workload(1, 16, 20)
    space = list(DesignSpace(tiny_arch, (2, 4), (1.0, 0.5)).subnets())
    proxy = select(predictor, space, workload, "tpot_ms", 1e6)
    measured = select(predictor, space, workload, "tpot_ms", 1e6, quality=load_quality(path))
    assert proxy.pick.subnet == Subnet.uniform(tiny_arch, 4, 1.0) and proxy.quality_source == PROXY_NAME
    assert measured.pick.subnet == Subnet.uniform(tiny_arch, 4, 0.5) and str(path) in measured.quality_source


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_layers,width_ratio,score\n4,1.0,0.4\n4,1.0,0.5\n", "line 3 repeats the shape of line 2"),
        ("num_layers,width_ratio,score\n4,1.0,high\n", "line 2: score 'high' is not a number"),
        ("name,score\nmodel-final,0.4\n", "no AmoebaLLM suffix"),
        ("num_layers,width_ratio\n4,1.0\n", "missing column 'score'"),
        ("layers,score\n4,0.4\n", "needs columns"),
        ("num_layers,width_ratio,score\n4,1.0,inf\n", "line 2: score must be a finite number, got inf"),
        ("num_layers,width_ratio,score\n4.5,1.0,0.4\n", "line 2: num_layers must be a positive integer, got 4.5"),
        ("num_layers,width_ratio,score\n4,9/8,0.4\n", r"line 2: width ratio '9/8' must be in \(0, 1\]"),
        ("name,score\nm_l24w0.8.7,0.4\n", "line 2: bad width ratio '0.8.7'"),
    ],
)
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


def test_build_preflight_sizes_the_largest_engine_by_hand():
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.selection.memory import check_fits, plan_peak

    plan = BuildPlan(
        LLAMA2, widths=(1.0,), prompt_lens=(128,), contexts=(4096,), method="difference", depths=(4, 18, 32)
    )
    need, label = plan_peak(plan, "float16")
    assert label == "the 32-layer model"
    # weights 6.74e9 params x 2 B; KV 2 x 32 layers x 32 kv heads x 128 x (4096 + 8 + 2) positions x 2 B;
    # activations 128 x (3 x 4096 + 2 x 11008) x 2 B + 32000 x 4 B of logits, plus one decode step's
    # copy of a layer's K and V and their expansion to the query heads: 2 x (32 + 32) x 128 x 4106 x 2 B.
    assert need.weights_bytes == 6_738_415_616 * 2
    assert need.kv_cache_bytes == 2 * 32 * 32 * 128 * 4106 * 2
    assert need.activation_bytes == 128 * (3 * 4096 + 2 * 11008) * 2 + 32000 * 4 + 2 * 64 * 128 * 4106 * 2
    check_fits(plan, "float16", 20 * 10**9, "cuda")
    with pytest.raises(
        UsageError,
        match=r"^the 32-layer model needs 15.8 GB \(weights 13.5, KV cache 2.15, activations "
        r"0.\d+\) but cuda has 8 GB available; lower --contexts",
    ):
        check_fits(plan, "float16", 8 * 10**9, "cuda")


def test_preflight_counts_every_copy_of_a_component_chain(tiny_arch):
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.selection.memory import plan_peak

    plan = BuildPlan(tiny_arch, widths=(1.0,), prompt_lens=(16,), contexts=(512,))
    one, _ = plan_peak(plan, "float32")
    need, label = plan_peak(plan, "float32", lambda component, h, kv, f: 64)
    assert label == "a chain of 64 attn blocks at decode context 512"
    # 64 copies, each with its own KV: 2 x 4 kv heads x 8 x (1 + 512 + 16) tokens x 4 B.
    assert need.kv_cache_bytes == 64 * 2 * 4 * 8 * 529 * 4 and need.total_bytes > one.total_bytes


def test_build_refuses_before_writing_anything(tmp_path, tiny_arch, monkeypatch):
    from amoeba_profile.backends import get_backend

    from amoeba_profile.measure import build
    from amoeba_profile.measure.plan import BuildPlan

    monkeypatch.setattr(build, "available_memory_bytes", lambda device: 10**6)
    out = tmp_path / "lut"
    with pytest.raises(UsageError, match="but cpu has 0.001 GB available"):
        build.run_build(BuildPlan(tiny_arch, prompt_lens=(16,), contexts=(16,)), get_backend("pytorch"), out)
    assert not out.exists()


def test_a_quality_table_of_another_model_is_named_or_refused(tmp_path, tiny_arch):
    """Scores are matched by depth and width: another model's CSV would rank this one's shapes
    silently. Shapes named for another model get a warning; shapes deeper than this one are refused."""
    space = list(DesignSpace(tiny_arch, (2, 4), (1.0, 0.5)).subnets())
    rows = "".join(f"{{}}_l{layers}w{width},{0.1 * layers + width}\n" for layers in (2, 4) for width in (1.0, 0.5))
    other = tmp_path / "other.csv"
    other.write_text("name,score\n" + rows.format(*["llama2-7b"] * 4))
    chosen = select(Predictor(_lut(tiny_arch)), space, Workload(1, 16, 20), "tpot_ms", 1e6, quality=load_quality(other))
    assert chosen.quality_warning == (
        f"{other}: line 2 scores a shape of 'llama2-7b', this table is 'tiny'; its "
        "scores are matched by depth and width only - check it is this model's "
        "quality CSV"
    )
    assert chosen.to_dict()["quality_warning"] == chosen.quality_warning
    own = tmp_path / "own.csv"
    own.write_text("name,score\n" + rows.format(*["Tiny-hf"] * 4))  # the same model, spelled otherwise
    assert (
        select(
            Predictor(_lut(tiny_arch)), space, Workload(1, 16, 20), "tpot_ms", 1e6, quality=load_quality(own)
        ).quality_warning
        is None
    )
    deeper = tmp_path / "deeper.csv"
    deeper.write_text("num_layers,width_ratio,score\n2,1,0.2\n2,0.5,0.1\n4,1,0.4\n4,0.5,0.3\n32,1,1.0\n")
    with pytest.raises(
        UsageError,
        match=rf"^{deeper}: line 6: 32 layers, but tiny has 4: these are scores of "
        "another model; pass tiny's quality CSV$",
    ):
        select(Predictor(_lut(tiny_arch)), space, Workload(1, 16, 20), "tpot_ms", 1e6, quality=load_quality(deeper))
