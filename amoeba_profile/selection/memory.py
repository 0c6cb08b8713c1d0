"""Device memory a subnet needs for a workload: weights + KV cache + activation headroom.

- weights: every parameter (embeddings and lm_head counted once when tied) x bytes per element;
- KV cache: 2 (K and V) x sum over kept layers of kv_heads x head_dim x batch x (prompt + gen) tokens;
- activation headroom: the prefill peak of one layer, batch x prompt x (3 x hidden + 2 x ffn_max)
  elements (hidden states, residual, norm output, gate and up), plus fp32 logits batch x vocab x 4 B.
Element sizes come from ``dtypes``: a llama.cpp table's quantized weights take a fraction of a byte,
its KV cache and activations stay f16 and f32. Allocator fragmentation and framework workspaces
(cuBLAS, CUDA graphs) are not included.

The same terms size a build before it starts (``plan_peak``, ``check_fits``): the largest engine
or component chain the plan will build must fit the memory the device has available, so that an
impossible grid is refused in a line instead of filling the machine or a table with ``oom`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

from amoeba_profile.core.arch import ModelArch, layer_params, non_layer_params
from amoeba_profile.core.dtypes import activation_bytes_per_element, bytes_per_element, kv_cache_bytes_per_element
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.workload import Workload

if TYPE_CHECKING:  # a plan is only read here; the build layer imports this module
    from amoeba_profile.measure.plan import BuildPlan

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
    return round(layer_params(arch, heads, kv_heads, ffn) * bytes_per_element(dtype)) + _kv_bytes(
        arch, kv_heads, workload, dtype
    )


def _activation_bytes(arch, batch: int, prompt_len: int, ffn_max: int, dtype: str) -> int:
    """One layer's prefill peak (hidden, residual, norm output, gate, up) plus fp32 logits."""
    return (
        round(batch * prompt_len * (3 * arch.hidden_size + 2 * ffn_max) * activation_bytes_per_element(dtype))
        + batch * arch.vocab_size * 4
    )


def fixed_bytes(arch, workload: Workload, dtype: str, ffn_max: int) -> tuple[int, int]:
    """(embedding/lm_head/final-norm weights, activation headroom) in bytes."""
    return round(non_layer_params(arch) * bytes_per_element(dtype)), _activation_bytes(
        arch, workload.batch, workload.prompt_len, ffn_max, dtype
    )


def engine_estimate(
    arch, layers: Sequence[tuple[int, int, int]], batch: int, kv_tokens: int, prompt_len: int, dtype: str
) -> MemoryEstimate:
    """A model with these (heads, kv_heads, ffn) layers holding ``kv_tokens`` positions of KV cache
    after a ``prompt_len`` prefill; zero layers is the embeddings and lm_head alone."""
    weights = non_layer_params(arch) + sum(layer_params(arch, h, kv, f) for h, kv, f in layers)
    kv_cache = round(
        2 * sum(kv for _, kv, _ in layers) * arch.head_dim * batch * kv_tokens * kv_cache_bytes_per_element(dtype)
    )
    act = _activation_bytes(arch, batch, prompt_len, max((f for _, _, f in layers), default=0), dtype)
    return MemoryEstimate(round(weights * bytes_per_element(dtype)), kv_cache, act)


def estimate(subnet: Subnet, workload: Workload, dtype: str) -> MemoryEstimate:
    layers = [(l.heads, l.kv_heads, l.ffn) for l in subnet.layers]
    return engine_estimate(
        subnet.arch, layers, workload.batch, workload.prompt_len + workload.gen_len, workload.prompt_len, dtype
    )


# How many copies of a component one timed step chains (the backend's ``chain_length``).
Copies = Callable[[str, int, int, int], int]


def _step_bytes(arch, heads: int, kv_heads: int, batch: int, kv_tokens: int, dtype: str) -> int:
    """What one attention step holds for a moment beyond the cache: the appended layer's K and V
    copied whole (``torch.cat``), and K and V expanded to the query heads (GQA)."""
    return round(2 * (kv_heads + heads) * arch.head_dim * batch * kv_tokens * kv_cache_bytes_per_element(dtype))


def entry_estimate(plan: BuildPlan, entry: Entry, dtype: str, copies: Copies) -> MemoryEstimate:
    """What measuring ``entry`` holds at once: its engine (KV for the engine's longest sequence), or
    its chain of component copies, each attention copy with its own KV cache; activations include
    one attention step's transient copies (``_step_bytes``)."""
    arch, s, kv_s, act_s = (
        plan.arch,
        bytes_per_element(dtype),
        kv_cache_bytes_per_element(dtype),
        activation_bytes_per_element(dtype),
    )
    if entry.runs_whole:
        layers = [(l.heads, l.kv_heads, l.ffn) for l in entry.subnet.layers] if entry.subnet else []
        kv_tokens = plan.engine_limits()[2]
        engine = engine_estimate(arch, layers, entry.batch, kv_tokens, max(plan.prompt_lens), dtype)
        step = max((_step_bytes(arch, h, kv, entry.batch, kv_tokens, dtype) for h, kv, _ in layers), default=0)
        return replace(engine, activation_bytes=engine.activation_bytes + step)
    n = copies(entry.component, entry.heads, entry.kv_heads, entry.ffn)
    if entry.component == "mlp":
        weights = 3 * arch.hidden_size * entry.ffn + arch.hidden_size
        return MemoryEstimate(
            round(n * weights * s), 0, round(entry.batch * entry.tokens * (arch.hidden_size + 2 * entry.ffn) * act_s)
        )
    weights = arch.hidden_size * arch.head_dim * 2 * (entry.heads + entry.kv_heads) + 2 * arch.hidden_size
    # Back-to-back decode steps grow the cache by up to context // 32 tokens before it is cropped.
    kv_tokens = entry.tokens + entry.context + entry.context // 32
    kv_cache = round(2 * n * entry.kv_heads * arch.head_dim * entry.batch * kv_tokens * kv_s)
    act = round(entry.batch * entry.tokens * 3 * arch.hidden_size * act_s)
    return MemoryEstimate(
        round(n * weights * s),
        kv_cache,
        act + _step_bytes(arch, entry.heads, entry.kv_heads, entry.batch, kv_tokens, dtype),
    )


def _label(entry: Entry, copies: Copies) -> str:
    if entry.runs_whole:
        return f"the {entry.num_layers}-layer model"
    n = copies(entry.component, entry.heads, entry.kv_heads, entry.ffn)
    where = f"prompt {entry.tokens}" if entry.phase == "prefill" else f"context {entry.context}"
    return f"a chain of {n} {entry.component} block{'s' if n > 1 else ''} at {entry.phase} {where}"


def plan_peak(plan: BuildPlan, dtype: str, copies: Copies | None = None) -> tuple[MemoryEstimate, str]:
    """The largest footprint among the engines and component chains ``plan`` builds, and what it is."""
    copies = copies or (lambda *_: 1)
    peak = max(plan.entries(), key=lambda e: entry_estimate(plan, e, dtype, copies).total_bytes)
    return entry_estimate(plan, peak, dtype, copies), _label(peak, copies)


def check_fits(
    plan: BuildPlan, dtype: str, available_bytes: int | None, where: str, copies: Copies | None = None
) -> MemoryEstimate:
    """Refuse (UsageError) a plan whose largest engine or chain cannot fit ``available_bytes``."""
    bytes_per_element(dtype)  # an unknown dtype is a UsageError naming the known ones
    need, label = plan_peak(plan, dtype, copies)
    if available_bytes is not None and need.total_bytes > available_bytes:
        raise UsageError(
            f"{label} needs {need.total_gb:.3g} GB (weights {need.weights_bytes / GB:.3g}, KV cache "
            f"{need.kv_cache_bytes / GB:.3g}, activations {need.activation_bytes / GB:.3g}) but {where} has "
            f"{available_bytes / GB:.3g} GB available; lower --contexts, --prompt-len or --batch, or use a smaller model"
        )
    return need
