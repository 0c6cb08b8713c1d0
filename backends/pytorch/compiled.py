"""Compiled PyTorch: a static KV cache and ``torch.compile``, through transformers' ``generate()``.

This is the flow latency-minded users of PyTorch run (the gpt-fast recipe, which transformers 5
applies by itself): ``generate()`` with a ``StaticCache`` compiles the model's forward with the
``CompileConfig`` in ``model.generation_config.compile_config`` whenever
``_valid_auto_compile_criteria`` holds - a compileable cache that is not a ``DynamicCache``, on
CUDA (or anywhere when ``CompileConfig._compile_all_devices`` is set, which this backend sets on
CPU). What is compiled is the per-token decode step: transformers runs the prefill eager, so
``ttft`` rows measure that eager prefill into a static cache and ``tpot`` rows the compiled decode
steps. Attention runs over all ``max_seq_len`` slots of the static cache under a mask, so rows hold
for engines sized to the build's longest context (``BuildPlan.engine_limits``), as a user sizes
the cache to the longest request. A model without decoder layers has no cache, is never compiled,
and is refused in ``check_spec``; the ``difference`` fit finds the base from the depths instead.

Serving-loop definitions are those of the eager flow (``pytorch.py``). ttft is a 1-token request,
for which transformers creates a fresh ``StaticCache`` of ``max_seq_len`` slots, as it does for a
user passing ``cache_implementation="static"``. tpot at context c is (e2e(1 + n) - e2e(1)) / n over
the engine's one ``StaticCache`` holding c - n/2 random tokens. A static layer is cropped by moving
its length counter back (the next request overwrites the stale slots), so the prefix is cropped
back after every request, untimed, exactly as the dynamic cache is.

Compile cost. ``compile`` builds the engine and runs one short request, so the decode step is
compiled there, timed, and never inside a measurement. The engine is then kept alive across rounds
in an ``EnginePool``, so a round's ``load`` costs nothing; when a new engine would push the pool
past half the device memory, every pooled engine is released together with dynamo's compiled code
(releasing one alone frees nothing, see ``EnginePool``). A released engine, and every engine after
a restart, compiles again in ``load`` and reports it as ``Engine.compile_s``; inductor's on-disk
cache (``environment()["inductor_cache_dir"]``) makes that cheaper. Measured for the 4-layer tiny
model (hidden 64) on the shared 2-core CPU: 105 s with an empty cache, 17 s from the disk cache in
a new process, 0.02 s for a model rebuilt in the same process while dynamo's code is kept (it is
keyed by guards on the model's structure, not on its instance). Every engine shape adds a cache entry on
one code object (``LlamaForCausalLM.forward``), so dynamo's recompile limit (8, past which it runs
eager with only a warning) is raised, and a frame that fell back to eager anyway makes the shape
``unsupported`` instead of a mislabelled row.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from amoeba_profile.backends.base import Backend, BuiltUnit, Capabilities, EngineSpec, ToolResult, read_engine_record
from amoeba_profile.backends.pytorch.eager import PyTorchBackend, PyTorchEngine, _torch

from amoeba_profile.core.arch import ModelArch, layer_params, non_layer_params
from amoeba_profile.core.dtypes import bytes_per_element, kv_cache_bytes_per_element
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import UnsupportedShape, UsageError
from amoeba_profile.core.workload import Workload

if TYPE_CHECKING:
    from transformers import StaticCache

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
# One cache entry per engine shape on LlamaForCausalLM.forward: a difference build of a 32-layer
# model with validation picks compiles a few dozen shapes in one process.
RECOMPILE_LIMIT = 512
POOL_FRACTION = 0.5  # compiled engines kept alive may use this share of device (or host) memory


@dataclass(frozen=True)
class PyTorchCompiledConfig:
    """Stored in the table's sidecar; ``PyTorchCompiledBackend(**config)`` rebuilds the same backend.

    The KV cache is always static: transformers compiles ``generate()`` only with a compileable,
    non-dynamic cache, so there is no cache option to choose."""

    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, float16 on CUDA
    threads: int | None = None  # default: torch's; the number used is what gets stored
    attn_impl: str = "sdpa"
    mode: str | None = None  # torch.compile mode; default: reduce-overhead on CUDA, default on CPU


def resolve_mode(device: str, mode: str | None) -> str:
    """The compile mode to use: transformers' own default (``reduce-overhead``, CUDA graphs) on CUDA,
    ``default`` on CPU, where CUDA graphs do not exist and a mode asking for them would be stored
    as if it ran them."""
    on_cuda = device.startswith("cuda")
    mode = mode or ("reduce-overhead" if on_cuda else "default")
    if mode not in COMPILE_MODES:
        raise UsageError(f"unknown compile mode {mode!r}: use one of {list(COMPILE_MODES)}")
    if not on_cuda and mode in _CUDA_GRAPH_MODES:
        raise UsageError(
            f"compile mode {mode!r} uses CUDA graphs, which a CPU does not have; use {_CUDA_GRAPH_MODES[mode]!r}"
        )
    return mode


def compile_config(device: str, mode: str):
    """The transformers ``CompileConfig`` ``generate()`` compiles with: its defaults (fullgraph off,
    inductor, automatic dynamic shapes) except the mode; on CPU it is flagged to compile anyway."""
    from transformers import CompileConfig

    config = CompileConfig(mode=mode)
    if not device.startswith("cuda"):
        # transformers compiles only on accelerators unless told; it declares this flag as a bare `= None`
        config._compile_all_devices = True  # type: ignore[assignment]  # transformers: flag typed None
    return config


@dataclass(frozen=True)
class JitCount:
    """Dynamo's process-wide frame counters (``torch._dynamo.utils.counters["frames"]``): ``frames``
    it tried to compile (every cache miss) and ``compiled`` ones; the rest fell back to eager."""

    frames: int
    compiled: int

    @classmethod
    def now(cls) -> "JitCount":
        from torch._dynamo.utils import counters

        return cls(counters["frames"]["total"], counters["frames"]["ok"])

    def __sub__(self, other: "JitCount") -> "JitCount":
        return JitCount(self.frames - other.frames, self.compiled - other.compiled)

    @property
    def fell_back(self) -> int:
        return self.frames - self.compiled


def raise_recompile_limits(limit: int = RECOMPILE_LIMIT) -> None:
    """Let dynamo hold one cache entry per engine shape: past ``recompile_limit`` (8) entries on one
    code object it stops compiling and runs eager, which would be measured as the compiled flow."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, limit)


def engine_bytes(spec: EngineSpec, dtype: str) -> int:
    """Bytes an engine holds on its device: weights plus the static KV cache of ``max_seq_len`` slots."""
    arch = spec.arch
    params = non_layer_params(arch) + sum(layer_params(arch, heads, kv, ffn) for heads, kv, ffn in spec.layers)
    cache = sum(2 * spec.max_batch * kv * spec.max_seq_len * arch.head_dim for _, kv, _ in spec.layers)
    return round(params * bytes_per_element(dtype) + cache * kv_cache_bytes_per_element(dtype))


class EnginePool:
    """Compiled engines kept alive across rounds, keyed by spec (within one backend the artifact key
    is the spec: config, versions and device architecture are fixed).

    When a new engine would push the total past ``budget_bytes``, every engine is released together
    with dynamo's in-memory code cache (``forget_compiled``). Releasing only the least recently
    used freed nothing: dynamo's cache entries keep each compiled model's module and weights alive,
    and a 6-layer TinyLlama-shaped build grew to 24 GB and was OOM-killed on this 24 GB host.
    Engines loaded afterwards compile again, and that time is in their ``compile_s``."""

    def __init__(self, budget_bytes: int, forget_compiled: Callable[[], None] = lambda: None):
        self.budget_bytes = budget_bytes
        self.forget_compiled = forget_compiled
        self._engines: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def get(self, key: Any):
        if key not in self._engines:
            return None
        self._engines.move_to_end(key)
        return self._engines[key][0]

    def held_bytes(self) -> int:
        return sum(size for _, size in self._engines.values())

    def make_room(self, size: int) -> None:
        if not self._engines or self.held_bytes() + size <= self.budget_bytes:
            return
        while self._engines:
            _, (engine, _) = self._engines.popitem(last=False)
            engine.release()
        self.forget_compiled()

    def put(self, key: Any, engine: Any, size: int) -> None:
        self._engines[key] = (engine, size)

    def __len__(self) -> int:
        return len(self._engines)


def forget_compiled() -> None:
    """Drop dynamo's compiled code (not inductor's disk cache) so released engines can be freed."""
    import gc

    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()


def pool_budget(device: str) -> int:
    torch = _torch()
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(POOL_FRACTION * total)


class CompiledEngine(PyTorchEngine):
    """The eager engine's model and serving-loop pieces, served from a static cache with the decode
    step compiled. ``close`` keeps it alive for the next round; the pool's eviction releases it."""

    def __init__(self, backend: "PyTorchCompiledBackend", spec: EngineSpec):
        super().__init__(backend, spec)
        self.model.generation_config.compile_config = backend.compile_config
        self._cache: StaticCache | None = None
        self._cache_batch = 0

    def generate(self, ids, cache, new_tokens: int):
        if cache is not None:
            return super().generate(ids, cache, new_tokens)
        torch = _torch()
        return self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation="static",
            max_cache_len=self.spec.max_seq_len,
        )

    def filled_cache(self, batch: int, tokens: int):
        """The engine's StaticCache of ``max_seq_len`` slots, refilled with ``tokens`` random keys/values
        in every layer. One cache per engine, as a serving process keeps one: the compiled step reads
        it at fixed addresses, and a new cache would make CUDA graphs re-record. The pieces of an
        engine are measured one after another, so they share it."""
        torch = _torch()
        from transformers import StaticCache

        cache = self._cache
        if cache is None or self._cache_batch != batch:
            cache = self._cache = StaticCache(config=self.cfg, max_cache_len=self.spec.max_seq_len)
            self._cache_batch = batch
        else:
            cache.reset()
        for index, (_, kv, _) in enumerate(self.spec.layers):
            keys = torch.randn(
                batch, kv, tokens, self.spec.arch.head_dim, device=self.device, dtype=self.backend.torch_dtype
            )
            cache.update(keys, torch.randn_like(keys), index)
        return cache

    def crop_cache(self, cache, tokens: int) -> None:
        """Move each static layer's length counter back to ``tokens``, in place (the compiled step reads
        it at a fixed address); the next request overwrites the stale slots. transformers 5.24's
        ``StaticLayer.crop`` does exactly this; 5.17 keeps the same counter but has no ``crop``."""
        for layer in cache.layers:
            layer.cumulative_length.sub_(int(layer.cumulative_length) - tokens)

    def warm_compile(self) -> float:
        """Compile the decode step now: one request of 3 tokens over a 1-token cached prefix at the
        largest batch. Returns its seconds; a frame that fell back to eager makes the shape
        unsupported (its rows would be eager times under the compiled flow's name)."""
        torch = _torch()
        batch = self.spec.max_batch
        ids = torch.randint(0, self.spec.arch.vocab_size, (batch, 2), device=self.device)
        cache = self.filled_cache(batch, 1)
        before = JitCount.now()
        seconds = self.clock.time_ms(lambda: self.generate(ids, cache, 3)) / 1e3
        spent = JitCount.now() - before
        if spent.fell_back:
            raise UnsupportedShape(
                f"torch.compile fell back to eager for {spent.fell_back} frame(s) of this "
                "engine (see TORCH_LOGS=recompiles); its rows would not be the compiled flow"
            )
        return seconds

    def jit_compiles(self) -> int | None:
        return JitCount.now().frames

    def close(self) -> None:
        """Kept alive for the next round: the pool owns the engine (``release`` frees it)."""

    def release(self) -> None:
        super().close()


class PyTorchCompiledBackend(PyTorchBackend):
    verified_on = ("cpu",)  # measured by the CI's compiled build; no CUDA run recorded yet

    def crosscheck_tool(self, arch: ModelArch, workload: Workload, work_dir: Path, repetitions: int) -> ToolResult:
        """The compiled flow has no benchmark tool of its own: eager generate() timing would check
        another flow."""
        raise UnsupportedShape(
            "pytorch-compiled has no benchmark tool of its own to cross-check with (eager "
            "generate() timing would check another flow); cross-check the eager pytorch table"
        )

    name = "pytorch-compiled"

    def __init__(
        self,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int | None = None,
        attn_impl: str = "sdpa",
        mode: str | None = None,
    ):
        mode = resolve_mode(device, mode)
        super().__init__(device, dtype, threads, attn_impl)
        eager = self.config
        self.config = PyTorchCompiledConfig(eager.device, eager.dtype, eager.threads, eager.attn_impl, mode)
        self.compile_config = compile_config(device, mode)
        raise_recompile_limits()
        self.pool = EnginePool(pool_budget(device), forget_compiled)

    @classmethod
    def capabilities(cls) -> Capabilities:
        eager = PyTorchBackend.capabilities()
        return Capabilities(eager.per_layer_heads, eager.per_layer_ffn, ("difference",), eager.dtypes, eager.devices)

    def versions(self) -> dict[str, str]:
        versions = super().versions()
        if self.device.startswith("cuda"):  # inductor generates Triton kernels on CUDA
            try:
                versions["triton"] = importlib.metadata.version("triton")
            except importlib.metadata.PackageNotFoundError:
                pass
        return versions

    def environment(self) -> dict[str, Any]:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return {
            **super().environment(),
            "compile_mode": self.config.mode,
            "inductor_cache_dir": cache_dir(),
            "serving_loop": "transformers generate(), greedy, fixed output length, StaticCache of max_seq_len "
            "slots, decode step compiled by torch.compile (prefill eager)",
        }

    def check_spec(self, spec: EngineSpec) -> None:
        if not spec.layers:
            raise UnsupportedShape(
                "a model without decoder layers has no KV cache, so generate() never compiles it; "
                "the difference fit takes the base from the layered models"
            )

    def _engine(self, spec: EngineSpec) -> tuple[CompiledEngine, float]:
        """The pooled engine for ``spec``, or a new one compiled now (with its compile seconds)."""
        engine = self.pool.get(spec)
        if engine is not None:
            return engine, 0.0
        size = engine_bytes(spec, self.dtype)
        self.pool.make_room(size)
        engine = CompiledEngine(self, spec)
        seconds = engine.warm_compile()
        self.pool.put(spec, engine, size)
        return engine, seconds

    def compile(self, spec: EngineSpec, dest: Path) -> None:
        t0 = time.perf_counter()
        _, seconds = self._engine(spec)
        record = {
            "flow": "compiled",
            "mode": self.config.mode,
            "spec": spec.to_dict(),
            "decode_compile_s": round(seconds, 3),
            "engine_s": round(time.perf_counter() - t0, 3),
        }
        (dest / "engine.json").write_text(json.dumps(record, sort_keys=True))

    def load(self, spec: EngineSpec, artifact: Path) -> CompiledEngine:
        stored = read_engine_record(artifact)
        if stored.get("flow") != "compiled" or stored["spec"] != spec.to_dict():
            raise UsageError(f"{artifact}: artifact holds another engine than requested; delete it to recompile")
        engine, seconds = self._engine(spec)
        engine.compile_s = seconds
        return engine

    def build_component(self, arch: ModelArch, entry: Entry) -> BuiltUnit:
        """No lone components: compiled code fuses across block boundaries and CUDA graphs replay the
        whole decode step, so a block timed alone is not what this flow runs."""
        return Backend.build_component(self, arch, entry)
