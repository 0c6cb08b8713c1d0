"""The MLC-LLM backend: shape rules, the model folder it compiles from (config, tensor cache,
tokenizer), its command lines, artifact keys and metrics parsing always; real compiles and
requests only where mlc_llm and a CUDA GPU are.

The usage sample in tests/data/ is constructed from MLC-LLM's metrics serializer (see its
``_about``), not recorded: MLC-LLM cannot be installed on the machines this suite runs on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from amoeba_profile.backends import backend_class
from amoeba_profile.backends.base import EngineSpec
from amoeba_profile.backends.mlc_llm import adapter as mlc_llm
from amoeba_profile.backends.mlc_llm.adapter import (
    MlcLlmBackend,
    MlcLlmConfig,
    RequestTiming,
    chat_config,
    check_mlc_shape,
    compile_command,
    compile_environment,
    cuda_arch,
    engine_config_fields,
    parse_usage,
    tokenizer_json,
    tpot_prompt_len,
    tpot_sample_ms,
    write_model_folder,
)
from amoeba_profile.backends.mlc_llm.weights import (
    NDARRAY_CACHE_INDEX,
    SHARD_FILE,
    TENSOR_CACHE_INDEX,
    llama_params,
    write_tensor_cache,
)
from test_export import mlc_llama_shape

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import AmoebaError, UnsupportedShape, UsageError
from amoeba_profile.measure.artifacts import ArtifactCache, artifact_key

USAGE = json.loads((Path(__file__).parent / "data" / "mlc-llm-79d603f0-usage.json").read_text())
MLC = MlcLlmBackend.availability()
NUMPY_DTYPE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


def spec(arch: ModelArch, layers, batch: int = 1) -> EngineSpec:
    return EngineSpec(arch, tuple(layers), batch, 40, 42)


def read_tensor_cache(folder: Path, index_name: str = TENSOR_CACHE_INDEX) -> dict[str, np.ndarray]:
    """What TVM's ``tvmjs.load_tensor_cache`` does, in numpy: each record's bytes of its shard."""
    index = json.loads((folder / index_name).read_text())
    arrays = {}
    for shard in index["records"]:
        raw = (folder / shard["dataPath"]).read_bytes()
        assert shard["format"] == "raw-shard" and shard["nbytes"] == len(raw)
        assert shard["md5sum"] == hashlib.md5(raw).hexdigest()
        for rec in shard["records"]:
            assert rec["format"] == "raw" and rec["byteOffset"] + rec["nbytes"] <= len(raw)
            data = raw[rec["byteOffset"] : rec["byteOffset"] + rec["nbytes"]]
            arrays[rec["name"]] = np.frombuffer(data, NUMPY_DTYPE[rec["dtype"]]).reshape(rec["shape"])
    return arrays


def test_uniform_spec_becomes_mlc_chat_config(tiny_arch):
    s = spec(tiny_arch, [(4, 2, 64)] * 3)
    check_mlc_shape(s)
    config = chat_config(s, "float16")
    assert mlc_llama_shape(config) == (3, 4, 2, 8, 64)  # (layers, heads, kv heads, head_dim, ffn) as MLC reads it
    model = config["model_config"]
    assert model["max_batch_size"] == 1 and model["vocab_size"] == 256 and model["context_window_size"] == 512
    assert config["quantization"] == "q0f16" and config["model_type"] == "llama"
    assert config["tokenizer_files"] == ["tokenizer.json"]
    assert config["tokenizer_info"]["token_postproc_method"] == "byte_fallback"
    assert chat_config(s, "float32")["quantization"] == "q0f32"


@pytest.mark.parametrize(
    "layers, batch, reason",
    [
        (
            [(8, 4, 128), (4, 2, 64)],
            1,
            r"layers differ in shape \(2 distinct.*one num_attention_heads, num_key_value_heads "
            r"and intermediate_size for every layer.*paged KV cache",
        ),
        ([(8, 4, 128), (8, 4, 96)], 1, r"layers differ in shape"),  # FFN alone differs: still one shape in MLC
        (
            [(6, 3, 128)] * 2,
            1,
            r"6 query heads do not divide hidden_size 64: .*asserts hidden_size % num_attention_heads",
        ),
        ([], 1, r"without decoder layers.*pipeline_parallel_stages"),
        ([(8, 4, 128)], 2, r"a batch of 2"),
    ],
)
def test_shapes_mlc_cannot_express_are_unsupported_with_the_reason(tiny_arch, layers, batch, reason):
    with pytest.raises(UnsupportedShape, match=reason):
        check_mlc_shape(spec(tiny_arch, layers, batch))


def test_capabilities_are_declared_by_the_adapter_without_importing_mlc():
    caps = backend_class("mlc-llm").capabilities()
    assert (caps.per_layer_heads, caps.per_layer_ffn) == (False, False)
    assert caps.methods == ("difference",) and caps.devices == ("cuda",)
    assert caps.dtypes == ("float16", "bfloat16", "float32")


def test_params_have_mlc_llama_names_and_shapes(tiny_arch):
    params = {p.name: p for p in llama_params(tiny_arch, ((4, 2, 64), (8, 4, 128)))}
    assert len(params) == 1 + 2 * 6 + 1 + 1  # embeddings, 6 per layer, final norm, untied lm_head
    assert params["model.embed_tokens.weight"].shape == (256, 64) and params["lm_head.weight"].shape == (256, 64)
    assert params["model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 * 2) * 8, 64)
    assert params["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 8)
    assert params["model.layers.1.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    assert params["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    assert [n for n, p in params.items() if p.ones] == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ]
    tied = ModelArch("tied", 64, 4, 8, 4, 8, 128, 256, tie_embeddings=True)
    assert "lm_head.weight" not in {p.name for p in llama_params(tied, ((8, 4, 128),))}


@pytest.mark.parametrize("dtype, one", [("float16", 1.0), ("float32", 1.0), ("bfloat16", 0x3F80)])
def test_tensor_cache_round_trips(tmp_path, tiny_arch, dtype, one):
    params = llama_params(tiny_arch, ((8, 4, 128),) * 2)
    index = write_tensor_cache(tmp_path, params, dtype)
    arrays = read_tensor_cache(tmp_path)
    assert list(arrays) == [p.name for p in params]
    itemsize = 4 if dtype == "float32" else 2
    shard = index["records"][0]
    # One region of ones (a hidden-size norm) and one random region as long as the largest weight.
    assert shard["nbytes"] == (64 + 256 * 64) * itemsize == (tmp_path / SHARD_FILE).stat().st_size
    for p in params:
        array = arrays[p.name]
        assert array.shape == p.shape
        if p.ones:
            assert (array == one).all()
        elif dtype != "bfloat16":  # 0.02 itself rounds up in float16
            values = array.astype(np.float32)
            assert np.abs(values).max() <= 0.0201 and values.std() > 0.005
    embed = arrays["model.embed_tokens.weight"]
    if dtype == "bfloat16":  # the top half of each float32: back to float32 by a shift
        embed = (embed.astype(np.uint32) << 16).view(np.float32)
    embed = embed.astype(np.float32)
    assert np.abs(embed).max() <= 0.0201 and embed.std() > 0.005
    assert index["metadata"] == {
        "ParamSize": len(params),
        "ParamBytes": float(sum(p.numel for p in params) * itemsize),
        "BitsPerParam": 8.0 * itemsize,
    }


def test_tensor_cache_index_is_named_as_the_installed_tvm_reads_it(tmp_path, tiny_arch):
    assert mlc_llm.cache_index_name(SimpleNamespace(dump_tensor_cache=print)) == TENSOR_CACHE_INDEX
    assert mlc_llm.cache_index_name(SimpleNamespace(dump_ndarray_cache=print)) == NDARRAY_CACHE_INDEX
    write_tensor_cache(tmp_path, llama_params(tiny_arch, ((8, 4, 128),)), "float16", NDARRAY_CACHE_INDEX)
    assert not (tmp_path / TENSOR_CACHE_INDEX).exists()
    assert "model.norm.weight" in read_tensor_cache(tmp_path, NDARRAY_CACHE_INDEX)
    with pytest.raises(UsageError, match="not 'int8'"):
        write_tensor_cache(tmp_path, [], "int8")


def test_model_folder_holds_what_compile_and_engine_read(tmp_path, tiny_arch):
    s = spec(tiny_arch, [(8, 4, 128)] * 2)
    write_model_folder(tmp_path, s, "float16", TENSOR_CACHE_INDEX)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mlc-chat-config.json",
        SHARD_FILE,
        "tensor-cache.json",
        "tokenizer.json",
    ]
    assert json.loads((tmp_path / "mlc-chat-config.json").read_text()) == chat_config(s, "float16")
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 256 and sorted(vocab.values()) == list(range(256)) and vocab["</s>"] == 2


def test_tokenizer_decodes_every_id():
    tokenizers = pytest.importorskip(
        "tokenizers", reason="Hugging Face tokenizers (MLC's tokenizer library) checks the file"
    )
    tokenizer = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(300)))
    assert tokenizer.get_vocab_size() == 300
    assert tokenizer.id_to_token(299) == "t299" and tokenizer.token_to_id("t7") == 7
    assert tokenizer.decode([5, 6, 299]) == "t5t6t299"  # a decoder joins tokens as they are


def test_compile_command_and_environment(tmp_path):
    command = compile_command(
        "/venv/bin/python", tmp_path / "mlc-chat-config.json", "cuda:1", "q0f16", "O2", tmp_path / "lib.so"
    )
    assert command == [
        "/venv/bin/python",
        "-m",
        "mlc_llm",
        "compile",
        str(tmp_path / "mlc-chat-config.json"),
        "--model-type",
        "llama",
        "--quantization",
        "q0f16",
        "--device",
        "cuda:1",
        "--opt",
        "O2",
        "--output",
        str(tmp_path / "lib.so"),
    ]
    assert compile_environment({"PATH": "/bin", "MLC_MULTI_ARCH": "80,86"}) == {"PATH": "/bin"}
    assert (mlc_llm.mlc_device("cuda"), mlc_llm.mlc_device("cuda:2")) == ("cuda:0", "cuda:2")
    assert (cuda_arch("8.6"), cuda_arch("8.7"), cuda_arch("9.0")) == ("sm_86", "sm_87", "sm_90")


def test_engine_is_sized_to_the_spec(tiny_arch):
    fields = engine_config_fields(EngineSpec(tiny_arch, ((8, 4, 128),), 1, 136, 138))
    assert fields == {
        "max_num_sequence": 1,
        "max_single_sequence_length": 138,
        "max_total_sequence_length": 276,
        "prefix_cache_mode": "radix",
        "verbose": False,
    }


def _backend(dtype: str = "float16", arch: str = "sm_86", version: str = "0.20.dev1") -> MlcLlmBackend:
    """An instance without MLC-LLM: the fields the artifact key reads, as ``__init__`` sets them."""
    backend = MlcLlmBackend.__new__(MlcLlmBackend)
    backend.config, backend.arch = MlcLlmConfig("cuda", dtype, "O2"), arch
    backend._versions = {"mlc-llm": version, "tvm": "0.22.dev0"}
    return backend


def test_artifacts_are_keyed_by_shape_dtype_versions_and_gpu_architecture(tmp_path, tiny_arch):
    cache, s = ArtifactCache(tmp_path), spec(tiny_arch, [(8, 4, 128)] * 2)
    path = cache.path_for(_backend(), s)
    assert path.parent == tmp_path / "mlc-llm" and path == cache.path_for(_backend(), s)
    key = artifact_key(_backend(), s)
    assert key["device_arch"] == "sm_86" and key["config"] == {"device": "cuda", "dtype": "float16", "opt": "O2"}
    others = {
        cache.path_for(_backend(arch="sm_87"), s),
        cache.path_for(_backend(dtype="float32"), s),
        cache.path_for(_backend(version="0.20.dev2"), s),
        cache.path_for(_backend(), spec(tiny_arch, [(8, 4, 128)])),
    }
    assert path not in others and len(others) == 4


def test_usage_metrics_parse_into_request_timings():
    ttft = parse_usage(USAGE["ttft_request"])
    assert ttft == RequestTiming(128, 1, 128, 0, pytest.approx(21.342), pytest.approx(21.587))
    long, short = parse_usage(USAGE["tpot_long"]), parse_usage(USAGE["tpot_short"])
    assert (long.prefill_tokens, long.decode_tokens, short.prefill_tokens) == (1, 8, 1)  # prefix-cached prompts
    assert long.decode_ms == pytest.approx(171.003 - 19.871)
    assert tpot_sample_ms(long, short, 8) == pytest.approx((171.003 - 20.012) / 8)
    assert tpot_prompt_len(128, 8) == 125 and tpot_prompt_len(4, 8) == 1
    long.expect(125, 9)
    with pytest.raises(AmoebaError, match="served 125 prompt and 9 output tokens; the request asked for 125 and 17"):
        long.expect(125, 17)


class ScriptedEngine:
    """Stands in for ``MlcLlmEngine``: answers requests with the timings queued in ``answers`` (MLC's
    prefill count and end-to-end ms per request) and logs (prompt, tokens) of each request."""

    def __init__(self, answers):
        self.answers, self.calls, self.drawn = list(answers), [], 0

    def random_prompt(self, tokens: int) -> list[int]:
        self.drawn += 1
        return [self.drawn] * tokens

    def request(self, prompt: list[int], tokens: int) -> RequestTiming:
        self.calls.append((prompt, tokens))
        prefilled, e2e_ms = self.answers.pop(0)
        return RequestTiming(len(prompt), tokens, prefilled, tokens - 1, e2e_ms / 2, e2e_ms)


def test_ttft_sample_is_one_whole_prefill_request():
    engine = ScriptedEngine([(15, 9.0), (16, 11.0)])  # the first fresh prompt hit the prefix cache
    piece = mlc_llm._TtftPiece(engine, 16)
    assert piece.max_steps == 1 and piece.sample_ms(1) == 11.0
    assert [tokens for _, tokens in engine.calls] == [1, 1] and engine.drawn == 2
    with pytest.raises(AmoebaError, match="matched 3 fresh random 16-token prompts"):
        mlc_llm._TtftPiece(ScriptedEngine([(1, 5.0)] * 3), 16).sample_ms(1)


def test_tpot_sample_is_a_request_pair_over_the_cached_prompt():
    engine = ScriptedEngine([(125, 30.0), (1, 100.0), (1, 20.0)])
    piece = mlc_llm._TpotPiece(engine, 128, 8)  # sends the prompt once, untimed, to fill the prefix cache
    assert piece.sample_ms(1) == pytest.approx((100.0 - 20.0) / 8)
    assert [(len(prompt), tokens) for prompt, tokens in engine.calls] == [(125, 1), (125, 9), (125, 1)]
    assert len({tuple(prompt) for prompt, _ in engine.calls}) == 1  # one prompt throughout
    engine.answers = [(125, 100.0), (1, 20.0)]  # the cache lost the prompt: that sample has a prefill in it
    with pytest.raises(AmoebaError, match="prefilled 125 of a cached 125-token prompt"):
        piece.sample_ms(1)


@pytest.mark.parametrize(
    "usage, message",
    [
        ({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "no usage.extra"),
        ({"extra": {"prompt_tokens": 1}}, "lacks or mangles field 'completion_tokens'"),
        ({"extra": {**USAGE["tpot_short"]["extra"], "ttft_s": 0.5}}, "ttft 500.000 ms and end-to-end 20.012 ms"),
    ],
)
def test_malformed_usage_is_refused(usage, message):
    with pytest.raises(AmoebaError, match=message):
        parse_usage(usage)


def test_out_of_memory_is_recognised():
    backend = _backend()
    assert backend.is_out_of_memory(RuntimeError("Insufficient GPU memory error: The available single GPU memory"))
    assert backend.is_out_of_memory(RuntimeError("CUDA: out of memory"))
    assert not backend.is_out_of_memory(RuntimeError("mlc_llm compile exited 1"))


@pytest.mark.skipif(MLC.ok, reason="mlc_llm and a CUDA GPU are present here")
def test_unavailable_says_why_and_how_to_install():
    assert not MLC.ok and ("mlc_llm" in MLC.reason or "CUDA" in MLC.reason)
    assert "mlc-llm-nightly" in MLC.install_hint and "nvcc" in MLC.install_hint


@pytest.mark.gpu
@pytest.mark.skipif(not MLC.ok, reason=f"needs mlc_llm and a CUDA GPU: {MLC.reason}")
def test_cuda_build_measures_through_the_engine(tmp_path, tiny_arch):
    from amoeba_profile.backends import get_backend

    from amoeba_profile.core.timing import TimingProtocol
    from amoeba_profile.measure.build import run_build
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.table.lut import load_table

    backend = get_backend("mlc-llm", device="cuda")
    assert backend.device_arch().startswith("sm_") and set(backend.versions()) == {"mlc-llm", "tvm"}
    plan = BuildPlan(tiny_arch, (1.0,), (16,), (16, 32), method="difference", depths=(1, 2, 4))
    lut = load_table(
        run_build(
            plan, backend, tmp_path / "lut", TimingProtocol.quick(), artifacts=ArtifactCache(tmp_path / "artifacts")
        ).path
    )
    models = lut.frame[lut.frame.component == "model"]
    assert (models[models.num_layers > 0].status == "ok").all()
    assert (models[models.num_layers == 0].status == "unsupported").all()
    assert lut.meta.clock.startswith("MLC-LLM engine metrics")


def test_a_request_keeps_the_engines_usage_raw_when_asked(tmp_path, monkeypatch):
    """The engine's glue on a stand-in MLCEngine: the usage of each completion is parsed, checked and,
    with AMOEBA_RAW_DIR set, kept as the engine returned it (the device scripts' first run)."""
    from amoeba_profile.backends import base

    usage = USAGE["ttft_request"]
    sent = []

    def create(**request):
        sent.append(request)
        return SimpleNamespace(usage=SimpleNamespace(model_dump=lambda: usage))

    engine = object.__new__(mlc_llm.MlcLlmEngine)  # its __init__ imports mlc_llm
    engine.engine = SimpleNamespace(completions=SimpleNamespace(create=create))
    monkeypatch.setenv(base.RAW_DIR_VAR, str(tmp_path / "raw"))
    timing = engine.request(list(range(128)), 1)
    assert timing.e2e_ms == pytest.approx(21.587) and timing.prefill_tokens == 128
    assert sent[0]["max_tokens"] == 1 and sent[0]["extra_body"] == {"debug_config": {"ignore_eos": True}}
    (kept,) = [json.loads(line) for line in (tmp_path / "raw" / "mlc-llm" / "usage.jsonl").open()]
    assert kept == usage


# --- python -m mlc_llm.bench (amoeba_profile.measure.crosscheck) ------------------------------------------
# Its --output CSV, CONSTRUCTED from bench/request_record.py (generate_metrics_summary flattened by
# convert_reports_to_df: nested keys joined by dots), one pipeline; not recorded.
MLC_BENCH_CSV = (
    "exec_feature,num_gpus,duration,num_total_requests,num_completed_requests,request_throughput,"
    "end_to_end_latency_s.mean,time_to_first_token_s.quantiles.p50,time_to_first_token_s.mean,"
    "time_per_output_token_s.quantiles.p50,time_per_output_token_s.mean,input_tokens.mean,output_tokens.mean\n"
    '"{""num_concurrent_requests"": 1}",1,2.0,5,5,2.5,0.4,0.0123,0.0125,0.0031,0.0032,65.0,128.0\n'
)


def test_mlc_bench_command_and_csv(tmp_path):
    from amoeba_profile.core.workload import Workload

    workload = Workload(1, 64, 128)
    command = mlc_llm.mlc_bench_command(
        "/venv/bin/python", tmp_path / "m", tmp_path / "p.txt", workload, 5, 8123, tmp_path / "o.csv"
    )
    assert command == [
        "/venv/bin/python",
        "-m",
        "mlc_llm.bench",
        "--dataset",
        "llmperf",
        "--dataset-path",
        str(tmp_path / "p.txt"),
        "--tokenizer",
        str(tmp_path / "m"),
        "--mlc-model-lib",
        str(tmp_path / "m" / "lib.so"),
        "--mlc-engine-config",
        "max_num_sequence=1;max_total_seq_length=200;prefix_cache_mode=disable",
        "--num-gpus",
        "1",
        "--num-requests",
        "5",
        "--num-warmup-requests",
        "2",
        "--num-concurrent-requests",
        "1",
        "--input-len",
        "64",
        "--input-len-std",
        "0",
        "--output-len",
        "128",
        "--output-len-std",
        "0",
        "--temperature",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--disable-tqdm",
        "--output",
        str(tmp_path / "o.csv"),
    ]
    assert mlc_llm.parse_mlc_bench_csv(MLC_BENCH_CSV, workload) == pytest.approx((12.3, 3.1))
    with pytest.raises(AmoebaError, match="completed 4 of 5"):
        mlc_llm.parse_mlc_bench_csv(MLC_BENCH_CSV.replace(",5,5,", ",5,4,"), workload)
    with pytest.raises(AmoebaError, match="returned 128 tokens on average, not 64"):
        mlc_llm.parse_mlc_bench_csv(MLC_BENCH_CSV, Workload(1, 64, 64))
    with pytest.raises(AmoebaError, match="time_per_output_token_s.quantiles.p50"):
        mlc_llm.parse_mlc_bench_csv(MLC_BENCH_CSV.replace("time_per_output_token_s.quantiles.p50", "x"), workload)


def test_benchmark_tools_tokenize_the_synthetic_vocabulary_one_word_per_token(tmp_path):
    """mlc_llm.bench and trtllm-bench load the tokenizer with transformers' AutoTokenizer: the files
    load from a folder with no model config.json, and P words are P tokens."""
    from transformers import AutoTokenizer

    for name, text in mlc_llm.hf_tokenizer_files(512, 256).items():
        (tmp_path / name).write_text(text)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer("t5 t300 t17", add_special_tokens=False).input_ids == [5, 300, 17]
    assert tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == 256


def test_crosscheck_refuses_what_mlc_llm_bench_cannot_run(tmp_path):
    from amoeba_profile.core.workload import Workload

    backend = object.__new__(MlcLlmBackend)  # its __init__ imports mlc_llm and tvm
    with pytest.raises(UnsupportedShape, match="one request at a time"):
        backend.crosscheck_tool(ModelArch("m", 64, 2, 4, 2, 16, 128, 512), Workload(2, 64, 9), tmp_path, 5)
    with pytest.raises(UsageError, match="at least 40 tokens"):
        backend.crosscheck_tool(ModelArch("m", 64, 2, 4, 2, 16, 128, 512), Workload(1, 16, 9), tmp_path, 5)
