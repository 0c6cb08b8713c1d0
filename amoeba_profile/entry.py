"""What one LUT row measures: the request a backend times and the key a table is indexed by.

Components: ``attn`` (input RMSNorm + self-attention + residual, keyed by heads/kv_heads),
``mlp`` (post-attention RMSNorm + SwiGLU MLP + residual, keyed by ffn), ``base`` (embeddings,
rotary tables, final norm, lm_head on the last position and the framework's per-call overhead),
``model`` (a whole subnet, used to validate composition). A decoder layer's cost is attn + mlp,
so heads and FFN channels may vary independently per layer without a 2-D grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from .subnet import Subnet

COMPONENTS = ("attn", "mlp", "base", "model", "layer")
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Entry:
    component: str
    phase: str
    batch: int
    tokens: int
    context: int
    heads: int = 0
    kv_heads: int = 0
    ffn: int = 0
    subnet: Subnet | None = None

    @property
    def num_layers(self) -> int:
        return self.subnet.num_layers if self.subnet is not None else 0

    @property
    def subnet_id(self) -> str:
        return self.subnet.id if self.subnet is not None else ""

    @property
    def key(self) -> str:
        """Stable identity used to deduplicate and resume."""
        return (
            f"{self.component}|{self.phase}|b{self.batch}|t{self.tokens}|c{self.context}"
            f"|h{self.heads}|kv{self.kv_heads}|f{self.ffn}|s{self.subnet_id}"
        )

    @property
    def unit(self) -> tuple:
        """Entries with the same unit share one built module (all phases and contexts)."""
        return (self.component, self.heads, self.kv_heads, self.ffn, self.subnet_id)
