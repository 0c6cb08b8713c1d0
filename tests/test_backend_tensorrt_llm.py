"""The tensorrt-llm backend: what it writes and passes to TensorRT-LLM, and how it reads the
library's timings, offline; a real engine only where TensorRT-LLM and a GPU are present.

TensorRT-LLM does not install on this CPU machine, so the library's side is taken from its source
(NVIDIA/TensorRT-LLM; commits in backends/tensorrt_llm.py's docstring). The perf-metrics sample,
tests/data/trtllm-perf-metrics-openai-server-format.json, is written by hand in the JSON form that
``trtllm-serve``'s ``/perf_metrics`` returns (``tensorrt_llm/serve/openai_server.py``
``get_perf_metrics``: ``first_iter``, ``last_iter``, ``timing_metrics`` in steady-clock seconds,
``kv_cache_metrics``), for a batch of 2 requests of 1 + 8 tokens; it was not captured from a run.
Its iteration counts and timestamp order follow ``tests/unittest/llmapi/test_llm.py``
``test_llm_perf_metrics`` (arrival < first scheduled < first token < last token;
``iter - first_iter == max_tokens - 1``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from amoeba_profile.backends import REGISTRY, backend_class, get_backend
from amoeba_profile.backends.base import EngineSpec
from amoeba_profile.backends.flows import UNAVAILABLE, flow_capabilities, list_flows
from amoeba_profile.backends.tensorrt_llm import adapter as trt

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import AmoebaError, BackendUnavailable, UnsupportedShape, UsageError
from amoeba_profile.core.export import deci_config_module
from amoeba_profile.core.workload import tpot_prompt_tokens
from amoeba_profile.measure.artifacts import ArtifactCache, artifact_key

DATA = Path(__file__).parent / "data"
PERF_SAMPLE = DATA / "trtllm-perf-metrics-openai-server-format.json"
# head_dim 64, as TensorRT-LLM's attention kernels expect; FFN widths multiples of 256.
ARCH = ModelArch("trt-tiny", 256, 4, 4, 2, 64, 1024, 1024, max_position=512)
UNIFORM = ((4, 2, 1024),) * 3
PER_LAYER_FFN = ((4, 2, 1024), (4, 2, 512), (4, 2, 600))
MIXED_HEADS = ((4, 2, 1024), (2, 1, 1024))


def _spec(layers, batch=2) -> EngineSpec:
    return EngineSpec(ARCH, layers, batch, 64, 66)


class StandIn(trt.TensorRtLlmBackend):
    """The adapter without the library or a GPU: fixed versions and an sm_90 device."""

    VERSIONS = {"tensorrt_llm": "1.0.0", "torch": "2.7.1", "transformers": "4.53.1"}

    def versions(self) -> dict[str, str]:
        return dict(self.VERSIONS)

    def device_arch(self) -> str:
        return "sm_90"


def _reader_ffn(ffn_mult: float, hidden: int) -> int:
    """TensorRT-LLM's width for ``ffn_mult`` (_torch/models/modeling_nemotron_nas.py
    ``_ffn_mult_to_intermediate_size``): int(2 * mult * hidden / 3), rounded up to a multiple of 256."""
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def _remote_config_class(folder: Path):
    """DeciLMConfig imported from the artifact's own file, as transformers' trust_remote_code does."""
    spec = importlib.util.spec_from_file_location("configuration_decilm", folder / trt.REMOTE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DeciLMConfig


def test_uniform_shape_is_a_plain_llama_folder():
    folder = trt.model_folder(_spec(UNIFORM), "float16")
    config = folder.config
    assert folder.form == "llama" and folder.adjustments == () and list(folder.files()) == ["config.json"]
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (3, 4, 2)
    assert (config["intermediate_size"], config["head_dim"], config["hidden_size"]) == (1024, 64, 256)
    assert config["torch_dtype"] == "float16" and config["vocab_size"] == 1024


def test_per_layer_ffn_is_a_deci_folder_that_reads_back_to_the_widths(tmp_path):
    folder = trt.model_folder(_spec(PER_LAYER_FFN), "bfloat16")
    assert folder.form == "nemotron-nas" and set(folder.files()) == {"config.json", trt.REMOTE_CONFIG}
    blocks = folder.config["block_configs"]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, 2, 2]
    assert [b["ffn"]["ffn_mult"] for b in blocks] == [6.0, 3.0, 4.5]
    assert folder.adjustments == (
        "layer 2: FFN 600 written as 768 (ffn_mult 4.5; the readers round FFN widths up to a multiple of 256)",
    )
    for name, text in folder.files().items():
        (tmp_path / name).write_text(text)
    loaded = _remote_config_class(tmp_path)(**json.loads((tmp_path / "config.json").read_text()))
    heads = loaded.num_attention_heads
    assert [heads // b.attention.n_heads_in_group for b in loaded.block_configs] == [2, 2, 2]
    assert [_reader_ffn(b.ffn.ffn_mult, loaded.hidden_size) for b in loaded.block_configs] == [1024, 512, 768]
    assert not any(
        b.attention.no_op or b.attention.replace_with_linear or b.ffn.no_op or b.ffn.replace_with_linear
        for b in loaded.block_configs
    )
    assert (loaded.head_dim, loaded.model_type) == (64, "nemotron-nas")
    assert loaded.to_dict()["block_configs"] == blocks  # saves back as plain dicts


def test_shapes_tensorrt_llm_cannot_hold_are_unsupported_with_the_reason():
    backend = StandIn()
    with pytest.raises(
        UnsupportedShape,
        match=r"TensorRT-LLM loads LLaMA or DeciLM.*layer 1 has 2 query heads and "
        r"layer 0 has 4",
    ):
        backend.check_spec(_spec(MIXED_HEADS))
    with pytest.raises(UnsupportedShape, match="without decoder layers"):
        backend.check_spec(_spec(()))
    backend.check_spec(_spec(PER_LAYER_FFN))  # per-layer FFN is fine


def test_llm_arguments_size_the_engine_to_the_spec():
    spec = EngineSpec(ARCH, UNIFORM, 4, 300, 302)
    kwargs = trt.llm_kwargs(spec, trt.TensorRtLlmConfig(), "llama")
    assert kwargs == {
        "skip_tokenizer_init": True,
        "trust_remote_code": False,
        "dtype": "float16",
        "load_format": "dummy",
        "max_batch_size": 4,
        "max_input_len": 300,
        "max_seq_len": 302,
        "max_num_tokens": 1200,
        "enable_chunked_prefill": False,
        "kv_cache_config": {"enable_block_reuse": False, "max_tokens": 1208, "free_gpu_memory_fraction": 0.9},
        "cuda_graph_config": {"batch_sizes": [4], "max_batch_size": 4, "enable_padding": False},
        "disable_overlap_scheduler": False,
        "return_perf_metrics": True,
        "batch_wait_timeout_ms": 5.0,
    }
    deci = trt.llm_kwargs(
        spec,
        trt.TensorRtLlmConfig(dtype="bfloat16", cuda_graphs=False, kv_cache_free_gpu_memory_fraction=0.5),
        "nemotron-nas",
    )
    assert (deci["trust_remote_code"], deci["dtype"], deci["cuda_graph_config"]) == (True, "bfloat16", None)
    assert deci["kv_cache_config"]["free_gpu_memory_fraction"] == 0.5


def test_cuda_graphs_are_captured_for_the_measured_batch():
    """TensorRT-LLM's own list from max_batch_size (1-31, 32, 64, 128, powers of two, max) skips e.g. 48;
    the batch the table measures is passed explicitly, whatever it is, and recorded in engine.json."""
    for batch in (1, 8, 48):
        graphs = trt.llm_kwargs(EngineSpec(ARCH, UNIFORM, batch, 64, 66), trt.TensorRtLlmConfig(), "llama")[
            "cuda_graph_config"
        ]
        assert graphs == {"batch_sizes": [batch], "max_batch_size": batch, "enable_padding": False}


def test_batch_gathering_applies_to_batches_above_one():
    one = trt.llm_kwargs(EngineSpec(ARCH, UNIFORM, 1, 64, 66), trt.TensorRtLlmConfig(), "llama")
    assert "batch_wait_timeout_ms" not in one  # one sequence needs no gathering, and no decode step waits
    four = trt.llm_kwargs(
        EngineSpec(ARCH, UNIFORM, 4, 64, 66), trt.TensorRtLlmConfig(batch_wait_timeout_ms=20.0), "llama"
    )
    assert four["batch_wait_timeout_ms"] == 20.0 and four["max_batch_size"] == 4


def test_sampling_parameters_are_greedy_fixed_length_and_timed():
    assert trt.sampling_kwargs(9) == {
        "max_tokens": 9,
        "end_id": 2,
        "ignore_eos": True,
        "detokenize": False,
        "return_perf_metrics": True,
    }
    # greedy: the LLM API reads no temperature, top_k and top_p as greedy decoding
    assert not {"temperature", "top_k", "top_p"} & set(trt.sampling_kwargs(1))


def test_recorded_perf_metrics_give_ttft_and_tpot():
    items = json.loads(PERF_SAMPLE.read_text())
    timings = [trt.request_timing(item["perf_metrics"], 9) for item in items]
    assert [item["perf_metrics"]["last_iter"] - item["perf_metrics"]["first_iter"] for item in items] == [8, 8]
    assert timings[0] == trt.RequestTiming(1523.104211, 1523.104873, 1523.112406, 1523.121278, 9, 40)
    assert trt.batch_tpot_ms(timings, 8) == pytest.approx((1523.121278 - 1523.112406) * 1e3 / 8)
    assert trt.batch_tpot_ms(timings, 8) == pytest.approx(1.109, abs=1e-6)
    one_token = [dataclasses.replace(t, output_tokens=1) for t in timings]
    assert trt.batch_ttft_ms(one_token) == pytest.approx((1523.112406 - 1523.104211) * 1e3)  # first arrival
    with pytest.raises(AmoebaError, match=r"returned \[9\] output tokens where 1"):
        trt.batch_ttft_ms(timings)
    with pytest.raises(AmoebaError, match=r"returned \[9\] output tokens where 5"):
        trt.batch_tpot_ms(timings, 4)


def _stamped(first_iter: int, arrival: float, first_token: float, last_token: float, tokens: int):
    """A request's perf metrics as the binding gives them (timedelta stamps), converted like a real one."""
    stamps = {
        "arrival_time": arrival,
        "first_scheduled_time": arrival + 0.0005,
        "first_token_time": first_token,
        "last_token_time": last_token,
    }
    binding = SimpleNamespace(
        first_iter=first_iter,
        last_iter=first_iter + tokens - 1,
        timing_metrics=SimpleNamespace(**{k: timedelta(seconds=v) for k, v in stamps.items()}),
        kv_cache_metrics=SimpleNamespace(
            num_total_allocated_blocks=1, num_new_allocated_blocks=1, num_reused_blocks=0, num_missed_blocks=1
        ),
    )
    return trt.request_timing(trt.perf_metrics_json(binding), tokens)


def test_a_batch_prefilled_over_several_iterations_is_refused():
    # 3 requests gathered into iteration 12: one batched prefill; ttft from the first arrival
    together = [
        _stamped(12, 10.000, 10.020, 10.020, 1),
        _stamped(12, 10.001, 10.020, 10.020, 1),
        _stamped(12, 10.002, 10.021, 10.021, 1),
    ]
    assert trt.batch_ttft_ms(together) == pytest.approx(21.0, abs=1e-3)
    # the third request fetched an iteration later: its prefill ran apart from the others'
    apart = together[:2] + [_stamped(13, 10.002, 10.031, 10.031, 1)]
    with pytest.raises(
        AmoebaError, match=r"prefilled the batch of 3 over iterations \[12, 13\].*batch_wait_timeout_ms"
    ):
        trt.batch_ttft_ms(apart)
    decode_apart = [_stamped(12, 10.0, 10.02, 10.10, 9), _stamped(14, 10.0, 10.04, 10.12, 9)]
    with pytest.raises(AmoebaError, match=r"over iterations \[12, 14\]"):
        trt.batch_tpot_ms(decode_apart, 8)
    assert trt.batch_tpot_ms([_stamped(12, 10.0, 10.02, 10.10, 9)] * 2, 8) == pytest.approx(10.0, abs=1e-3)


def test_a_sample_reads_the_requests_metrics_and_keeps_them_raw(tmp_path, monkeypatch):
    """The workpiece's glue on a stand-in LLM: each generate() output's RequestPerfMetrics binding is
    read into timings (first_iter included) and, with AMOEBA_RAW_DIR set, kept as served."""
    from amoeba_profile.backends import base

    def output(first_iter, arrival, first_token):
        stamps = {
            "arrival_time": arrival,
            "first_scheduled_time": arrival + 0.001,
            "first_token_time": first_token,
            "last_token_time": first_token,
        }
        metrics = SimpleNamespace(
            first_iter=first_iter,
            last_iter=first_iter,
            timing_metrics=SimpleNamespace(**{k: timedelta(seconds=v) for k, v in stamps.items()}),
            kv_cache_metrics=SimpleNamespace(
                num_total_allocated_blocks=1, num_new_allocated_blocks=1, num_reused_blocks=0, num_missed_blocks=1
            ),
        )
        return SimpleNamespace(outputs=[SimpleNamespace(request_perf_metrics=metrics, token_ids=[7])])

    served = [output(3, 5.000, 5.010), output(3, 5.002, 5.010)]
    piece = object.__new__(trt._RequestPiece)  # its __init__ imports tensorrt_llm for SamplingParams
    piece.engine = SimpleNamespace(llm=SimpleNamespace(generate=lambda prompts, params, use_tqdm: served))
    piece.prompts, piece.params, piece.metric = [[1, 2], [3, 4]], None, trt.batch_ttft_ms
    monkeypatch.setenv(base.RAW_DIR_VAR, str(tmp_path / "raw"))
    assert piece.sample_ms(1) == pytest.approx(10.0, abs=1e-3)
    (kept,) = [json.loads(line) for line in (tmp_path / "raw" / "tensorrt-llm" / "perf-metrics.jsonl").open()]
    assert [k["perf_metrics"]["first_iter"] for k in kept] == [3, 3] and kept[0]["output_tokens"] == 1
    assert kept[1]["perf_metrics"]["timing_metrics"]["arrival_time"] == pytest.approx(5.002)
    served[1] = output(4, 5.002, 5.020)
    with pytest.raises(AmoebaError, match=r"over iterations \[3, 4\]"):
        piece.sample_ms(1)


def test_broken_perf_metrics_are_refused():
    item = json.loads(PERF_SAMPLE.read_text())[0]["perf_metrics"]
    unfinished = {**item, "timing_metrics": {**item["timing_metrics"], "last_token_time": 0.0}}
    with pytest.raises(AmoebaError, match="out of order"):
        trt.request_timing(unfinished, 9)
    stamps = {k: v for k, v in item["timing_metrics"].items() if k != "first_token_time"}
    with pytest.raises(AmoebaError, match="lack or mangle field 'first_token_time'"):
        trt.request_timing({"timing_metrics": stamps, "first_iter": 40}, 9)
    for first_iter in (None, -1, "40"):  # a request never scheduled, or a mangled count
        with pytest.raises(AmoebaError, match="lack or mangle field 'first_iter'"):
            trt.request_timing({**item, "first_iter": first_iter}, 9)
    with pytest.raises(AmoebaError, match="lack or mangle field 'first_iter'"):
        trt.request_timing({k: v for k, v in item.items() if k != "first_iter"}, 9)
    with pytest.raises(AmoebaError, match="without perf metrics"):
        trt.perf_metrics_json(None)


def test_binding_metrics_convert_to_the_served_json_form():
    item = json.loads(PERF_SAMPLE.read_text())[0]["perf_metrics"]
    stamps = {k: timedelta(seconds=v) for k, v in item["timing_metrics"].items() if v is not None}
    binding = SimpleNamespace(
        first_iter=40,
        last_iter=48,
        timing_metrics=SimpleNamespace(**stamps),
        kv_cache_metrics=SimpleNamespace(**item["kv_cache_metrics"]),
    )
    converted = trt.perf_metrics_json(binding)
    served = {k: v for k, v in item["timing_metrics"].items() if v is not None}
    assert converted["timing_metrics"] == pytest.approx(served, abs=1e-6)  # timedelta keeps microseconds
    assert (converted["first_iter"], converted["kv_cache_metrics"]) == (40, item["kv_cache_metrics"])
    assert trt.request_timing(converted, 9).first_token_s == pytest.approx(1523.112406, abs=1e-6)


def test_tpot_prompt_centres_the_decode_window():
    # a request of 1 + n tokens over c - n//2 + 1 prompt tokens: decodes at KV lengths c - n//2 + 1 ...
    assert [tpot_prompt_tokens(c, 8) for c in (4, 128, 1000)] == [1, 125, 997]


def test_artifact_key_and_folder(tmp_path):
    cache, backend = ArtifactCache(tmp_path), StandIn()
    spec = _spec(PER_LAYER_FFN)
    key = artifact_key(backend, spec)
    assert key["backend"] == "tensorrt-llm" and key["device_arch"] == "sm_90"
    assert key["versions"]["tensorrt_llm"] == "1.0.0"
    assert key["config"] == {
        "device": "cuda",
        "dtype": "float16",
        "cuda_graphs": True,
        "kv_cache_free_gpu_memory_fraction": 0.9,
        "batch_wait_timeout_ms": 5.0,
    }
    path = cache.path_for(backend, spec)
    assert path == cache.path_for(StandIn(), _spec(PER_LAYER_FFN)) and path.parent == tmp_path / "tensorrt-llm"
    others = [
        cache.path_for(backend, _spec(PER_LAYER_FFN, batch=4)),
        cache.path_for(backend, _spec(UNIFORM)),
        cache.path_for(StandIn(dtype="bf16"), spec),
        cache.path_for(StandIn(cuda_graphs="false"), spec),
    ]

    class Newer(StandIn):
        VERSIONS = {**StandIn.VERSIONS, "tensorrt_llm": "1.1.0"}

    class Ampere(StandIn):
        def device_arch(self) -> str:
            return "sm_86"

    others += [cache.path_for(Newer(), spec), cache.path_for(Ampere(), spec)]
    assert len({path, *others}) == 7

    built = cache.ensure(backend, spec)
    assert built.compiled and cache.ensure(backend, spec).compiled is False
    record = json.loads((built.path / "engine.json").read_text())
    assert (record["flow"], record["form"], record["spec"]) == ("tensorrt-llm", "nemotron-nas", spec.to_dict())
    assert record["adjustments"] == [
        "layer 2: FFN 600 written as 768 (ffn_mult 4.5; the readers round FFN widths up to a multiple of 256)"
    ]
    assert record["llm_kwargs"] == trt.llm_kwargs(spec, backend.config, "nemotron-nas")
    assert (built.path / trt.REMOTE_CONFIG).read_text() == deci_config_module()
    with pytest.raises(UsageError, match="another engine"):
        backend.load(_spec(PER_LAYER_FFN, batch=4), built.path)


def test_options_are_checked():
    assert StandIn(
        cuda_graphs="false", kv_cache_free_gpu_memory_fraction="0.5", batch_wait_timeout_ms="12"
    ).config == trt.TensorRtLlmConfig("cuda", "float16", False, 0.5, 12.0)
    assert StandIn(dtype="bf16").dtype == "bfloat16"
    for options, message in (
        ({"device": "cpu"}, "first visible GPU"),
        ({"device": "cuda:1"}, "CUDA_VISIBLE_DEVICES"),
        ({"threads": 4}, "no thread count"),
        ({"dtype": "float32"}, "not 'float32'"),
        ({"cuda_graphs": "maybe"}, "true or false"),
        ({"kv_cache_free_gpu_memory_fraction": 1.5}, "fraction"),
        ({"batch_wait_timeout_ms": "-1"}, "ms >= 0"),
        ({"batch_wait_timeout_ms": "soon"}, "ms >= 0"),
    ):
        with pytest.raises(UsageError, match=message):
            StandIn(**options)


def test_out_of_memory_errors_are_recognised():
    backend = StandIn()
    import torch

    assert backend.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert backend.is_out_of_memory(
        RuntimeError("[TensorRT-LLM][ERROR] CUDA runtime error in cudaMalloc(&ptr, n): out of memory")
    )
    wrapped = RuntimeError("Executor worker returned error")
    wrapped.__cause__ = MemoryError()
    assert backend.is_out_of_memory(wrapped)
    assert not backend.is_out_of_memory(
        ValueError("The sum of prompt length (70) should not exceed max_num_tokens (64)")
    )


def test_listed_with_capabilities_and_install_hint():
    assert "tensorrt-llm" in REGISTRY
    caps = backend_class("tensorrt-llm").capabilities()
    assert (caps.per_layer_heads, caps.per_layer_ffn, caps.methods, caps.devices) == (
        False,
        True,
        ("difference",),
        ("cuda",),
    )
    assert flow_capabilities("tensorrt-llm") == caps
    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed here: the listing says measuring or why the GPU is missing")
    flow = next(f for f in list_flows() if f.name == "tensorrt-llm")
    assert (flow.status, flow.reason, flow.roofline_profile) == (UNAVAILABLE, "tensorrt_llm is not installed", True)
    assert flow.install_hint.startswith("pip install tensorrt-llm")
    with pytest.raises(BackendUnavailable, match="pip install tensorrt-llm"):
        get_backend("tensorrt-llm")


def _real_gpu() -> bool:
    import torch

    return importlib.util.find_spec("tensorrt_llm") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _real_gpu(), reason="needs TensorRT-LLM (pip install tensorrt-llm) and a CUDA GPU")
def test_llm_api_times_uniform_and_per_layer_engines(tmp_path):
    backend = get_backend("tensorrt-llm", device="cuda")
    cache = ArtifactCache(tmp_path)
    try:
        for layers in (UNIFORM, PER_LAYER_FFN):
            spec = _spec(layers)
            engine = backend.load(spec, cache.ensure(backend, spec).path)
            assert engine.compile_s > 0
            ttft, tpot = engine.ttft(2, 32).sample_ms(1), engine.tpot(2, 32, 8).sample_ms(1)
            assert 0 < tpot and 0 < ttft and math.isfinite(ttft + tpot)
            assert backend.load(spec, cache.path_for(backend, spec)) is engine and engine.compile_s == 0.0
    finally:
        backend.release_engine()
    assert backend.device_arch().startswith("sm_") and backend.environment()["kv_cache"]["enable_block_reuse"] is False


# --- trtllm-bench latency (amoeba_profile.measure.crosscheck) ---------------------------------------------
# A --report_json of a latency run, CONSTRUCTED from bench/dataclasses/reporting.py
# ReportUtility.get_statistics_dict (latency runs stream, so streaming_metrics is present), not recorded.
BENCH_REPORT = {
    "engine": {
        "model": "amoeba-trt-tiny",
        "model_path": "/w/model",
        "engine_dir": "None",
        "version": "1.1.0",
        "backend": "Pytorch",
        "dtype": "float16",
        "kv_cache_dtype": None,
        "quantization": None,
    },
    "world_info": {
        "tp_size": 1,
        "pp_size": 1,
        "ep_size": 1,
        "world_size": 1,
        "max_batch_size": 1,
        "max_num_tokens": 2048,
        "scheduling_policy": "GUARANTEED_NO_EVICT",
        "kv_cache_percentage": 0.9,
        "issue_rate": 5.0,
    },
    "request_info": {
        "num_requests": 5,
        "avg_num_concurrent_requests": 1.0,
        "avg_input_length": 64.0,
        "avg_output_length": 9.0,
    },
    "performance": {"total_latency_ms": 120.0, "avg_request_latency_ms": 24.0},
    "streaming_metrics": {
        "token_output_speed_tok_s": 400.0,
        "avg_ttft_ms": 4.2,
        "avg_tpot_ms": 2.45,
        "tpot_percentiles": {
            "minimum": 2.3,
            "maximum": 2.7,
            "average": 2.45,
            "p50": 2.4,
            "p90": 2.6,
            "p95": 2.65,
            "p99": 2.7,
        },
        "ttft_percentiles": {
            "minimum": 4.0,
            "maximum": 4.6,
            "average": 4.2,
            "p50": 4.1,
            "p90": 4.5,
            "p95": 4.55,
            "p99": 4.6,
        },
    },
}


def test_trtllm_bench_command_options_dataset_and_report():
    from amoeba_profile.core.workload import Workload

    workload, spec = Workload(1, 64, 9), EngineSpec(ARCH, PER_LAYER_FFN, 1, 64, 73)
    command = trt.trtllm_bench_command(
        "trtllm-bench",
        "amoeba-trt-tiny",
        Path("/w/model"),
        Path("/w/d.jsonl"),
        Path("/w/o.yaml"),
        Path("/w/r.json"),
        workload,
        5,
        0.9,
    )
    assert command == [
        "trtllm-bench",
        "--model",
        "amoeba-trt-tiny",
        "--model_path",
        "/w/model",
        "latency",
        "--backend",
        "pytorch",
        "--dataset",
        "/w/d.jsonl",
        "--num_requests",
        "5",
        "--warmup",
        "2",
        "--max_seq_len",
        "73",
        "--kv_cache_free_gpu_mem_fraction",
        "0.9",
        "--extra_llm_api_options",
        "/w/o.yaml",
        "--report_json",
        "/w/r.json",
    ]
    options = trt.bench_llm_options(spec, trt.TensorRtLlmConfig(), "nemotron-nas")
    assert options == {
        "trust_remote_code": True,
        "dtype": "float16",
        "load_format": "dummy",
        "enable_chunked_prefill": False,
        "kv_cache_config": {"enable_block_reuse": False, "max_tokens": 73, "free_gpu_memory_fraction": 0.9},
        "cuda_graph_config": {"batch_sizes": [1], "max_batch_size": 1, "enable_padding": False},
        "disable_overlap_scheduler": False,
    }
    lines = [json.loads(line) for line in trt.bench_dataset(workload, 3, 1024).splitlines()]
    assert [(r["task_id"], len(r["input_ids"]), r["output_tokens"]) for r in lines] == [
        (0, 64, 9),
        (1, 64, 9),
        (2, 64, 9),
    ]
    assert all(3 <= t < 1024 for r in lines for t in r["input_ids"])
    assert trt.parse_trtllm_bench_report(json.dumps(BENCH_REPORT), workload) == (4.1, 2.4)  # the medians
    with pytest.raises(AmoebaError, match="64 input and 9 output tokens on average, not 64 and 17"):
        trt.parse_trtllm_bench_report(json.dumps(BENCH_REPORT), Workload(1, 64, 17))
    with pytest.raises(AmoebaError, match="'streaming_metrics'"):
        trt.parse_trtllm_bench_report(
            json.dumps({k: v for k, v in BENCH_REPORT.items() if k != "streaming_metrics"}), workload
        )


def test_crosscheck_refuses_a_batch_trtllm_bench_latency_cannot_run(tmp_path):
    from amoeba_profile.core.workload import Workload

    with pytest.raises(UnsupportedShape, match="one request at a time"):
        StandIn().crosscheck_tool(ARCH, Workload(4, 64, 9), tmp_path, 5)
