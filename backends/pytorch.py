"""Eager PyTorch (Hugging Face transformers LLaMA) on CPU or CUDA.

Modules are built on the meta device and materialized with random values tiled from a small
random pool: latency does not depend on weight values, and this is ~5x faster than the
default initializers. Per-layer widths are real: each kept layer is its own
``LlamaDecoderLayer`` built from a config with that layer's head and FFN counts.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass
from typing import Any

from ..arch import ModelArch
from ..device import last_level_cache_bytes
from ..entry import Entry
from ..errors import UsageError
from ..measure import Workpiece
from .base import Availability, Backend, BuiltUnit, Capabilities

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_POOL_SIZE = 1 << 20


def _torch():
    import torch

    return torch


def llama_config(arch: ModelArch, num_layers: int, heads: int, kv_heads: int, ffn: int, attn_impl: str):
    """A transformers LlamaConfig with these widths.

    LlamaConfig refuses head counts that do not divide the hidden size, so it is built with the
    base counts and an explicit head_dim, and the pruned counts are set afterwards.
    """
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=arch.hidden_size,
        intermediate_size=ffn,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        num_hidden_layers=num_layers,
        vocab_size=arch.vocab_size,
        rms_norm_eps=arch.rms_norm_eps,
        max_position_embeddings=arch.max_position,
        tie_word_embeddings=arch.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
    )
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = kv_heads
    cfg._attn_implementation = attn_impl
    return cfg


def materialize(module, device: str, dtype):
    """Meta-device module -> real tensors on ``device`` filled with tiled random values."""
    torch = _torch()
    module = module.to(dtype=dtype).to_empty(device=device)
    pool = torch.empty(_POOL_SIZE, dtype=dtype, device=device).uniform_(-0.02, 0.02)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            flat = param.view(-1)
            whole = flat.numel() // _POOL_SIZE
            if whole:
                flat[: whole * _POOL_SIZE].view(whole, _POOL_SIZE).copy_(pool.expand(whole, _POOL_SIZE))
            rest = flat.numel() - whole * _POOL_SIZE
            if rest:
                flat[whole * _POOL_SIZE :].copy_(pool[:rest])
    return module


@dataclass(frozen=True)
class PyTorchConfig:
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on CPU, float16 on CUDA
    threads: int | None = None
    attn_impl: str = "sdpa"


class _AttnLayer:
    """A decoder layer whose MLP is the identity: attention, both norms, both residuals and the
    layer's own call overhead. Together with ``_MlpOnly`` it sums to exactly one decoder layer."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x, position_ids, position_embeddings, cache):
        return self.layer(
            x, attention_mask=None, position_ids=position_ids, cache=cache, use_cache=True,
            position_embeddings=position_embeddings,
        )


class _MlpOnly:
    """The SwiGLU MLP alone (gate, up, act, down); its norm and residual are in ``_AttnLayer``."""

    def __init__(self, layer):
        self.mlp = layer.mlp

    def __call__(self, x):
        return self.mlp(x)


class _Piece:
    """A Workpiece from a step closure and an optional reset closure."""

    def __init__(self, step, reset=None):
        self._step = step
        self._reset = reset

    def step(self) -> None:
        self._step()

    def reset(self) -> None:
        if self._reset is not None:
            self._reset()


class _Unit(BuiltUnit):
    """Built modules for one unit; components are a chain of ``repeat`` blocks with distinct weights."""

    repeat = 1

    def __init__(self, backend: "PyTorchBackend", arch: ModelArch, entry: Entry):
        torch = _torch()
        from transformers import DynamicCache, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self._torch = torch
        self._cache_cls = DynamicCache
        self.backend = backend
        self.arch = arch
        self.component = entry.component
        dev, dtype, impl = backend.device, backend.torch_dtype, backend.config.attn_impl
        if entry.component in ("attn", "mlp"):
            heads = entry.heads or arch.num_heads
            kv = entry.kv_heads or arch.num_kv_heads
            ffn = entry.ffn or arch.ffn_size
            self.repeat = backend.chain_length(arch, entry.component, heads, kv, ffn)
            self.cfg = llama_config(arch, self.repeat, heads, kv, ffn, impl)
            with torch.device("meta"):
                layers = torch.nn.ModuleList(LlamaDecoderLayer(self.cfg, layer_idx=i) for i in range(self.repeat))
            for layer in layers:
                if entry.component == "mlp":
                    del layer.self_attn
                else:
                    layer.mlp = torch.nn.Identity()
            self.layers = materialize(layers, dev, dtype).eval()
            self.rotary = LlamaRotaryEmbedding(self.cfg).to(dev)
        else:
            layers = entry.subnet.layers if entry.component == "model" else ()
            self.cfg = llama_config(arch, len(layers), arch.num_heads, arch.num_kv_heads, arch.ffn_size, impl)
            with torch.device("meta"):
                model = LlamaForCausalLM(self.cfg)
                for position, shape in enumerate(layers):
                    cfg_i = llama_config(arch, len(layers), shape.heads, shape.kv_heads, shape.ffn, impl)
                    model.model.layers[position] = LlamaDecoderLayer(cfg_i, layer_idx=position)
            model = materialize(model, dev, dtype).eval()
            if arch.tie_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
            model.model.rotary_emb = LlamaRotaryEmbedding(self.cfg).to(dev)
            self.model = model
            self.layer_shapes = layers

    def _hidden(self, entry: Entry):
        torch = self._torch
        return torch.randn(entry.batch, entry.tokens, self.arch.hidden_size, device=self.backend.device, dtype=self.backend.torch_dtype)

    def _positions(self, entry: Entry):
        torch = self._torch
        pos = torch.arange(entry.context, entry.context + entry.tokens, device=self.backend.device)
        return pos.unsqueeze(0).expand(entry.batch, -1)

    def _filled_cache(self, entry: Entry, kv_per_layer: list[int]):
        """A KV cache already holding ``entry.context`` random tokens in every layer."""
        torch = self._torch
        cache = self._cache_cls(config=self.cfg)
        for index, kv in enumerate(kv_per_layer):
            shape = (entry.batch, kv, entry.context, self.arch.head_dim)
            keys = torch.randn(shape, device=self.backend.device, dtype=self.backend.torch_dtype)
            cache.update(keys, torch.randn_like(keys), index)
        return cache

    def workpiece(self, entry: Entry) -> Workpiece:
        torch = self._torch
        if self.component == "mlp":
            blocks, x = [_MlpOnly(layer) for layer in self.layers], self._hidden(entry)

            def run_mlp() -> None:
                for block in blocks:
                    block(x)

            return _Piece(run_mlp)
        if self.component == "attn":
            blocks, x = [_AttnLayer(layer) for layer in self.layers], self._hidden(entry)
            positions = self._positions(entry)
            pe = self.rotary(x, positions)

            def run_attn(cache) -> None:
                for block in blocks:
                    block(x, positions, pe, cache)

            return self._cached_piece(entry, [self.cfg.num_key_value_heads] * self.repeat, run_attn)
        ids = torch.randint(0, self.arch.vocab_size, (entry.batch, entry.tokens), device=self.backend.device)
        if self.component == "base":
            # No layers, so no cache: positions are passed so rotary tables match the context.
            positions = self._positions(entry)
            return _Piece(lambda: self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1))
        kv = [shape.kv_heads for shape in self.layer_shapes]
        return self._cached_piece(
            entry, kv, lambda cache: self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        )

    def _cached_piece(self, entry: Entry, kv_per_layer: list[int], forward) -> Workpiece:
        """Prefill gets a fresh empty cache per step; decode a cache at ``context``, cropped back after each step."""
        state = {"cache": self._filled_cache(entry, kv_per_layer)}
        if entry.phase == "prefill":
            def reset() -> None:
                state["cache"] = self._cache_cls(config=self.cfg)
        else:
            def reset() -> None:
                state["cache"].crop(-entry.tokens)
        return _Piece(lambda: forward(state["cache"]), reset)

    def close(self) -> None:
        self.__dict__.pop("model", None)
        self.__dict__.pop("layers", None)
        if self.backend.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


class PyTorchBackend(Backend):
    name = "pytorch"

    def __init__(self, device: str = "cpu", dtype: str | None = None, threads: int | None = None, attn_impl: str = "sdpa"):
        torch = _torch()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
        default = "float16" if device.startswith("cuda") else "float32"
        name = DTYPES.get((dtype or default).lower())
        if name is None:
            raise UsageError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16")
        self.config = PyTorchConfig(device, name, threads, attn_impl)
        self.device = device
        self.dtype = name
        self.torch_dtype = getattr(torch, name)
        self.chain_bytes = 2 * last_level_cache_bytes(device)
        self.max_chain = 64
        if threads:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(False)

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
            components=("attn", "mlp", "base", "model"),
            dtypes=("float32", "float16", "bfloat16"),
            devices=("cpu", "cuda"),
        )

    def environment(self) -> dict[str, Any]:
        torch = _torch()
        env = {
            "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"),
            "device": self.device,
            "dtype": self.dtype,
            "threads": torch.get_num_threads(),
            "attn_impl": self.config.attn_impl,
            "python": platform.python_version(),
            "chain_bytes": self.chain_bytes,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        }
        if self.device.startswith("cuda"):
            env["cuda"] = torch.version.cuda
            env["gpu"] = torch.cuda.get_device_name(self.device)
        return env

    def build(self, arch: ModelArch, entry: Entry) -> BuiltUnit:
        return _Unit(self, arch, entry)

    def chain_length(self, arch: ModelArch, component: str, heads: int, kv_heads: int, ffn: int) -> int:
        """How many copies of a component one timed step runs.

        A lone block re-run in a loop keeps its weights in the last-level cache and times
        faster than inside a model, where the other layers evict it; a chain of distinct
        copies whose weights exceed twice that cache streams from memory as a real model does.
        """
        if component == "attn":
            params = arch.hidden_size * arch.head_dim * 2 * (heads + kv_heads)
        else:
            params = 3 * arch.hidden_size * ffn
        block_bytes = params * self.torch_dtype.itemsize
        return max(1, min(self.max_chain, -(-self.chain_bytes // block_bytes)))

    def is_out_of_memory(self, exc: BaseException) -> bool:
        torch = _torch()
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            return True
        return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))
