"""A transformers LLaMA with any per-layer widths and random weights: what every torch-based flow
(eager, compiled, the ONNX export) builds. A shared utility of the flows, not a flow.

Modules are built on the meta device and materialized with random values tiled from a small random
pool: latency does not depend on weight values, and this is ~5x faster than the default
initializers. Per-layer widths are real: each kept layer is its own ``LlamaDecoderLayer`` built
from a config with that layer's head and FFN counts.
"""

from __future__ import annotations

import functools
import inspect

from amoeba_profile.backends.base import EngineSpec

from amoeba_profile.core.arch import ModelArch

POOL_SIZE = 1 << 20  # elements of the random pool every weight tiles (ort_weights stores it once)


def _torch():
    import torch

    return torch


@functools.cache
def cache_keyword(forward) -> str:
    """The name ``forward`` takes the KV cache by: transformers renamed ``past_key_values`` to ``cache``
    within 5.x (5.17 reads only the old name, 5.24 only the new; ``generate()`` refuses the other as an
    unused model kwarg). Model outputs name the cache the same way."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


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
    pool = torch.empty(POOL_SIZE, dtype=dtype, device=device).uniform_(-0.02, 0.02)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            flat = param.view(-1)
            whole = flat.numel() // POOL_SIZE
            if whole:
                flat[: whole * POOL_SIZE].view(whole, POOL_SIZE).copy_(pool.expand(whole, POOL_SIZE))
            rest = flat.numel() - whole * POOL_SIZE
            if rest:
                flat[whole * POOL_SIZE :].copy_(pool[:rest])
    return module


def build_model(spec: EngineSpec, device: str, dtype, attn_impl: str):
    """A LlamaForCausalLM whose i-th layer has ``spec.layers[i]`` widths (zero layers allowed)."""
    torch = _torch()
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    arch, n = spec.arch, len(spec.layers)
    cfg = llama_config(arch, n, arch.num_heads, arch.num_kv_heads, arch.ffn_size, attn_impl)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
        for position, (heads, kv, ffn) in enumerate(spec.layers):
            model.model.layers[position] = LlamaDecoderLayer(
                llama_config(arch, n, heads, kv, ffn, attn_impl), layer_idx=position
            )
    model = materialize(model, device, dtype).eval()
    if arch.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(device)
    # Fixed output length: no end-of-sequence token can stop a request early.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model, cfg
