"""TensorRT-LLM through its LLM API (the PyTorch backend, TensorRT-LLM 1.x's default ``LLM``),
timed by the library's own per-request metrics.

Artifact. A shape's artifact is a Hugging Face-style model folder without weights:
``config.json`` from ``amoeba_profile.core.export`` (plain LLaMA when every layer has one shape and its
head count divides ``hidden_size``; otherwise DeciLM / Nemotron-NAS ``block_configs``, which
TensorRT-LLM serves with ``_torch/models/modeling_nemotron_nas.py``), for the DeciLM form also the
config class transformers imports for ``model_type: nemotron-nas`` (``configuration_decilm.py``,
this package's copy), and ``engine.json`` (the spec, the form, every FFN width the DeciLM form
rounded up, and the ``LLM()`` arguments). The DeciLM form keeps one query-head count per model and
rounds each FFN up to a multiple of 256 (``export.ffn_mult``): a per-layer shape is timed at the
widths TensorRT-LLM would deploy for it, and ``engine.json`` lists each rounded layer. Shapes whose
layers differ in query heads are ``unsupported`` (kv heads follow query heads here: whole GQA
groups are pruned, so per-layer kv heads never arise alone).

Loading. The PyTorch backend keeps no engine on disk: ``LLM(load_format="dummy")`` builds the model
on the GPU with random weights (``initialize_dummy_weights`` in ``_torch/pyexecutor/model_loader.py``),
warms up and captures CUDA graphs in the process. So ``load`` does that work and reports its
seconds as ``Engine.compile_s``. Nothing is downloaded and no tokenizer is read
(``skip_tokenizer_init=True``): prompts are token-id lists, and ``SamplingParams.end_id`` is set
because the LLM API otherwise takes it from the tokenizer and refuses when there is none
(``BaseLLM._prepare_sampling_params``). One engine is kept alive after ``close`` and reused when
the next load asks for the same spec; a load of another spec shuts it down first, since every
``LLM`` holds its own executor, KV cache and CUDA graphs on the one GPU.

Serving loop and clock. Every sample is one ``LLM.generate`` call over ``batch`` prompts of random
token ids, one request each: greedy (no temperature, top-k or top-p, which the LLM API reads as greedy), ``ignore_eos`` (the executor then passes ``end_id=-1``, so the output
length is fixed), no detokenizing, and KV-cache block reuse off (it is on by default, and a repeated
prompt would then hit the prefix cache, so a ttft would time a cache lookup). The times are the
library's: with ``return_perf_metrics`` every request carries ``RequestPerfMetrics`` whose
``timing_metrics`` are steady-clock timestamps (``arrival_time``, stamped by
``LLM.generate_async`` when the LLM was created with ``return_perf_metrics``; ``first_token_time``;
``last_token_time``).

A batch is one prefill. ``generate`` hands its requests to the executor one at a time, and an idle
executor starts on the first one it fetches (``executor_request_queue.py``
``get_from_request_queue``), so without help the batch's requests would be prefilled over several
iterations and ``ttft_ms`` would time scheduling, not one batched prefill. An engine for a batch
above 1 therefore gets ``batch_wait_timeout_ms`` (``TorchLlmArgs``): the request queue waits up to
that long for ``max_batch_size`` (= the spec's batch) requests before the iteration starts, and
returns as soon as they are all in. Every sample then checks, from each request's
``RequestPerfMetrics.first_iter`` (the iteration that scheduled it; chunked prefill is off, so its
prefill), that the whole batch was prefilled in one iteration, and refuses the row otherwise: a
batch whose requests started in different iterations also decodes part of its window at a smaller
batch. (``batch_wait_timeout_iters`` and ``batch_wait_max_tokens_ratio`` do not help here: the
scheduler applies them only while generation requests are in flight, ``py_executor.py``
``_waiting_requests``, and each sample starts on an idle engine.) The price: the queue waits the
same way on every iteration that fetches fewer than ``max_batch_size`` new requests, decode
iterations included, so at batch > 1 a decode step whose GPU work is shorter than the wait (the
overlap scheduler hides the wait behind the previous step's GPU work) is timed with it; keep the
wait short (default 5 ms) and raise it only when rows are refused for a split prefill.

- ``ttft_ms`` = a request for 1 token: the latest ``first_token_time`` minus the earliest
  ``arrival_time`` of the batch (scheduling, the prefill, the first token's sampling and the loop's
  hand-offs between processes).
- ``tpot_ms`` at context c with n steps = a request for 1 + n tokens over a prompt of
  ``c - n // 2 + 1`` tokens (``workload.tpot_prompt_tokens``): (latest ``last_token_time`` minus latest
  ``first_token_time``) / n. These are the n decode steps at KV lengths ``c - n // 2 + 1`` onwards,
  the window of the other flows, and the quantity (e2e(1 + n) - e2e(1)) / n measured inside one
  request instead of as the difference of two; it is the library's own TPOT
  (``executor/result.py`` ``_process_req_perf_metrics``). A request that returns another number of
  tokens is an error, not a row.

Engines are sized by the spec: ``max_batch_size``, ``max_input_len``, ``max_seq_len``,
``max_num_tokens = max_batch x max_input_len`` (so a whole batch's prefill is one iteration;
chunked prefill off), a KV cache of ``max_batch x max_seq_len`` tokens (at most
``kv_cache_free_gpu_memory_fraction`` of free memory), decode CUDA graphs captured for exactly the
batch the table measures (``cuda_graph_config.batch_sizes = [max_batch]``, no padding; recorded in
``engine.json`` and the table's environment), and the overlap scheduler on (the library default,
passed explicitly so a changed default cannot change the flow silently). The batch size is passed
explicitly because TensorRT-LLM's own list, made from ``max_batch_size`` alone
(``CudaGraphConfig._generate_cuda_graph_batch_sizes``: 1-31, 32, 64, 128, powers of two up to
``max_batch_size``, and ``max_batch_size``), leaves a decode batch above 31 that is not in it without
a graph: a table at such a batch would time eager decode steps while one at batch 8 times graphed
ones.

The ``trtllm-bench`` route is not offered: it reads a prepared dataset file, builds its own LLM in a
new process per run and reports statistics over a run rather than per-request samples.

Sources read (NVIDIA/TensorRT-LLM; the stored versions differ per file): ``llmapi/llm.py``
@4c05a748 (``LLM`` is ``_TorchLLM``; ``generate``; ``_prepare_sampling_params``;
``_check_arguments``), ``llmapi/llm_args.py`` (``TorchLlmArgs``: ``load_format`` "dummy" parsed by
``convert_load_format``, ``cuda_graph_config``, ``disable_overlap_scheduler``; ``BaseLlmArgs``:
``max_batch_size``, ``max_input_len``, ``max_seq_len``, ``max_num_tokens``, ``return_perf_metrics``;
``KvCacheConfig.enable_block_reuse`` default True) @00043967 and the 1.0-era version,
``llmapi/__init__.py`` @5ca85aff, ``sampling_params.py`` @a98a9061, ``executor/result.py`` @a678b91a
(``CompletionOutput.request_perf_metrics``, ``_process_req_perf_metrics``), ``executor/base_worker.py``
(``end_id=-1 if ignore_eos``), ``serve/openai_server.py`` (``get_perf_metrics``: the JSON form of
``RequestPerfMetrics`` parsed here), ``_torch/pyexecutor/model_loader.py`` @b51992a3,
``_torch/pyexecutor/config_utils.py`` @00679c66, ``_torch/models/modeling_nemotron_nas.py``
@0193dbd4; ``tests/unittest/llmapi/test_llm.py`` ``test_llm_perf_metrics`` for the timestamp order.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from amoeba_profile.backends.base import (
    Availability,
    Backend,
    Capabilities,
    Engine,
    EngineSpec,
    ToolResult,
    read_engine_record,
    save_raw,
)
from amoeba_profile.backends.common.tokenizer import hf_tokenizer_files

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.dtypes import canonical_dtype
from amoeba_profile.core.errors import AmoebaError, UnsupportedShape, UsageError
from amoeba_profile.core.export import (
    DECI_CONFIG_MODULE,
    EOS_TOKEN_ID,
    deci_config,
    deci_config_module,
    llama_config,
    loads_as_llama,
)
from amoeba_profile.core.inputs import positive_float
from amoeba_profile.core.subnet import LayerShape, Subnet
from amoeba_profile.core.workload import Workload, tpot_prompt_tokens

DTYPES = ("float16", "bfloat16")
INSTALL_HINT = (
    "pip install tensorrt-llm (Linux, NVIDIA GPU; it pins its own torch and transformers, so use a "
    "fresh environment or NVIDIA's TensorRT-LLM container and install amoeba-profile into it)"
)
REMOTE_CONFIG = DECI_CONFIG_MODULE  # the module export.deci_config's auto_map names
# Markers of a failed device allocation in torch's, the CUDA runtime's and TensorRT-LLM's messages.
_OOM_MARKERS = ("out of memory", "cudaerrormemoryallocation", "cuda_error_out_of_memory", "failed to allocate")
_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class TensorRtLlmConfig:
    """Stored in the table's sidecar; ``TensorRtLlmBackend(**config)`` rebuilds the same backend.

    ``cuda_graphs``: capture decode CUDA graphs (the library default) for the table's batch;
    ``kv_cache_free_gpu_memory_fraction``: the most of the free GPU memory the KV cache may take (the
    library default, 0.9); it is also capped at ``max_batch x max_seq_len`` tokens per engine;
    ``batch_wait_timeout_ms``: how long the request queue of an engine for a batch above 1 waits to
    gather the whole batch before an iteration (see the module docstring; batch-1 engines wait not
    at all)."""

    device: str = "cuda"
    dtype: str = "float16"
    cuda_graphs: bool = True
    kv_cache_free_gpu_memory_fraction: float = 0.9
    batch_wait_timeout_ms: float = 5.0


@dataclass(frozen=True)
class ModelFolder:
    """The files of one shape's model folder: ``form`` is ``llama`` or ``nemotron-nas``;
    ``adjustments`` name every layer whose FFN the DeciLM form rounded up."""

    form: str
    config: dict[str, Any]
    adjustments: tuple[str, ...]

    def files(self) -> dict[str, str]:
        files = {"config.json": json.dumps(self.config, indent=2) + "\n"}
        if self.form != "llama":
            files[REMOTE_CONFIG] = deci_config_module()
        return files


def model_folder(spec: EngineSpec, dtype: str) -> ModelFolder:
    """The model folder for ``spec`` through ``export``'s config writers; UnsupportedShape (with the
    reason) for a shape neither form holds."""
    if not spec.layers:
        raise UnsupportedShape(
            "a model without decoder layers is not a checkpoint TensorRT-LLM serves; the difference "
            "fit takes the base from the layered models"
        )
    # Layer indices do not change latency (EngineSpec leaves them out): number the layers 0..n-1.
    subnet = Subnet(spec.arch, tuple(LayerShape(i, *layer) for i, layer in enumerate(spec.layers)))
    try:
        if loads_as_llama(subnet):
            return ModelFolder("llama", llama_config(subnet, dtype), ())
        config, adjustments = deci_config(subnet, dtype)
    except UnsupportedShape as exc:  # export names the first layer whose query heads differ
        raise UnsupportedShape(f"TensorRT-LLM loads LLaMA or DeciLM/Nemotron-NAS configs: {exc}") from None
    return ModelFolder("nemotron-nas", config, tuple(adjustments))


def llm_kwargs(spec: EngineSpec, config: TensorRtLlmConfig, form: str) -> dict[str, Any]:
    """The keyword arguments of ``LLM(model=<artifact>, ...)`` for an engine of ``spec``, as plain
    values (``kv_cache_config`` and ``cuda_graph_config`` become the library's config objects at load;
    ``cuda_graph_config=None`` is how the LLM API turns CUDA graphs off). ``batch_wait_timeout_ms``
    is passed only to an engine for a batch above 1: one sequence needs no gathering."""
    graphs = {"batch_sizes": [spec.max_batch], "max_batch_size": spec.max_batch, "enable_padding": False}
    gather = {"batch_wait_timeout_ms": config.batch_wait_timeout_ms} if spec.max_batch > 1 else {}
    return {
        "skip_tokenizer_init": True,
        "trust_remote_code": form != "llama",  # the DeciLM config class is remote code in the folder
        "dtype": config.dtype,
        "load_format": "dummy",
        "max_batch_size": spec.max_batch,
        "max_input_len": spec.max_input_len,
        "max_seq_len": spec.max_seq_len,
        "max_num_tokens": spec.max_batch * spec.max_input_len,
        "enable_chunked_prefill": False,
        "kv_cache_config": {
            "enable_block_reuse": False,
            "max_tokens": spec.max_batch * spec.max_seq_len,
            "free_gpu_memory_fraction": config.kv_cache_free_gpu_memory_fraction,
        },
        "cuda_graph_config": graphs if config.cuda_graphs else None,
        "disable_overlap_scheduler": False,
        "return_perf_metrics": True,
        **gather,
    }


def sampling_kwargs(new_tokens: int) -> dict[str, Any]:
    """``SamplingParams`` of one timed request: greedy, exactly ``new_tokens`` tokens, timed by the library."""
    return {
        "max_tokens": new_tokens,
        "end_id": EOS_TOKEN_ID,
        "ignore_eos": True,
        "detokenize": False,
        "return_perf_metrics": True,
    }


def perf_metrics_json(metrics: Any) -> dict[str, Any]:
    """A ``RequestPerfMetrics`` binding as the JSON that ``trtllm-serve``'s ``/perf_metrics`` writes
    (``serve/openai_server.py`` ``get_perf_metrics``): timestamps are ``datetime.timedelta`` since
    the steady clock's epoch, written as seconds."""
    if metrics is None:
        raise AmoebaError("TensorRT-LLM returned a request without perf metrics (return_perf_metrics was not honoured)")
    timing, kv = metrics.timing_metrics, metrics.kv_cache_metrics
    return {
        "first_iter": metrics.first_iter,
        "last_iter": metrics.last_iter,
        "timing_metrics": {
            name: getattr(timing, name).total_seconds()
            for name in ("arrival_time", "first_scheduled_time", "first_token_time", "last_token_time")
        },
        "kv_cache_metrics": {
            name: getattr(kv, name)
            for name in (
                "num_total_allocated_blocks",
                "num_new_allocated_blocks",
                "num_reused_blocks",
                "num_missed_blocks",
            )
        },
    }


@dataclass(frozen=True)
class RequestTiming:
    """One request's timestamps, in seconds on the executor's steady clock, its number of output
    tokens and ``first_iter``, the executor iteration that first scheduled it (its prefill)."""

    arrival_s: float
    first_scheduled_s: float
    first_token_s: float
    last_token_s: float
    output_tokens: int
    first_iter: int


def request_timing(perf_metrics: dict[str, Any], output_tokens: int) -> RequestTiming:
    """A request's timing from its ``/perf_metrics`` JSON; AmoebaError when a field is missing or the
    timestamps are out of order (a request that never finished has ``last_token_time`` 0)."""
    try:
        stamps = perf_metrics["timing_metrics"]
        first_iter = perf_metrics["first_iter"]
        if isinstance(first_iter, bool) or not isinstance(first_iter, int) or first_iter < 0:
            raise ValueError("'first_iter'")
        timing = RequestTiming(
            float(stamps["arrival_time"]),
            float(stamps["first_scheduled_time"]),
            float(stamps["first_token_time"]),
            float(stamps["last_token_time"]),
            int(output_tokens),
            first_iter,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AmoebaError(f"TensorRT-LLM perf metrics lack or mangle field {exc}") from None
    order = (timing.arrival_s, timing.first_scheduled_s, timing.first_token_s, timing.last_token_s)
    if not all(math.isfinite(t) for t in order) or list(order) != sorted(order) or timing.arrival_s <= 0:
        raise AmoebaError(
            f"TensorRT-LLM perf metrics out of order (arrival, scheduled, first token, last token): {order}"
        )
    return timing


def _check_lengths(timings: list[RequestTiming], new_tokens: int) -> None:
    wrong = sorted({t.output_tokens for t in timings} - {new_tokens})
    if not timings or wrong:
        raise AmoebaError(
            f"TensorRT-LLM returned {wrong or 'no'} output tokens where {new_tokens} were asked for "
            "(ignore_eos and max_tokens should fix the length)"
        )


def check_one_prefill(timings: list[RequestTiming]) -> None:
    """Refuse a batch whose requests were first scheduled in different executor iterations: its ttft
    would time scheduling rather than one batched prefill, and its decode window would run part of
    its steps at a smaller batch."""
    iterations = sorted({t.first_iter for t in timings})
    if len(iterations) > 1:
        raise AmoebaError(
            f"TensorRT-LLM prefilled the batch of {len(timings)} over iterations {iterations}, not in one: "
            "the executor fetched its requests apart; raise --backend-option batch_wait_timeout_ms "
            "so the request queue gathers the whole batch"
        )


def batch_ttft_ms(timings: list[RequestTiming]) -> float:
    """ttft of a batch of 1-token requests prefilled in one iteration: the first arrival to the last first token."""
    _check_lengths(timings, 1)
    check_one_prefill(timings)
    return (max(t.first_token_s for t in timings) - min(t.arrival_s for t in timings)) * 1e3


def batch_tpot_ms(timings: list[RequestTiming], steps: int) -> float:
    """tpot of a batch of (1 + steps)-token requests prefilled in one iteration: the batch's last first
    token to its last token, per step."""
    _check_lengths(timings, 1 + steps)
    check_one_prefill(timings)
    return (max(t.last_token_s for t in timings) - max(t.first_token_s for t in timings)) * 1e3 / steps


TRTLLM_BENCH_DEFINITIONS = (
    "trtllm-bench latency on the full model (its own LLM, max_batch_size 1, one request at a time, streaming), "
    "the same model folder and LLM options as the table's engines plus a synthetic tokenizer; requests of P "
    "token ids and N output tokens (ignore_eos); ttft_ms and tpot_ms = the p50 of its per-request TTFT and TPOT "
    "((e2e - ttft) / (N - 1)), which include its async client's handling that RequestPerfMetrics leaves out"
)
# What trtllm-bench does not set itself and the table's engines were built with (llm_kwargs).
_BENCH_OPTIONS = (
    "trust_remote_code",
    "dtype",
    "load_format",
    "enable_chunked_prefill",
    "kv_cache_config",
    "cuda_graph_config",
    "disable_overlap_scheduler",
)


def bench_llm_options(spec: EngineSpec, config: TensorRtLlmConfig, form: str) -> dict[str, Any]:
    """The ``--extra_llm_api_options`` of the cross-check: the engine's own LLM arguments that
    trtllm-bench does not set itself (it sizes batch, tokens and sequence length on its own)."""
    kwargs = llm_kwargs(spec, config, form)
    return {name: kwargs[name] for name in _BENCH_OPTIONS}


def trtllm_bench_command(
    executable: str,
    model_name: str,
    folder: Path,
    dataset: Path,
    options: Path,
    report: Path,
    workload: Workload,
    requests: int,
    kv_fraction: float,
) -> list[str]:
    """``trtllm-bench latency`` on a local model folder (``bench/benchmark/low_latency.py`` options)."""
    return [
        executable,
        "--model",
        model_name,
        "--model_path",
        str(folder),
        "latency",
        "--backend",
        "pytorch",
        "--dataset",
        str(dataset),
        "--num_requests",
        str(requests),
        "--warmup",
        "2",
        "--max_seq_len",
        str(workload.prompt_len + workload.gen_len),
        "--kv_cache_free_gpu_mem_fraction",
        str(kv_fraction),
        "--extra_llm_api_options",
        str(options),
        "--report_json",
        str(report),
    ]


def bench_dataset(workload: Workload, requests: int, vocab_size: int) -> str:
    """trtllm-bench's dataset: one JSON line per request with its token ids and output length
    (``bench/utils/data.py`` ``create_dataset_from_stream`` reads ``input_ids`` and ``output_tokens``)."""
    rng = np.random.default_rng(0)
    return "".join(
        json.dumps(
            {
                "task_id": i,
                "input_ids": rng.integers(3, vocab_size, workload.prompt_len).tolist(),
                "output_tokens": workload.gen_len,
            }
        )
        + "\n"
        for i in range(requests)
    )


def parse_trtllm_bench_report(text: str, workload: Workload) -> tuple[float, float]:
    """(ttft_ms, tpot_ms) from ``--report_json`` (``ReportUtility.get_statistics_dict``: latency runs
    stream, so ``streaming_metrics`` holds per-request TTFT and TPOT percentiles in ms)."""
    try:
        report = json.loads(text)
        streaming, requests = report["streaming_metrics"], report["request_info"]
        ttft_ms, tpot_ms = float(streaming["ttft_percentiles"]["p50"]), float(streaming["tpot_percentiles"]["p50"])
        lengths = (float(requests["avg_input_length"]), float(requests["avg_output_length"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise AmoebaError(f"trtllm-bench report lacks or mangles field {exc}") from None
    if lengths != (workload.prompt_len, workload.gen_len):
        raise AmoebaError(
            f"trtllm-bench ran requests of {lengths[0]:g} input and {lengths[1]:g} output tokens on "
            f"average, not {workload.prompt_len} and {workload.gen_len}"
        )
    return ttft_ms, tpot_ms


class _RequestPiece:
    """One ``LLM.generate`` call of ``batch`` random prompts as a workpiece: each sample is one call,
    timed by the library's per-request timestamps (``max_steps = 1``: a request is the unit)."""

    max_steps = 1

    def __init__(
        self,
        engine: "TensorRtLlmEngine",
        batch: int,
        prompt_len: int,
        new_tokens: int,
        metric: Callable[[list[RequestTiming]], float],
    ):
        from tensorrt_llm import SamplingParams

        rng = np.random.default_rng(0)  # token values do not change latency
        self.engine, self.metric = engine, metric
        self.prompts = [rng.integers(0, engine.spec.arch.vocab_size, prompt_len).tolist() for _ in range(batch)]
        self.params = SamplingParams(**sampling_kwargs(new_tokens))

    def sample_ms(self, steps: int) -> float:
        del steps  # always 1 (max_steps)
        outputs = self.engine.llm.generate(self.prompts, self.params, use_tqdm=False)
        served = [
            (perf_metrics_json(out.outputs[0].request_perf_metrics), len(out.outputs[0].token_ids)) for out in outputs
        ]
        save_raw("tensorrt-llm", "perf-metrics", [{"perf_metrics": m, "output_tokens": n} for m, n in served])
        return self.metric([request_timing(metrics, tokens) for metrics, tokens in served])


def _library_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    from tensorrt_llm.llmapi import CudaGraphConfig, KvCacheConfig

    graphs = kwargs["cuda_graph_config"]
    return {
        **kwargs,
        "kv_cache_config": KvCacheConfig(**kwargs["kv_cache_config"]),
        "cuda_graph_config": CudaGraphConfig(**graphs) if graphs is not None else None,
    }


class TensorRtLlmEngine(Engine):
    """An ``LLM`` serving one shape. Creating it builds, warms up and graph-captures the model:
    those seconds are ``compile_s``."""

    def __init__(self, spec: EngineSpec, artifact: Path, kwargs: dict[str, Any]):
        from tensorrt_llm import LLM

        self.spec = spec
        t0 = time.perf_counter()
        self.llm = LLM(model=str(artifact), **_library_kwargs(kwargs))
        self.compile_s = time.perf_counter() - t0

    def ttft(self, batch: int, prompt_len: int) -> _RequestPiece:
        return _RequestPiece(self, batch, prompt_len, 1, batch_ttft_ms)

    def tpot(self, batch: int, context: int, steps: int) -> _RequestPiece:
        return _RequestPiece(
            self, batch, tpot_prompt_tokens(context, steps), 1 + steps, lambda timings: batch_tpot_ms(timings, steps)
        )

    def close(self) -> None:
        """Kept alive for the next load of the same spec; the backend's ``release`` shuts it down."""

    def release(self) -> None:
        self.llm.shutdown()


def _flag(value: Any, name: str) -> bool:
    """A boolean option given as a bool or as text (``--backend-option cuda_graphs=false``)."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() not in _FLAGS:
        raise UsageError(f"tensorrt-llm option {name} takes true or false, got {value!r}")
    return _FLAGS[str(value).strip().lower()]


def _wait_ms(value: Any) -> float:
    """A non-negative wait in ms given as a number or as text (``--backend-option``)."""
    try:
        wait = float(value)
    except (TypeError, ValueError):
        wait = math.nan
    if not math.isfinite(wait) or wait < 0 or isinstance(value, bool):
        raise UsageError(f"tensorrt-llm option batch_wait_timeout_ms takes a number of ms >= 0, got {value!r}")
    return wait


def _fraction(value: Any, name: str) -> float:
    """A fraction in (0, 1] given as a number or as text (``--backend-option``)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"tensorrt-llm option {name} takes a number in (0, 1], got {value!r}") from None
    return positive_float(value, f"tensorrt-llm option {name}", maximum=1.0)


def _torch():
    import torch

    return torch


class TensorRtLlmBackend(Backend):
    name = "tensorrt-llm"
    experimental_reason = (
        "written against TensorRT-LLM's source; its parsing tests use samples constructed from that "
        "source, and scripts/a5000.sh and jetson-orin-nx.sh save the raw outputs of its first run "
        "to replace them"
    )

    def __init__(
        self,
        device: str = "cuda",
        dtype: str | None = None,
        threads: int | None = None,
        cuda_graphs: bool | str = True,
        kv_cache_free_gpu_memory_fraction: float | str = 0.9,
        batch_wait_timeout_ms: float | str = 5.0,
    ):
        if device not in ("cuda", "cuda:0"):
            raise UsageError(
                f"the tensorrt-llm backend runs on the first visible GPU ('cuda'), not {device!r}; choose "
                "the GPU with CUDA_VISIBLE_DEVICES"
            )
        if threads is not None:
            raise UsageError(
                "the tensorrt-llm backend has no thread count to set (the GPU computes; --threads is for CPU flows)"
            )
        name = canonical_dtype(dtype or "float16")
        if name not in DTYPES:
            raise UsageError(f"tensorrt-llm runs {list(DTYPES)} weights here, not {dtype!r}")
        self.config = TensorRtLlmConfig(
            device,
            name,
            _flag(cuda_graphs, "cuda_graphs"),
            _fraction(kv_cache_free_gpu_memory_fraction, "kv_cache_free_gpu_memory_fraction"),
            _wait_ms(batch_wait_timeout_ms),
        )
        self.device, self.dtype = device, name
        self._held: TensorRtLlmEngine | None = None

    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("tensorrt_llm") is None:
            return Availability(False, "tensorrt_llm is not installed", INSTALL_HINT)
        if not _torch().cuda.is_available():
            return Availability(False, "torch sees no CUDA device; TensorRT-LLM runs on NVIDIA GPUs only", INSTALL_HINT)
        try:
            import tensorrt_llm
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised, while listing flows
            return Availability(False, f"tensorrt_llm is installed but does not import: {exc}", INSTALL_HINT)
        return Availability(
            True,
            f"tensorrt_llm {tensorrt_llm.__version__}, LLM API (PyTorch backend) on CUDA; one "
            "head count per model, FFN per layer (DeciLM block_configs)",
        )

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            per_layer_heads=False, per_layer_ffn=True, methods=("difference",), dtypes=DTYPES, devices=("cuda",)
        )

    @property
    def clock_name(self) -> str:
        return "TensorRT-LLM RequestPerfMetrics (steady-clock arrival, first-token and last-token times per request)"

    def versions(self) -> dict[str, str]:
        import tensorrt_llm

        return {
            "tensorrt_llm": tensorrt_llm.__version__,
            "torch": _torch().__version__,
            "transformers": importlib.metadata.version("transformers"),
        }

    def device_arch(self) -> str:
        major, minor = _torch().cuda.get_device_capability(self.device)
        return f"sm_{major}{minor}"

    def environment(self) -> dict[str, Any]:
        torch, cfg = _torch(), self.config
        return {
            **self.versions(),
            "device": self.device,
            "dtype": cfg.dtype,
            "device_arch": self.device_arch(),
            "gpu": torch.cuda.get_device_name(self.device),
            "cuda": torch.version.cuda,
            "llm_api": "tensorrt_llm.LLM (PyTorch backend), load_format=dummy, skip_tokenizer_init",
            "max_batch_size": "per engine: the spec's max_batch",
            "max_seq_len": "per engine: the spec's max_seq_len",
            "max_num_tokens": "per engine: max_batch x max_input_len",
            "chunked_prefill": False,
            "kv_cache": {
                "enable_block_reuse": False,
                "max_tokens": "per engine: max_batch x max_seq_len",
                "free_gpu_memory_fraction": cfg.kv_cache_free_gpu_memory_fraction,
            },
            "cuda_graphs": (
                {"batch_sizes": "per engine: [max_batch] (the table's batch)", "enable_padding": False}
                if cfg.cuda_graphs
                else False
            ),
            "batch_wait_timeout_ms": {
                "value": cfg.batch_wait_timeout_ms,
                "applies": "engines for a batch above 1",
                "check": "every request of a sample first scheduled in one iteration",
            },
            "overlap_scheduler": True,
            "serving_loop": "LLM.generate over batch token-id prompts, greedy, ignore_eos, fixed output length; times "
            "from RequestPerfMetrics (ttft: arrival to first token; tpot: first to last token / steps)",
        }

    def check_spec(self, spec: EngineSpec) -> None:
        model_folder(spec, self.dtype)

    def compile(self, spec: EngineSpec, dest: Path) -> None:
        folder = model_folder(spec, self.dtype)
        for name, text in folder.files().items():
            (dest / name).write_text(text)
        record = {
            "flow": self.name,
            "spec": spec.to_dict(),
            "form": folder.form,
            "adjustments": list(folder.adjustments),
            "llm_kwargs": llm_kwargs(spec, self.config, folder.form),
        }
        (dest / "engine.json").write_text(json.dumps(record, indent=2, sort_keys=True))

    def load(self, spec: EngineSpec, artifact: Path) -> TensorRtLlmEngine:
        stored = read_engine_record(artifact)
        if stored.get("flow") != self.name or stored["spec"] != spec.to_dict():
            raise UsageError(f"{artifact}: artifact holds another engine than requested; delete it to recompile")
        if self._held is not None and self._held.spec == spec:
            self._held.compile_s = 0.0
            return self._held
        self.release_engine()
        self._held = TensorRtLlmEngine(spec, artifact, stored["llm_kwargs"])
        return self._held

    def crosscheck_tool(self, arch: ModelArch, workload: Workload, work_dir: Path, repetitions: int) -> ToolResult:
        """The full model's folder, as a build writes it, benchmarked by ``trtllm-bench latency``."""
        if workload.batch != 1:
            raise UnsupportedShape(
                "trtllm-bench latency runs one request at a time (max_batch_size 1); cross-check a batch-1 table"
            )
        layers = ((arch.num_heads, arch.num_kv_heads, arch.ffn_size),) * arch.num_layers
        spec = EngineSpec(arch, layers, 1, workload.prompt_len, workload.prompt_len + workload.gen_len)
        folder = model_folder(spec, self.dtype)
        model_dir = work_dir / "model"
        model_dir.mkdir()
        for name, text in {**folder.files(), **hf_tokenizer_files(arch.vocab_size, arch.max_position)}.items():
            (model_dir / name).write_text(text)
        dataset, options, report = work_dir / "dataset.jsonl", work_dir / "llm-options.yaml", work_dir / "report.json"
        dataset.write_text(bench_dataset(workload, repetitions, arch.vocab_size))
        # JSON is YAML: trtllm-bench reads the file with yaml.safe_load.
        options.write_text(json.dumps(bench_llm_options(spec, self.config, folder.form), indent=2))
        executable = shutil.which("trtllm-bench", path=str(Path(sys.executable).parent)) or "trtllm-bench"
        command = trtllm_bench_command(
            executable,
            f"amoeba-{arch.name}",
            model_dir,
            dataset,
            options,
            report,
            workload,
            repetitions,
            self.config.kv_cache_free_gpu_memory_fraction,
        )
        self.release_engine()  # one GPU: no engine of ours beside the tool's
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not report.is_file():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise AmoebaError(f"trtllm-bench latency exited {done.returncode}: {tail}")
        text = report.read_text()
        ttft_ms, tpot_ms = parse_trtllm_bench_report(text, workload)
        return ToolResult("trtllm-bench latency", tuple(command), ttft_ms, tpot_ms, TRTLLM_BENCH_DEFINITIONS, text)

    def release_engine(self) -> None:
        """Shut the kept engine down (its executor, KV cache and CUDA graphs)."""
        if self._held is not None:
            held, self._held = self._held, None
            held.release()

    def is_out_of_memory(self, exc: BaseException) -> bool:
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:  # the executor re-raises worker errors as causes
            seen.add(id(current))
            if isinstance(current, (MemoryError, _torch().OutOfMemoryError)):
                return True
            if any(marker in str(current).lower() for marker in _OOM_MARKERS):
                return True
            current = current.__cause__ or current.__context__
        return False
