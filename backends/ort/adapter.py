"""ONNX Runtime: the transformers model exported to one ONNX graph, served by our own greedy loop.

Compiling exports the real pruned modules (``pytorch.build_model``: per-layer head and FFN counts,
random weights) with ``torch.onnx.export(dynamo=True)``. The graph takes ``input_ids`` and one
``past_k_i``/``past_v_i`` per layer (each layer has its own kv-head count) and returns the last
position's ``logits``, the greedy ``next_ids`` and ``present_k_i``/``present_v_i``. Sequence and past
lengths are dynamic, so one graph serves prefill (empty pasts) and decode (one token). Positions and
the causal mask are computed inside the graph from the past length: every sequence of a batch has
the same length here, so there is no padding mask to feed.

ONNX Runtime has no generate loop; ours is the minimal one a user writes: run the session, take the
greedy token, feed it and the presents back. The argmax is in the graph, so with IO binding the
loop moves no tensor through the host: ``next_ids`` and the presents of one step are bound as the
next step's inputs, on the provider's device. The KV cache grows by concatenation, as in the
exported transformers code (and eager ``DynamicCache``).

The artifact is the graph plus its weights packed as the random pool they tile (``ort_weights``:
a few MB instead of the model's size); ``load`` rebuilds the exact bytes as external initializers.

The clock is ``perf_counter`` on every provider: ``run_with_iobinding`` returns after ONNX Runtime
synchronized the provider's stream, so a sample spans the device work it started.

This module is named ``ort`` so that it never stands in for the ``onnxruntime`` package.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from amoeba_profile.backends.base import Availability, Backend, Capabilities, Engine, EngineSpec, read_engine_record
from amoeba_profile.backends.common.torch_llama import POOL_SIZE, build_model, cache_keyword
from amoeba_profile.backends.ort.weights import pack, unpack

from amoeba_profile.core.dtypes import canonical_dtype
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.timing import Workpiece
from amoeba_profile.core.workload import cached_prefix
from amoeba_profile.device.clock import Clock, ClockedPiece
from amoeba_profile.device.cpu import cpu_info
from amoeba_profile.device.threads import default_threads

MODEL_FILE = "model.onnx"
ENGINE_FILE = "engine.json"
DEFAULT_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
GRAPH_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
# Allocation failures: ONNX Runtime's arena (CPU and CUDA), CUDA, cuBLAS; torch's while exporting.
_OOM_MESSAGES = (
    "Failed to allocate memory",
    "bad_alloc",
    "bad allocation",
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "is smaller than requested bytes",
    "can't allocate memory",
)
INSTALL_HINT = 'pip install -e ".[onnxruntime]" (onnxruntime-gpu instead of onnxruntime for CUDA/TensorRT)'


def _ort():
    import onnxruntime

    return onnxruntime


def _torch():
    import torch

    return torch


def io_names(spec: EngineSpec) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph; past/present pairs follow layer order."""
    kv = [f"{kind}_{i}" for i in range(len(spec.layers)) for kind in ("k", "v")]
    return ["input_ids"] + [f"past_{x}" for x in kv], ["logits", "next_ids"] + [f"present_{x}" for x in kv]


def _kv_shape(spec: EngineSpec, batch: int, tokens: int) -> list[tuple[int, int, int, int]]:
    return [shape for _, kv, _ in spec.layers for shape in [(batch, kv, tokens, spec.arch.head_dim)] * 2]


def kv_graph(model, num_layers: int):
    """The module whose forward is the exported graph: tokens and per-layer pasts in; last-position
    logits, the greedy token and per-layer presents out."""
    import torch
    from transformers import DynamicCache

    class KvGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *pasts):
            cache = DynamicCache(list(zip(pasts[0::2], pasts[1::2]))) if num_layers else None
            keyword = cache_keyword(type(self.model).forward)
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{keyword: cache})
            logits = out.logits[:, -1, :]
            presents = [t for layer in out[keyword].layers[:num_layers] for t in (layer.keys, layer.values)]
            return (logits, logits.argmax(-1, keepdim=True), *presents)

    return KvGraph().eval()


# The exporter's registry logs one line per torchvision operator it skips (4 per export) when
# torchvision is absent; this flow never uses those operators.
_EXPORTER_LOGGER = "torch.onnx._internal.exporter._registration"


class _WithoutTorchvisionNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


@contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence what every export prints and nobody can act on: the skipped torchvision operators,
    torch.export's own ``LeafSpec`` deprecation and the shared dynamic axes (see ``export_onnx``).
    Anything else the exporter says still comes through."""
    logger, notes = logging.getLogger(_EXPORTER_LOGGER), _WithoutTorchvisionNotes()
    logger.addFilter(notes)
    try:
        with warnings.catch_warnings():
            # Every past shares the batch and past axes on purpose; the exporter warns about each one.
            warnings.filterwarnings("ignore", message="# The axis name")
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
            )
            yield
    finally:
        logger.removeFilter(notes)


def export_onnx(spec: EngineSpec, dtype: str, path: Path) -> dict[str, str]:
    """Export the subnet's LlamaForCausalLM (random weights) with explicit KV inputs and outputs,
    its weights packed as the random pool they tile (``ort_weights``); returns the packing map.

    The dynamo exporter handles this model (transformers' mask and cache code included), so the
    legacy TorchScript exporter is not used. Example sizes are distinct and above 1, so no dynamic
    dimension is specialized to a constant. Its optimizer merges equal initializers of at most 1024
    elements (and then the matmuls that share one): equal-shaped random weights of a test-sized model
    are equal tilings. Every weight of a real model is far larger, so none is shared there.
    """
    torch = _torch()
    model, _ = build_model(spec, "cpu", getattr(torch, dtype), "sdpa")
    inputs, outputs = io_names(spec)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    ids = torch.randint(0, spec.arch.vocab_size, (2, 3))
    pasts = tuple(torch.randn(shape, dtype=model.dtype) for shape in _kv_shape(spec, 2, 5))
    # ``*pasts`` is one tuple argument to torch.export, absent when the model has no layers
    dynamic = ({0: batch, 1: seq},) + ((tuple({0: batch, 2: past} for _ in pasts),) if pasts else ())
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            kv_graph(model, len(spec.layers)),
            (ids, *pasts),
            str(path),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=inputs,
            output_names=outputs,
            verbose=False,
            external_data=True,
        )
    # the longest weight holds the whole pool (or, in a tiny model, more of it than any other weight)
    longest = max(model.parameters(), key=lambda p: p.numel())
    return pack(path, longest.detach().reshape(-1)[:POOL_SIZE].numpy().copy())


@dataclass(frozen=True)
class OrtConfig:
    """Stored in the table's sidecar; ``OrtBackend(**config)`` rebuilds the same backend."""

    device: str = "cpu"
    provider: str | None = None  # default: CPUExecutionProvider on cpu, CUDAExecutionProvider on cuda
    dtype: str | None = None  # default: float32 on CPU, float16 on CUDA
    threads: int | None = None  # intra_op_num_threads; default: device.threads.default_threads, as every CPU flow
    graph_opt: str = "all"  # GraphOptimizationLevel: disable, basic, extended, all


def ort_device(device: str) -> tuple[str, int]:
    """(OrtValue device type, device id) where a session's inputs and outputs live."""
    if device.startswith("cuda"):
        return "cuda", int(device.split(":")[1]) if ":" in device else 0
    return "cpu", 0


def session_providers(config: OrtConfig, spec: EngineSpec) -> list:
    """The provider list for a session of ``spec``. TensorRT gets one optimization profile spanning
    the spec's limits (one engine serves prefill and decode) and CUDA as its fallback."""
    _, device_id = ort_device(config.device)
    if config.provider == "CPUExecutionProvider":
        return [config.provider]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if config.provider != "TensorrtExecutionProvider":
        return [cuda]
    inputs, _ = io_names(spec)

    def shapes(batch: int, tokens: int, past: int) -> str:
        dims = [(batch, tokens)] + _kv_shape(spec, batch, past)
        return ",".join(f"{name}:{'x'.join(map(str, d))}" for name, d in zip(inputs, dims))

    trt = {
        "device_id": device_id,
        "trt_fp16_enable": config.dtype == "float16",
        "trt_profile_min_shapes": shapes(1, 1, 0),
        "trt_profile_opt_shapes": shapes(spec.max_batch, 1, spec.max_input_len),
        "trt_profile_max_shapes": shapes(spec.max_batch, spec.max_input_len, spec.max_seq_len),
    }
    return [("TensorrtExecutionProvider", trt), cuda]


class _TpotPiece:
    """The n decode steps of a request whose prompt KV is already cached, timed directly.

    Our loop is transparent, so instead of (e2e(1 + n) - e2e(1)) / n - two noisy requests whose
    difference goes negative when a millisecond of preemption hits the short one - the request's
    first step (the prompt's one uncached token over a prefix cache of ``context - n // 2`` random
    tokens) runs once, untimed, and each sample times the n greedy steps that follow it. They run at
    contexts centred on ``context``. The session writes new presents and never its inputs, so every
    run restarts from the same state with nothing to restore, and runs may go back to back.
    """

    max_steps = 1 << 30

    def __init__(self, engine: "OrtEngine", batch: int, context: int, steps: int):
        self.engine, self.steps = engine, steps
        self.prefix = cached_prefix(context, steps)
        first = engine.generate(engine.random_ids(batch, 1), engine.random_pasts(batch, self.prefix), 1)
        self.ids, self.pasts = first[1], first[2:]

    def sample_ms(self, steps: int) -> float:
        """Milliseconds per decode step over ``steps`` runs of the n-step window."""

        def run() -> None:
            for _ in range(steps):
                self.engine.generate(self.ids, self.pasts, self.steps)

        return self.engine.clock.time_ms(run) / (steps * self.steps)


class OrtEngine(Engine):
    def __init__(self, backend: "OrtBackend", spec: EngineSpec, artifact: Path):
        ort = _ort()
        self.backend, self.spec, self.clock = backend, spec, backend.clock
        self.inputs, self.outputs = io_names(spec)
        self.device_type, self.device_id = ort_device(backend.device)
        self.np_dtype = np.dtype(backend.dtype)
        self.rng = np.random.default_rng(0)
        options = backend.session_options()
        names, arrays = unpack(artifact / MODEL_FILE)
        # The session reads the weights from these buffers for as long as it lives.
        self.weights = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
        options.add_external_initializers(names, self.weights)
        self.session = ort.InferenceSession(
            str(artifact / MODEL_FILE), options, providers=session_providers(backend.config, spec)
        )

    def _value(self, array: np.ndarray):
        return _ort().OrtValue.ortvalue_from_numpy(array, self.device_type, self.device_id)

    def random_ids(self, batch: int, tokens: int):
        return self._value(self.rng.integers(0, self.spec.arch.vocab_size, (batch, tokens), dtype=np.int64))

    def random_pasts(self, batch: int, tokens: int) -> list:
        """Per-layer key and value OrtValues holding ``tokens`` random positions (a prefix cache)."""
        return [
            self._value(self.rng.standard_normal(shape).astype(self.np_dtype))
            for shape in _kv_shape(self.spec, batch, tokens)
        ]

    def generate(self, ids, pasts: list, new_tokens: int) -> list:
        """The greedy loop: ``new_tokens`` session runs, each feeding back the last one's token and
        presents through IO binding. Returns the last run's outputs (OrtValues, in ``self.outputs``
        order)."""
        binding = self.session.io_binding()
        outputs: list = []
        for _ in range(new_tokens):
            for name, value in zip(self.inputs, (ids, *pasts)):
                binding.bind_ortvalue_input(name, value)
            for name in self.outputs:  # rebound each step: presents grow, so ORT allocates them anew
                binding.bind_output(name, self.device_type, self.device_id)
            self.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            ids, pasts = outputs[1], outputs[2:]
        return outputs

    def ttft(self, batch: int, prompt_len: int) -> Workpiece:
        ids, empty = self.random_ids(batch, prompt_len), self.random_pasts(batch, 0)
        return ClockedPiece(self.clock, lambda: self.generate(ids, empty, 1))

    def tpot(self, batch: int, context: int, steps: int) -> Workpiece:
        return _TpotPiece(self, batch, context, steps)

    def close(self) -> None:
        self.__dict__.pop("session", None)
        self.__dict__.pop("weights", None)


class OrtBackend(Backend):
    name = "onnxruntime"
    verified_on = ("cpu",)  # the CI builds a table on the CPU provider; the CUDA/TensorRT providers have not run

    def __init__(
        self,
        device: str = "cpu",
        provider: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        graph_opt: str = "all",
    ):
        ort = _ort()
        kind = "cuda" if device.startswith("cuda") else "cpu"
        provider = provider or DEFAULT_PROVIDER[kind]
        if provider not in PROVIDER_DEVICE:
            raise UsageError(f"provider {provider!r}: use one of {list(PROVIDER_DEVICE)}")
        if PROVIDER_DEVICE[provider] != kind:
            raise UsageError(f"provider {provider!r} does not run on device {device!r}")
        if provider not in ort.get_available_providers():
            raise UsageError(
                f"onnxruntime provider {provider!r} is not in this build "
                f"(available: {', '.join(ort.get_available_providers())}); {INSTALL_HINT}"
            )
        name = canonical_dtype(dtype or ("float16" if kind == "cuda" else "float32"))
        if name not in ("float32", "float16"):
            raise UsageError(f"dtype {dtype!r}: the onnxruntime backend exports float32 or float16")
        if graph_opt not in GRAPH_OPT_LEVELS:
            raise UsageError(f"graph_opt {graph_opt!r}: use one of {list(GRAPH_OPT_LEVELS)}")
        if threads is None:
            threads = default_threads(device, cpu_info()["cores"], "one per physical core")[0]
        self.config = OrtConfig(device, provider, name, threads, graph_opt)
        self.device, self.dtype = device, name
        self.clock = Clock("cpu")

    @classmethod
    def availability(cls) -> Availability:
        missing = [lib for lib in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(lib) is None]
        if missing:
            return Availability(False, f"{', '.join(missing)} not installed", INSTALL_HINT)
        ort = _ort()
        return Availability(
            True, f"onnxruntime {ort.__version__}; providers {', '.join(ort.get_available_providers())}"
        )

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            per_layer_heads=True,
            per_layer_ffn=True,
            methods=("difference",),
            dtypes=("float32", "float16"),
            devices=("cpu", "cuda"),
        )

    @property
    def clock_name(self) -> str:
        return self.clock.name

    def host_cores(self) -> int:
        return 1 if self.device.startswith("cuda") else self.config.threads

    def versions(self) -> dict[str, str]:
        import importlib.metadata

        import onnx
        import onnxscript

        return {
            "onnxruntime": _ort().__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "torch": _torch().__version__,
            "transformers": importlib.metadata.version("transformers"),
        }

    def device_arch(self) -> str:
        if self.device.startswith("cuda"):
            major, minor = _torch().cuda.get_device_capability(self.device)
            return f"sm_{major}{minor}"
        return platform.machine()

    def environment(self) -> dict[str, Any]:
        return {
            **self.versions(),
            **self.config_dict(),
            "python": platform.python_version(),
            "available_providers": _ort().get_available_providers(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "serving_loop": "own greedy loop over InferenceSession.run_with_iobinding, argmax in the graph",
        }

    def session_options(self):
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.threads
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPT_LEVELS[self.config.graph_opt])
        return options

    def compile(self, spec: EngineSpec, dest: Path) -> None:
        layout = export_onnx(spec, self.dtype, dest / MODEL_FILE)
        inputs, outputs = io_names(spec)
        kinds = {kind: list(layout.values()).count(kind) for kind in sorted(set(layout.values()))}
        (dest / ENGINE_FILE).write_text(
            json.dumps(
                {
                    "flow": "onnxruntime",
                    "exporter": "torch.onnx dynamo",
                    "spec": spec.to_dict(),
                    "inputs": inputs,
                    "outputs": outputs,
                    "weights": kinds,
                },
                sort_keys=True,
            )
        )

    def load(self, spec: EngineSpec, artifact: Path) -> Engine:
        stored = read_engine_record(artifact, ENGINE_FILE)["spec"]
        if stored != spec.to_dict():
            raise UsageError(f"{artifact}: artifact holds another shape than requested; delete it to recompile")
        return OrtEngine(self, spec, artifact)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        if isinstance(exc, MemoryError):
            return True
        from_ort = type(exc).__module__.startswith("onnxruntime") or isinstance(exc, RuntimeError)
        return from_ort and any(message in str(exc) for message in _OOM_MESSAGES)
