"""Device memory a subnet needs for a workload: weights + KV cache + activation headroom.

- weights: every parameter (embeddings and lm_head counted once when tied) x bytes per element;
- KV cache: 2 (K and V) x sum over kept layers of kv_heads x head_dim x batch x (prompt + gen) tokens;
- activation headroom: the prefill peak of one layer, batch x prompt x (3 x hidden + 2 x ffn_max)
  elements (hidden states, residual, norm output, gate and up), plus fp32 logits batch x vocab x 4 B.
Allocator fragmentation and framework workspaces (cuBLAS, CUDA graphs) are not included.
"""

from __future__ import annotations

from dataclasses import dataclass

from .quality import layer_params
from .subnet import Subnet
from .workload import Workload

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB


def weight_params(subnet: Subnet) -> int:
    arch = subnet.arch
    return _non_layer_params(arch) + sum(layer_params(arch, l.heads, l.kv_heads, l.ffn) for l in subnet.layers)


def _non_layer_params(arch) -> int:
    return arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2) + arch.hidden_size


def layer_bytes(arch, heads: int, kv_heads: int, ffn: int, workload: Workload, dtype: str) -> int:
    """One layer's weights plus its KV cache for the whole workload."""
    s = BYTES[dtype]
    tokens = workload.prompt_len + workload.gen_len
    return layer_params(arch, heads, kv_heads, ffn) * s + 2 * kv_heads * arch.head_dim * workload.batch * tokens * s


def fixed_bytes(arch, workload: Workload, dtype: str, ffn_max: int) -> tuple[int, int]:
    """(embedding/lm_head/final-norm weights, activation headroom) in bytes."""
    s = BYTES[dtype]
    act = workload.batch * workload.prompt_len * (3 * arch.hidden_size + 2 * ffn_max) * s + workload.batch * arch.vocab_size * 4
    return _non_layer_params(arch) * s, act


def estimate(subnet: Subnet, workload: Workload, dtype: str) -> MemoryEstimate:
    arch, s = subnet.arch, BYTES[dtype]
    tokens = workload.prompt_len + workload.gen_len
    kv = 2 * sum(l.kv_heads for l in subnet.layers) * arch.head_dim * workload.batch * tokens * s
    weights, act = fixed_bytes(arch, workload, dtype, max(l.ffn for l in subnet.layers))
    return MemoryEstimate(weight_params(subnet) * s, kv, act)
