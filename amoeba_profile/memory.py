"""Device memory a subnet needs for a workload: weights + KV cache + activation headroom.

- weights: every parameter (embeddings and lm_head counted once when tied) x bytes per element;
- KV cache: 2 (K and V) x sum over kept layers of kv_heads x head_dim x batch x (prompt + gen) tokens;
- activation headroom: the prefill peak of one layer, batch x prompt x (3 x hidden + 2 x ffn_max)
  elements (hidden states, residual, norm output, gate and up), plus fp32 logits batch x vocab x 4 B.
Element sizes come from ``dtypes``: a llama.cpp table's quantized weights take a fraction of a byte,
its KV cache and activations stay f16 and f32. Allocator fragmentation and framework workspaces
(cuBLAS, CUDA graphs) are not included.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import ModelArch, layer_params, non_layer_params
from .dtypes import activation_bytes_per_element, bytes_per_element, kv_cache_bytes_per_element
from .subnet import Subnet
from .workload import Workload

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
    return non_layer_params(arch) + sum(layer_params(arch, l.heads, l.kv_heads, l.ffn) for l in subnet.layers)


def _kv_bytes(arch: ModelArch, kv_heads: int, workload: Workload, dtype: str) -> int:
    """K and V of ``kv_heads`` heads (summed over layers) for the whole workload."""
    tokens = workload.prompt_len + workload.gen_len
    return round(2 * kv_heads * arch.head_dim * workload.batch * tokens * kv_cache_bytes_per_element(dtype))


def layer_bytes(arch: ModelArch, heads: int, kv_heads: int, ffn: int, workload: Workload, dtype: str) -> int:
    """One layer's weights plus its KV cache for the whole workload."""
    return round(layer_params(arch, heads, kv_heads, ffn) * bytes_per_element(dtype)) + _kv_bytes(arch, kv_heads,
                                                                                                  workload, dtype)


def fixed_bytes(arch: ModelArch, workload: Workload, dtype: str, ffn_max: int) -> tuple[int, int]:
    """(embedding/lm_head/final-norm weights, activation headroom) in bytes."""
    act = round(workload.batch * workload.prompt_len * (3 * arch.hidden_size + 2 * ffn_max)
                * activation_bytes_per_element(dtype)) + workload.batch * arch.vocab_size * 4
    return round(non_layer_params(arch) * bytes_per_element(dtype)), act


def estimate(subnet: Subnet, workload: Workload, dtype: str) -> MemoryEstimate:
    arch = subnet.arch
    kv = _kv_bytes(arch, sum(l.kv_heads for l in subnet.layers), workload, dtype)
    _, act = fixed_bytes(arch, workload, dtype, max(l.ffn for l in subnet.layers))
    return MemoryEstimate(round(weight_params(subnet) * bytes_per_element(dtype)), kv, act)
