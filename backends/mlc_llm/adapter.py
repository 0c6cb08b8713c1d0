"""MLC-LLM on CUDA, timed by its own serving engine's per-request metrics.

MLC-LLM compiles a model ahead of time with TVM (``mlc_llm compile``: one library per shape and GPU
architecture) and serves it with ``MLCEngine``, a C++ engine loop on its own thread behind an
OpenAI-style API. The artifact of a shape is an MLC model folder: ``mlc-chat-config.json``
(``export.mlc_chat_config``, the file ``mlc_llm gen_config`` writes; ``mlc_llm compile`` reads its
``model_config``), random weights as a tensor cache (``mlc_llm_weights``), a synthetic
``tokenizer.json`` (the engine refuses a folder without a tokenizer) and the compiled ``lib.so``.

Shapes. MLC-LLM's ``LlamaConfig`` has one ``num_attention_heads``, ``num_key_value_heads`` and
``intermediate_size`` for every layer, and its paged KV cache one head count, so only uniform
subnets run; ``LlamaModel`` asserts ``hidden_size % num_attention_heads == 0``; ``LlamaConfig``
refuses ``num_hidden_layers`` below ``pipeline_parallel_stages`` (1), so there is no 0-layer model
and the difference fit takes the base from the layered models. Sources: MLC-LLM
``python/mlc_llm/model/llama/llama_model.py`` @79d603f0.

Serving loop and clock. Each sample is read from MLC's own metrics of a finished request
(``usage.extra``, ``cpp/serve/metrics.cc`` ``RequestMetrics::AsJSON`` @79d603f0):
``end_to_end_latency_s`` runs from the engine thread's ``AddRequest`` to the request's finish
(``std::chrono::high_resolution_clock``; the finish is taken after the last sampled token reached
the host), so Python's queueing, tokenization and detokenization are outside it. Requests are completions of
random token ids (no tokenizer work), greedy (``temperature=0``) and of fixed length
(``debug_config.ignore_eos``), one sequence at a time:
- ``ttft_ms`` = the end-to-end time of a request for 1 token over a fresh random prompt: the
  engine's scheduling, the prefill, the first token's sampling and the request's finish (MLC's own
  ``ttft_s`` stops at the sampled token; the difference is the finishing bookkeeping). The engine
  must report the whole prompt as prefilled; a prompt whose first tokens happened to match a cached
  sequence is drawn again.
- ``tpot_ms`` at context c with n steps = (e2e(1 + n) - e2e(1)) / n over one prompt of
  c - n // 2 + 1 random tokens whose KV is already cached: MLC's radix prefix cache (its default,
  ``prefix_cache_mode="radix"``) keeps a finished request's sequence, and an identical prompt reuses
  all of it but the last token (``cpp/serve/prefix_cache.cc`` ``InsertSequence`` pops it so the
  logits are computed). The prompt is sent once untimed first, and each timed request must report 1
  prefilled token; the n timed decode steps then run at the positions of the contract's window.

The engine is configured as a user's local deployment (``mode="local"``) sized to the spec: one
sequence, ``max_single_sequence_length = max_seq_len`` and a KV capacity of two such sequences (the
cached prefix beside a new request). Batches above 1 are unsupported: MLC batches concurrent
requests of separate sequences, which this adapter does not issue.
"""

from __future__ import annotations

import gc
import importlib.util
import io
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from amoeba_profile.backends.common.tokenizer import TOKENIZER, hf_tokenizer_files, tokenizer_json
from amoeba_profile.backends.mlc_llm.weights import (
    DTYPES,
    NDARRAY_CACHE_INDEX,
    TENSOR_CACHE_INDEX,
    llama_params,
    write_tensor_cache,
)

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.dtypes import canonical_dtype
from amoeba_profile.core.errors import AmoebaError, BackendUnavailable, UnsupportedShape, UsageError
from amoeba_profile.core.export import MLC_QUANTIZATION, loads_as_llama, mlc_chat_config
from amoeba_profile.core.subnet import LayerShape, Subnet
from amoeba_profile.core.workload import Workload, tpot_prompt_tokens

INSTALL_HINT = (
    "pip install --pre -U -f https://mlc.ai/wheels mlc-llm-nightly-cu128 mlc-ai-nightly-cu128 (the "
    "wheels of your CUDA, per MLC-LLM's install page; on a Jetson run inside a dustynv/mlc image); "
    "mlc_llm compile also needs the CUDA toolkit's nvcc on PATH"
)
CHAT_CONFIG = "mlc-chat-config.json"
LIBRARY = "lib.so"
ENGINE_RECORD = "engine.json"
_PROMPT_DRAWS = 3  # fresh ttft prompts tried before a prefix-cache hit is an error
_OOM_MARKERS = ("out of memory", "Insufficient GPU memory", "CUDA_ERROR_OUT_OF_MEMORY")


@dataclass(frozen=True)
class MlcLlmConfig:
    """Stored in the table's sidecar; ``MlcLlmBackend(**config)`` rebuilds the same backend.

    ``dtype`` picks MLC's unquantized weight format (float16 -> q0f16, bfloat16 -> q0bf16, float32
    -> q0f32); ``opt`` is ``mlc_llm compile --opt`` (O2, MLC's default, turns on its CUDA graphs,
    cuBLAS GEMMs and FlashInfer attention where available)."""

    device: str = "cuda"
    dtype: str = "float16"
    opt: str = "O2"


@dataclass(frozen=True)
class RequestTiming:
    """One finished request as MLC-LLM's engine reports it in ``usage.extra``, times in ms.

    ``prefill_tokens`` is what the engine actually prefilled: the prompt less what its prefix cache
    supplied. ``ttft_ms`` runs from ``AddRequest`` to the first sampled token (MLC's ``ttft_s``, which
    is also its prefill time), ``e2e_ms`` to the request's finish (``end_to_end_latency_s``)."""

    prompt_tokens: int
    completion_tokens: int
    prefill_tokens: int
    decode_tokens: int
    ttft_ms: float
    e2e_ms: float

    @property
    def decode_ms(self) -> float:
        """The decode phase: first token sampled to finish."""
        return self.e2e_ms - self.ttft_ms

    def expect(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Raise unless the engine served exactly this request (a shorter output means it stopped
        early, e.g. at max_single_sequence_length, so the sample is not the requested quantity)."""
        if (self.prompt_tokens, self.completion_tokens) != (prompt_tokens, completion_tokens):
            raise AmoebaError(
                f"MLC-LLM served {self.prompt_tokens} prompt and {self.completion_tokens} output tokens; "
                f"the request asked for {prompt_tokens} and {completion_tokens}"
            )


def parse_usage(usage: Mapping[str, Any]) -> RequestTiming:
    """The metrics of one finished request from its OpenAI-style ``usage`` (``usage.extra`` holds
    MLC's ``RequestMetrics``; ``MLCEngine.completions.create`` returns it as ``response.usage``)."""
    extra = usage.get("extra") if isinstance(usage, Mapping) else None
    if not isinstance(extra, Mapping):
        raise AmoebaError(
            "MLC-LLM returned no usage.extra metrics for the request (an MLC-LLM older than its per-request metrics?)"
        )
    try:
        timing = RequestTiming(
            prompt_tokens=int(extra["prompt_tokens"]),
            completion_tokens=int(extra["completion_tokens"]),
            prefill_tokens=int(extra["prefill_tokens"]),
            decode_tokens=int(extra["decode_tokens"]),
            ttft_ms=float(extra["ttft_s"]) * 1e3,
            e2e_ms=float(extra["end_to_end_latency_s"]) * 1e3,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AmoebaError(f"MLC-LLM usage.extra lacks or mangles field {exc}") from None
    if not 0 <= timing.ttft_ms <= timing.e2e_ms:
        raise AmoebaError(
            f"MLC-LLM reported ttft {timing.ttft_ms:.3f} ms and end-to-end {timing.e2e_ms:.3f} ms for one request"
        )
    return timing


def tpot_sample_ms(long: RequestTiming, short: RequestTiming, steps: int) -> float:
    """(e2e(1 + steps) - e2e(1)) / steps: the mean decode step of the contract's window."""
    return (long.e2e_ms - short.e2e_ms) / steps


def tpot_prompt_len(context: int, steps: int) -> int:
    """Prompt tokens of a tpot request: c - n // 2 cached, plus the last one, which MLC always
    prefills; the n decode steps then run at the positions of the window centred on c."""
    return tpot_prompt_tokens(context, steps)


def check_mlc_shape(spec: EngineSpec) -> None:
    """Raise UnsupportedShape, with the reason, for a spec MLC-LLM's LLaMA model cannot express."""
    if spec.max_batch != 1:
        raise UnsupportedShape(
            f"a batch of {spec.max_batch}: this adapter times one request at a time (MLC batches "
            "concurrent requests of separate sequences)"
        )
    if not spec.layers:
        raise UnsupportedShape(
            "a model without decoder layers: MLC-LLM's LlamaConfig refuses num_hidden_layers below "
            "pipeline_parallel_stages (1); the difference fit takes the base from the layered models"
        )
    shapes = sorted(set(spec.layers))
    if len(shapes) > 1:
        raise UnsupportedShape(
            f"layers differ in shape ({len(shapes)} distinct (heads, kv_heads, ffn): "
            f"{', '.join(map(str, shapes[:3]))}): MLC-LLM's LlamaConfig has one num_attention_heads, "
            "num_key_value_heads and intermediate_size for every layer, and its paged KV cache one "
            "head count"
        )
    heads = shapes[0][0]
    if not loads_as_llama(_subnet(spec)):
        raise UnsupportedShape(
            f"{heads} query heads do not divide hidden_size {spec.arch.hidden_size}: MLC-LLM's "
            "LlamaModel asserts hidden_size % num_attention_heads == 0"
        )


def _subnet(spec: EngineSpec) -> Subnet:
    """The spec's layers as a subnet (indices 0..n-1: the index does not change latency)."""
    return Subnet(spec.arch, tuple(LayerShape(i, *shape) for i, shape in enumerate(spec.layers)))


def chat_config(spec: EngineSpec, dtype: str) -> dict[str, Any]:
    """``mlc-chat-config.json`` of the engine: the exported file for this shape, compiled for the
    spec's batch, with the synthetic tokenizer named as ``gen_config`` names the one it copies."""
    config = mlc_chat_config(_subnet(spec), dtype)
    config["model_config"]["max_batch_size"] = spec.max_batch
    config["tokenizer_files"] = [TOKENIZER]
    config["tokenizer_info"] = {
        "token_postproc_method": "byte_fallback",
        "prepend_space_in_encode": False,
        "strip_space_in_decode": False,
    }
    return config


def write_model_folder(folder: Path, spec: EngineSpec, dtype: str, index_name: str) -> None:
    """Everything MLC's compile and engine read except the library: config, weights, tokenizer."""
    (folder / CHAT_CONFIG).write_text(json.dumps(chat_config(spec, dtype), indent=2) + "\n")
    write_tensor_cache(folder, llama_params(spec.arch, spec.layers), dtype, index_name)
    (folder / TOKENIZER).write_text(json.dumps(tokenizer_json(spec.arch.vocab_size)))


def compile_command(python: str, config: Path, device: str, quantization: str, opt: str, output: Path) -> list[str]:
    """``mlc_llm compile`` of one engine. ``--device cuda:N`` names a device, so MLC builds the target
    with TVM's ``Target.from_device``, which reads that GPU's compute capability (sm_86 on an RTX
    A5000, sm_87 on an Orin) and nvcc compiles for it (``support/auto_target.py``)."""
    return [
        python,
        "-m",
        "mlc_llm",
        "compile",
        str(config),
        "--model-type",
        "llama",
        "--quantization",
        quantization,
        "--device",
        device,
        "--opt",
        opt,
        "--output",
        str(output),
    ]


def compile_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The compile's environment: without ``MLC_MULTI_ARCH``, which would make nvcc build a fat
    binary for other architectures than this device's (the artifact is keyed by this one)."""
    return {key: value for key, value in environ.items() if key != "MLC_MULTI_ARCH"}


def engine_config_fields(spec: EngineSpec) -> dict[str, Any]:
    """``EngineConfig`` fields for ``spec`` (with ``mode="local"``; the prefill chunk is inferred as
    min(compiled chunk, KV capacity, max_single_sequence_length), so no prompt is split)."""
    return {
        "max_num_sequence": spec.max_batch,
        "max_single_sequence_length": spec.max_seq_len,
        "max_total_sequence_length": 2 * spec.max_batch * spec.max_seq_len,
        "prefix_cache_mode": "radix",
        "verbose": False,
    }


def cuda_arch(compute_version: str) -> str:
    """TVM's ``Device.compute_version`` ('8.6') as an architecture name ('sm_86')."""
    return "sm_" + compute_version.replace(".", "")


def mlc_device(device: str) -> str:
    """A torch-style ``cuda`` / ``cuda:N`` as the ``cuda:N`` MLC and TVM parse."""
    return device if ":" in device else f"{device}:0"


def cache_index_name(tvmjs: Any) -> str:
    """The tensor-cache index the installed TVM reads: ``tensor-cache.json`` since TVM renamed NDArray
    to Tensor (and ``tvmjs.dump_ndarray_cache`` to ``dump_tensor_cache``), ``ndarray-cache.json`` before
    (e.g. the MLC-LLM 0.20 Jetson images)."""
    return TENSOR_CACHE_INDEX if hasattr(tvmjs, "dump_tensor_cache") else NDARRAY_CACHE_INDEX


MLC_BENCH_DEFINITIONS = (
    "python -m mlc_llm.bench on the full model, served by the MLC server it launches (--mlc-model-lib), one "
    "request at a time, llmperf prompts of P words of the synthetic tokenizer (one token each, plus the "
    "conversation template's BOS), N output tokens with ignore_eos, greedy, prefix cache off; ttft_ms and "
    "tpot_ms = the medians (p50) of its client-side time_to_first_token_s and time_per_output_token_s "
    "((e2e - ttft) / (N - 1)), which include the HTTP server's streaming that the table's engine metrics do not"
)
MLC_BENCH_MIN_PROMPT = 40  # its llmperf dataset replaces input lengths below 40 with 550


def mlc_bench_command(
    python: str, folder: Path, prompts: Path, workload: Workload, requests: int, port: int, output: Path
) -> list[str]:
    """``python -m mlc_llm.bench`` of ``requests`` requests of the workload's lengths against the MLC
    server it launches for ``folder`` (``--mlc-model-lib``), one at a time (``python/mlc_llm/bench/__main__.py``)."""
    engine = (
        f"max_num_sequence=1;max_total_seq_length={workload.prompt_len + workload.gen_len + 8};"
        "prefix_cache_mode=disable"
    )
    return [
        python,
        "-m",
        "mlc_llm.bench",
        "--dataset",
        "llmperf",
        "--dataset-path",
        str(prompts),
        "--tokenizer",
        str(folder),
        "--mlc-model-lib",
        str(folder / LIBRARY),
        "--mlc-engine-config",
        engine,
        "--num-gpus",
        "1",
        "--num-requests",
        str(requests),
        "--num-warmup-requests",
        "2",
        "--num-concurrent-requests",
        "1",
        "--input-len",
        str(workload.prompt_len),
        "--input-len-std",
        "0",
        "--output-len",
        str(workload.gen_len),
        "--output-len-std",
        "0",
        "--temperature",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-tqdm",
        "--output",
        str(output),
    ]


def parse_mlc_bench_csv(text: str, workload: Workload) -> tuple[float, float]:
    """(ttft_ms, tpot_ms) from mlc_llm.bench's CSV (``convert_reports_to_df``: one row per pipeline,
    nested report keys joined by dots); AmoebaError when a request failed or the lengths differ."""
    import pandas as pd

    try:
        row = pd.read_csv(io.StringIO(text)).iloc[0]
        completed, total = int(row["num_completed_requests"]), int(row["num_total_requests"])
        output_tokens = float(row["output_tokens.mean"])
        ttft_ms = float(row["time_to_first_token_s.quantiles.p50"]) * 1e3
        tpot_ms = float(row["time_per_output_token_s.quantiles.p50"]) * 1e3
    except (KeyError, IndexError, ValueError, pd.errors.ParserError) as exc:
        raise AmoebaError(f"mlc_llm.bench CSV lacks or mangles column {exc}") from None
    if completed != total:
        raise AmoebaError(f"mlc_llm.bench completed {completed} of {total} requests")
    if output_tokens != workload.gen_len:
        raise AmoebaError(
            f"mlc_llm.bench requests returned {output_tokens:g} tokens on average, not {workload.gen_len}"
        )
    return ttft_ms, tpot_ms


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _TtftPiece:
    """A 1-token request over a fresh random prompt; one sample is one request."""

    max_steps = 1

    def __init__(self, engine: "MlcLlmEngine", prompt_len: int):
        self.engine, self.prompt_len = engine, prompt_len

    def sample_ms(self, steps: int) -> float:
        del steps  # one request per sample: MLC's clock needs no batching against timer jitter
        for _ in range(_PROMPT_DRAWS):
            timing = self.engine.request(self.engine.random_prompt(self.prompt_len), 1)
            if timing.prefill_tokens == self.prompt_len:
                return timing.e2e_ms
        raise AmoebaError(
            f"MLC-LLM's prefix cache matched {_PROMPT_DRAWS} fresh random {self.prompt_len}-token prompts "
            f"(last prefilled {timing.prefill_tokens} tokens): ttft would not include the whole prefill"
        )


class _TpotPiece:
    """(e2e(1 + n) - e2e(1)) / n over one prompt whose KV MLC's prefix cache holds."""

    max_steps = 1

    def __init__(self, engine: "MlcLlmEngine", context: int, steps: int):
        self.engine, self.steps = engine, steps
        self.prompt = engine.random_prompt(tpot_prompt_len(context, steps))
        engine.request(self.prompt, 1)  # untimed: the prompt's KV enters the prefix cache

    def _cached(self, tokens: int) -> RequestTiming:
        timing = self.engine.request(self.prompt, tokens)
        if timing.prefill_tokens != 1:
            raise AmoebaError(
                f"MLC-LLM prefilled {timing.prefill_tokens} of a cached {len(self.prompt)}-token prompt "
                "(its prefix cache missed): the tpot sample would include a prefill"
            )
        return timing

    def sample_ms(self, steps: int) -> float:
        del steps  # one request pair per sample; its n decode steps are the window
        long = self._cached(1 + self.steps)
        return tpot_sample_ms(long, self._cached(1), self.steps)


class MlcLlmEngine(Engine):
    """A compiled model served by ``MLCEngine`` on the backend's GPU."""

    def __init__(self, backend: "MlcLlmBackend", spec: EngineSpec, artifact: Path):
        from mlc_llm import MLCEngine
        from mlc_llm.serve import EngineConfig

        self.spec = spec
        self.rng = np.random.default_rng()  # unseeded: a repeated prompt would hit the prefix cache
        self.engine = MLCEngine(
            str(artifact),
            device=backend.mlc_device,
            model_lib=str(artifact / LIBRARY),
            mode="local",
            engine_config=EngineConfig(**engine_config_fields(spec)),
        )

    def random_prompt(self, tokens: int) -> list[int]:
        return self.rng.integers(0, self.spec.arch.vocab_size, tokens).tolist()

    def request(self, prompt: list[int], tokens: int) -> RequestTiming:
        """One greedy completion of exactly ``tokens`` tokens; MLC's metrics of it."""
        response = self.engine.completions.create(
            prompt=prompt, max_tokens=tokens, temperature=0.0, extra_body={"debug_config": {"ignore_eos": True}}
        )
        usage = response.usage.model_dump()
        save_raw("mlc-llm", "usage", usage)
        timing = parse_usage(usage)
        timing.expect(len(prompt), tokens)
        return timing

    def ttft(self, batch: int, prompt_len: int) -> _TtftPiece:
        return _TtftPiece(self, prompt_len)

    def tpot(self, batch: int, context: int, steps: int) -> _TpotPiece:
        return _TpotPiece(self, context, steps)

    def close(self) -> None:
        self.engine.terminate()
        del self.engine
        gc.collect()


class MlcLlmBackend(Backend):
    name = "mlc-llm"
    experimental_reason = (
        "written against MLC-LLM's source; its parsing tests use samples constructed from that "
        "source, and scripts/a5000.sh and jetson-orin-nx.sh save the raw outputs of its first run "
        "to replace them"
    )

    def __init__(self, device: str = "cuda", dtype: str | None = None, threads: int | None = None, opt: str = "O2"):
        if threads is not None:
            raise UsageError("--threads does not apply to mlc-llm: its engine drives the GPU from its own threads")
        if not device.startswith("cuda"):
            raise UsageError(f"the mlc-llm backend runs on CUDA; device {device!r} is not supported")
        dtype = canonical_dtype(dtype or "float16")
        if dtype not in DTYPES:
            raise UsageError(f"mlc-llm runs unquantized weights in {list(DTYPES)}, not {dtype!r}")
        import mlc_llm
        import tvm
        from tvm.contrib import tvmjs

        self.config = MlcLlmConfig(device, dtype, opt)
        self.device, self.dtype = device, dtype
        self.mlc_device = mlc_device(device)
        gpu = tvm.cuda(int(self.mlc_device.split(":")[1]))
        if not gpu.exist:
            raise BackendUnavailable(f"TVM sees no CUDA device {self.mlc_device}")
        self.arch, self.gpu_name = cuda_arch(gpu.compute_version), gpu.device_name
        self.index_name = cache_index_name(tvmjs)
        self._versions = {"mlc-llm": mlc_llm.__version__, "tvm": tvm.__version__}

    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("mlc_llm") is None:
            return Availability(False, "mlc_llm is not installed", INSTALL_HINT)
        try:
            import mlc_llm
            import tvm
        except Exception as exc:  # a broken install (missing shared library, wrong CUDA) says why
            return Availability(False, f"mlc_llm does not import: {' '.join(str(exc).split())[:200]}", INSTALL_HINT)
        if not tvm.cuda(0).exist:
            return Availability(False, "TVM sees no CUDA device (the mlc-llm adapter measures on CUDA)", INSTALL_HINT)
        return Availability(
            True, f"mlc_llm {mlc_llm.__version__}, tvm {tvm.__version__}; CUDA, uniform shapes, q0f16/q0bf16/q0f32"
        )

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            per_layer_heads=False, per_layer_ffn=False, methods=("difference",), dtypes=DTYPES, devices=("cuda",)
        )

    @property
    def clock_name(self) -> str:
        return (
            "MLC-LLM engine metrics: usage.extra end_to_end_latency_s (std::chrono::high_resolution_clock in the "
            "engine thread, AddRequest to finish)"
        )

    def versions(self) -> dict[str, str]:
        return dict(self._versions)

    def device_arch(self) -> str:
        return self.arch

    def environment(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **self.versions(),
            "device": self.mlc_device,
            "gpu": self.gpu_name,
            "target": "cuda",
            "arch": self.arch,
            "dtype": cfg.dtype,
            "quantization": MLC_QUANTIZATION[cfg.dtype],
            "opt": cfg.opt,
            "tensor_cache_index": self.index_name,
            "python": platform.python_version(),
            "serving_loop": "MLCEngine.completions.create over token ids, greedy, ignore_eos, one sequence, "
            "mode local with radix prefix cache; times from usage.extra",
        }

    def check_spec(self, spec: EngineSpec) -> None:
        check_mlc_shape(spec)

    def compile(self, spec: EngineSpec, dest: Path) -> None:
        write_model_folder(dest, spec, self.dtype, self.index_name)
        command = compile_command(
            sys.executable,
            dest / CHAT_CONFIG,
            self.mlc_device,
            MLC_QUANTIZATION[self.dtype],
            self.config.opt,
            dest / LIBRARY,
        )
        done = subprocess.run(command, capture_output=True, text=True, env=compile_environment(os.environ), check=False)
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise AmoebaError(f"mlc_llm compile exited {done.returncode}: {tail}")
        (dest / ENGINE_RECORD).write_text(json.dumps({"flow": self.name, "spec": spec.to_dict()}, sort_keys=True))

    def load(self, spec: EngineSpec, artifact: Path) -> MlcLlmEngine:
        stored = read_engine_record(artifact, ENGINE_RECORD)
        if stored.get("flow") != self.name or stored["spec"] != spec.to_dict():
            raise UsageError(f"{artifact}: artifact holds another engine than requested; delete it to recompile")
        return MlcLlmEngine(self, spec, artifact)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError) or any(marker in str(exc) for marker in _OOM_MARKERS)

    def crosscheck_tool(self, arch: ModelArch, workload: Workload, work_dir: Path, repetitions: int) -> ToolResult:
        """The full model compiled as a build compiles it, benchmarked by ``python -m mlc_llm.bench``."""
        if workload.batch != 1:
            raise UnsupportedShape(
                "this cross-check runs mlc_llm.bench one request at a time; cross-check a batch-1 table"
            )
        if workload.prompt_len < MLC_BENCH_MIN_PROMPT:
            raise UsageError(
                f"mlc_llm.bench's llmperf prompts are at least {MLC_BENCH_MIN_PROMPT} tokens (shorter "
                "ones become 550); pass --prompt-len 40 or more"
            )
        layers = ((arch.num_heads, arch.num_kv_heads, arch.ffn_size),) * arch.num_layers
        spec = EngineSpec(arch, layers, 1, workload.prompt_len + 1, workload.prompt_len + workload.gen_len + 1)
        check_mlc_shape(spec)
        folder = work_dir / "model"
        folder.mkdir()
        self.compile(spec, folder)
        for name, text in hf_tokenizer_files(arch.vocab_size, arch.max_position).items():
            (folder / name).write_text(text)
        rng = np.random.default_rng(0)
        prompts = work_dir / "prompts.txt"  # lines of vocabulary words: llmperf cuts and joins them to P tokens
        prompts.write_text(
            "".join(" ".join(f"t{i}" for i in rng.integers(3, arch.vocab_size, 64)) + "\n" for _ in range(64))
        )
        output = work_dir / "mlc-bench.csv"
        command = mlc_bench_command(sys.executable, folder, prompts, workload, repetitions, _free_port(), output)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not output.is_file():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise AmoebaError(f"mlc_llm.bench exited {done.returncode}: {tail}")
        text = output.read_text()
        ttft_ms, tpot_ms = parse_mlc_bench_csv(text, workload)
        return ToolResult(
            "mlc_llm.bench", tuple(command), ttft_ms, tpot_ms, MLC_BENCH_DEFINITIONS, text + "\n" + done.stdout[-20000:]
        )
