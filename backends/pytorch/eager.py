"""Eager PyTorch (Hugging Face transformers LLaMA) on CPU or CUDA.

The serving loop is ``model.generate()`` (greedy, fixed output length, no early stop): that is what
a user of this flow runs, and on a GPU the host work around each forward (sampling, logits
processing, cache bookkeeping) is a real part of the latency. Eager PyTorch has no compiled engine:
its artifact is the model's per-layer config, and ``load`` builds the model with random weights.

Modules are built on the meta device and materialized with random values tiled from a small random
pool: latency does not depend on weight values, and this is ~5x faster than the default
initializers. Per-layer widths are real: each kept layer is its own ``LlamaDecoderLayer`` built
from a config with that layer's head and FFN counts.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amoeba_profile.backends.base import (
    Availability,
    Backend,
    BuiltUnit,
    Capabilities,
    Engine,
    EngineSpec,
    ToolResult,
    read_engine_record,
)
from amoeba_profile.backends.common.torch_llama import _torch, build_model, cache_keyword, llama_config, materialize

from amoeba_profile.core.arch import ModelArch, attn_params, mlp_params
from amoeba_profile.core.dtypes import bytes_per_element, canonical_dtype
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import AmoebaError, UsageError
from amoeba_profile.core.inputs import positive_int
from amoeba_profile.core.timing import Workpiece
from amoeba_profile.core.workload import Workload, cached_prefix
from amoeba_profile.device import last_level_cache_bytes, resolve_device
from amoeba_profile.device.clock import Clock, ClockedPiece
from amoeba_profile.device.load import CpuLoad
from amoeba_profile.device.threads import default_threads as device_default_threads

DTYPES = ("float32", "float16", "bfloat16")


def default_threads(device: str, load: CpuLoad | None = None, cap: int | None = None) -> tuple[int, str]:
    """Intra-op threads when none are given, and why (``device.threads.default_threads``), capped
    by torch's own default."""
    return device_default_threads(device, cap or _torch_default_threads(), "torch's default", load)


@functools.cache
def _torch_default_threads() -> int:
    """torch's own intra-op default (one per physical core, or OMP_NUM_THREADS), read before any
    backend of this process changes it."""
    return _torch().get_num_threads()


@dataclass(frozen=True)
class PyTorchConfig:
    """Stored in the table's sidecar; ``PyTorchBackend(**config)`` rebuilds the same backend."""

    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, float16 on CUDA
    threads: int | None = None  # default: ``default_threads``; the number used is what gets stored
    attn_impl: str = "sdpa"


GENERATE_DEFINITIONS = (
    "optimum-benchmark's generate() timing on the full model: plain transformers generate() with "
    "min_new_tokens = max_new_tokens (the output length is fixed without touching eos), greedy, a fresh "
    "random prompt prefilled every request, time.perf_counter around each call (device synchronized "
    "before and after); ttft_ms = median of 1-token generates, tpot_ms = (median e2e(N) - ttft_ms) / (N - 1). "
    "Apart from this flow's workpieces: no cached prompt KV, no centred decode windows, no difference fit"
)


def generate_timing(backend: "PyTorchBackend", arch: ModelArch, workload: Workload, repetitions: int) -> ToolResult:
    """Time the full model the way optimum-benchmark's inference scenario times a transformers model
    (``GENERATE_DEFINITIONS``), after one warm-up call of each length."""
    torch = _torch()
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = llama_config(
        arch, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.ffn_size, backend.config.attn_impl
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = materialize(model, backend.device, backend.torch_dtype).eval()
    if arch.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(backend.device)  # its buffers were left on meta
    ids = torch.randint(0, arch.vocab_size, (workload.batch, workload.prompt_len), device=backend.device)
    mask = torch.ones_like(ids)
    cuda = backend.device.startswith("cuda")

    def timed(new_tokens: int) -> float:
        if cuda:
            torch.cuda.synchronize(backend.device)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        if cuda:
            torch.cuda.synchronize(backend.device)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if out.shape[-1] != workload.prompt_len + new_tokens:
            raise AmoebaError(f"generate() returned {out.shape[-1] - workload.prompt_len} tokens, not {new_tokens}")
        return elapsed_ms

    timed(1), timed(workload.gen_len)  # warm-up, as optimum-benchmark's warmup runs
    first = [timed(1) for _ in range(repetitions)]
    whole = [timed(workload.gen_len) for _ in range(repetitions)]
    ttft_ms, e2e_ms = statistics.median(first), statistics.median(whole)
    calls = (
        f"model.generate(ids[{workload.batch}x{workload.prompt_len}], min_new_tokens=n, max_new_tokens=n, "
        f"do_sample=False) for n in (1, {workload.gen_len}), {repetitions} each after one warm-up",
    )
    raw = json.dumps(
        {
            "ttft_samples_ms": first,
            "e2e_samples_ms": whole,
            "device": backend.device,
            "dtype": backend.dtype,
            "threads": torch.get_num_threads(),
        }
    )
    return ToolResult(
        "generate() timing (optimum-benchmark style)",
        calls,
        ttft_ms,
        (e2e_ms - ttft_ms) / (workload.gen_len - 1),
        GENERATE_DEFINITIONS,
        raw,
    )


class _TpotPiece:
    """(e2e(1 + n) - e2e(1)) / n through ``generate()``, with the prompt's KV already cached.

    The cache holds ``context - n // 2`` random tokens, so the n timed decode steps run at contexts
    centred on ``context``; it is cropped back after every request (untimed).
    """

    max_steps = 1

    def __init__(self, engine: "PyTorchEngine", batch: int, context: int, steps: int):
        torch = _torch()
        self.engine, self.steps = engine, steps
        prefix = cached_prefix(context, steps)
        self.prefix = prefix
        self.ids = torch.randint(0, engine.spec.arch.vocab_size, (batch, prefix + 1), device=engine.device)
        self.cache = engine.filled_cache(batch, prefix)

    def _request(self, new_tokens: int) -> float:
        ms = self.engine.clock.time_ms(lambda: self.engine.generate(self.ids, self.cache, new_tokens))
        if self.cache is not None:
            self.engine.crop_cache(self.cache, self.prefix)
        return ms

    def sample_ms(self, steps: int) -> float:
        del steps  # one request pair per sample; its n decode steps are the back-to-back steps
        return (self._request(1 + self.steps) - self._request(1)) / self.steps


class PyTorchEngine(Engine):
    def __init__(self, backend: "PyTorchBackend", spec: EngineSpec):
        self.backend, self.spec, self.device = backend, spec, backend.device
        self.clock = backend.clock
        self.model, self.cfg = build_model(spec, backend.device, backend.torch_dtype, backend.config.attn_impl)
        self.cache_keyword = cache_keyword(type(self.model).forward)  # read once, not inside timed requests

    def generate(self, ids, cache, new_tokens: int):
        torch = _torch()
        kwargs = {self.cache_keyword: cache} if cache is not None else {}
        return self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, **kwargs
        )

    def crop_cache(self, cache, tokens: int) -> None:
        """Cut the cache back to its first ``tokens`` after a request (untimed). A negative count to
        remove is what transformers 5.17 and 5.24 both read the same way."""
        cache.crop(-(cache.get_seq_length() - tokens))

    def filled_cache(self, batch: int, tokens: int):
        """A DynamicCache holding ``tokens`` random keys/values in every layer (None with no layers)."""
        if not self.spec.layers:
            return None
        torch = _torch()
        from transformers import DynamicCache

        cache = DynamicCache(config=self.cfg)
        for index, (_, kv, _) in enumerate(self.spec.layers):
            keys = torch.randn(
                batch, kv, tokens, self.spec.arch.head_dim, device=self.device, dtype=self.backend.torch_dtype
            )
            cache.update(keys, torch.randn_like(keys), index)
        return cache

    def ttft(self, batch: int, prompt_len: int) -> Workpiece:
        torch = _torch()
        ids = torch.randint(0, self.spec.arch.vocab_size, (batch, prompt_len), device=self.device)
        return ClockedPiece(self.clock, lambda: self.generate(ids, None, 1))

    def tpot(self, batch: int, context: int, steps: int) -> Workpiece:
        return _TpotPiece(self, batch, context, steps)

    def device_busy(self, piece: Workpiece) -> float | None:
        if not self.device.startswith("cuda"):
            return None
        from torch.profiler import ProfilerActivity, profile

        # The span is the sample's whole GPU timeline (a tpot sample runs two requests); profiling
        # slows the host a little, so a borderline row reads slightly more host-bound than it is.
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            span_ms = self.clock.time_ms(lambda: piece.sample_ms(1))
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
        return round(min(1.0, kernel_us / 1e3 / span_ms), 4) if span_ms > 0 else None

    def close(self) -> None:
        self.__dict__.pop("model", None)
        if self.device.startswith("cuda"):
            _torch().cuda.empty_cache()


class _AttnLayer:
    """A decoder layer whose MLP is the identity: attention, both norms, both residuals and the
    layer's own call overhead. Together with ``_MlpOnly`` it sums to exactly one decoder layer."""

    def __init__(self, layer):
        self.layer = layer
        self.cache_keyword = cache_keyword(type(layer).forward)  # read once, not inside timed steps

    def __call__(self, x, position_ids, position_embeddings, cache):
        return self.layer(
            x,
            attention_mask=None,
            position_ids=position_ids,
            use_cache=True,
            position_embeddings=position_embeddings,
            **{self.cache_keyword: cache},
        )


class _ComponentUnit(BuiltUnit):
    """A chain of ``repeat`` attn or mlp blocks with distinct weights (``components`` method)."""

    def __init__(self, backend: "PyTorchBackend", arch: ModelArch, entry: Entry):
        torch = _torch()
        from transformers import DynamicCache
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        if entry.component not in ("attn", "mlp"):
            raise UsageError(f"components are attn and mlp; {entry.component!r} runs through the serving loop")
        self._torch, self._cache_cls = torch, DynamicCache
        self.backend, self.arch, self.component = backend, arch, entry.component
        heads = entry.heads or arch.num_heads
        kv = entry.kv_heads or arch.num_kv_heads
        ffn = entry.ffn or arch.ffn_size
        self.repeat = backend.chain_length(arch, entry.component, heads, kv, ffn)
        self.cfg = llama_config(arch, self.repeat, heads, kv, ffn, backend.config.attn_impl)
        with torch.device("meta"):
            layers = torch.nn.ModuleList(LlamaDecoderLayer(self.cfg, layer_idx=i) for i in range(self.repeat))
        for layer in layers:
            if entry.component == "mlp":
                del layer.self_attn
            else:
                layer.mlp = torch.nn.Identity()
        self.layers = materialize(layers, backend.device, backend.torch_dtype).eval()
        self.rotary = LlamaRotaryEmbedding(self.cfg).to(backend.device)

    def _hidden(self, entry: Entry):
        return self._torch.randn(
            entry.batch, entry.tokens, self.arch.hidden_size, device=self.backend.device, dtype=self.backend.torch_dtype
        )

    def workpiece(self, entry: Entry) -> Workpiece:
        torch, clock = self._torch, self.backend.clock
        x = self._hidden(entry)
        if self.component == "mlp":
            mlps = [layer.mlp for layer in self.layers]

            def run_mlp() -> None:
                for mlp in mlps:
                    mlp(x)

            return ClockedPiece(clock, run_mlp)
        blocks = [_AttnLayer(layer) for layer in self.layers]
        positions = torch.arange(entry.context, entry.context + entry.tokens, device=self.backend.device)
        positions = positions.unsqueeze(0).expand(entry.batch, -1)
        pe = self.rotary(x, positions)
        state = {"cache": self._filled_cache(entry)}

        def run_attn() -> None:
            for block in blocks:
                block(x, positions, pe, state["cache"])

        if entry.phase == "prefill":  # every prefill starts from an empty cache

            def reset() -> None:
                state["cache"] = self._cache_cls(config=self.cfg)

            return ClockedPiece(clock, run_attn, reset, back_to_back=False)

        def crop() -> None:  # back-to-back decode steps grew the cache; crop it back to ``context``
            cache = state["cache"]
            cache.crop(-(cache.get_seq_length() - entry.context))

        # Each back-to-back step adds a token to the cache: cap them so a sample stays within ~3 % of ``context``.
        return ClockedPiece(clock, run_attn, crop, max_steps=max(1, entry.context // 32))

    def _filled_cache(self, entry: Entry):
        cache = self._cache_cls(config=self.cfg)
        for index in range(self.repeat):
            shape = (entry.batch, self.cfg.num_key_value_heads, entry.context, self.arch.head_dim)
            keys = self._torch.randn(shape, device=self.backend.device, dtype=self.backend.torch_dtype)
            cache.update(keys, self._torch.randn_like(keys), index)
        return cache

    def close(self) -> None:
        self.__dict__.pop("layers", None)
        if self.backend.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


class PyTorchBackend(Backend):
    name = "pytorch"
    verified_on: tuple[str, ...] = ("cpu", "cuda")  # tables shipped for two CPUs and a lent H200 (lut/README.md)

    def __init__(
        self, device: str = "cpu", dtype: str | None = None, threads: int | None = None, attn_impl: str = "sdpa"
    ):
        torch = _torch()
        _torch_default_threads()  # read before this backend sets its own count
        device, _ = resolve_device(device)  # a device torch cannot use fails here, not mid-build
        default = "float16" if device.startswith("cuda") else "float32"
        name = canonical_dtype(dtype or default)
        if name not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16")
        self.threads_reason = "given"
        if threads is None:
            threads, self.threads_reason = default_threads(device)
        else:
            threads = positive_int(threads, "--threads")
        self.config = PyTorchConfig(device, name, threads, attn_impl)
        self.device = device
        self.dtype = name
        self.torch_dtype = getattr(torch, name)
        self.chain_bytes = 2 * last_level_cache_bytes(device)
        self.max_chain = 64
        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
        self.clock = Clock(device, stream)

    @classmethod
    def availability(cls) -> Availability:
        try:
            importlib.metadata.version("torch")
            importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError as exc:
            return Availability(False, f"{exc.name} is not installed", "pip install torch==2.13.0 transformers")
        return Availability(True, "torch and transformers importable; CPU always, CUDA when torch sees a GPU")

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            per_layer_heads=True,
            per_layer_ffn=True,
            methods=("components", "calibrated", "difference"),
            dtypes=DTYPES,
            devices=("cpu", "cuda"),
        )

    @property
    def clock_name(self) -> str:
        return self.clock.name

    def versions(self) -> dict[str, str]:
        return {"torch": _torch().__version__, "transformers": importlib.metadata.version("transformers")}

    def device_arch(self) -> str:
        torch = _torch()
        if self.device.startswith("cuda"):
            major, minor = torch.cuda.get_device_capability(self.device)
            return f"sm_{major}{minor}"
        return platform.machine()

    def environment(self) -> dict[str, Any]:
        torch = _torch()
        env = {
            **self.versions(),
            "device": self.device,
            "dtype": self.dtype,
            "threads": torch.get_num_threads(),
            "threads_reason": self.threads_reason,
            "attn_impl": self.config.attn_impl,
            "python": platform.python_version(),
            "chain_bytes": self.chain_bytes,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "serving_loop": "transformers generate(), greedy, fixed output length",
        }
        if self.device.startswith("cuda"):
            env["cuda"] = torch.version.cuda
            env["gpu"] = torch.cuda.get_device_name(self.device)
        return env

    def compile(self, spec: EngineSpec, dest: Path) -> None:
        (dest / "engine.json").write_text(json.dumps({"flow": "eager", "spec": spec.to_dict()}, sort_keys=True))

    def load(self, spec: EngineSpec, artifact: Path) -> Engine:
        stored = read_engine_record(artifact)["spec"]
        if stored != spec.to_dict():
            raise UsageError(f"{artifact}: artifact holds another shape than requested; delete it to recompile")
        return PyTorchEngine(self, spec)

    def build_component(self, arch: ModelArch, entry: Entry) -> BuiltUnit:
        return _ComponentUnit(self, arch, entry)

    def crosscheck_tool(self, arch: ModelArch, workload: Workload, work_dir: Path, repetitions: int) -> ToolResult:
        return generate_timing(self, arch, workload, repetitions)

    def chain_length(self, arch: ModelArch, component: str, heads: int, kv_heads: int, ffn: int) -> int:
        """How many copies of a component one timed step runs.

        A lone block re-run in a loop keeps its weights in the last-level cache and times
        faster than inside a model, where the other layers evict it; a chain of distinct
        copies whose weights exceed twice that cache streams from memory as a real model does.
        """
        params = attn_params(arch, heads, kv_heads) if component == "attn" else mlp_params(arch, ffn)
        block_bytes = params * bytes_per_element(self.dtype)
        return max(1, min(self.max_chain, int(-(-self.chain_bytes // block_bytes))))

    def host_cores(self) -> int:
        return 1 if self.device.startswith("cuda") else self.config.threads

    def is_out_of_memory(self, exc: BaseException) -> bool:
        torch = _torch()
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            return True
        return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))
