"""What one LUT row measures: the request a backend times and the key a table is indexed by.

Components:
- ``attn`` (input RMSNorm + self-attention + residual + post-attention norm, keyed by
  heads/kv_heads) and ``mlp`` (the SwiGLU MLP, keyed by ffn): timed alone (``components``).
- ``layer``: one decoder layer of a (heads, kv_heads, ffn) shape, derived by the ``difference``
  method from whole models of several depths.
- ``base``: everything that is not a decoder layer (embeddings, final norm, lm_head, the serving
  loop's own per-request and per-token work).
- ``model``: a whole subnet through the flow's serving loop (truth rows and difference inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from amoeba_profile.core.subnet import Subnet


def entry_key(
    component: str,
    phase: str,
    batch: int,
    tokens: int,
    context: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    subnet_id: str,
) -> str:
    """The one definition of a row's identity, used to deduplicate and resume."""
    return f"{component}|{phase}|b{batch}|t{tokens}|c{context}|h{heads}|kv{kv_heads}|f{ffn}|s{subnet_id}"


def kind_of_key(key: str) -> tuple[str, str]:
    """(component, phase) of an entry key (``entry_key``)."""
    component, phase = key.split("|", 2)[:2]
    return component, phase


def samples_may_be_negative(component: str, phase: str) -> bool:
    """Whether one timing sample of a row may be below zero: a serving-loop decode sample (``model``
    or ``base``) is ``(e2e(1 + n) - e2e(1)) / n``, a difference of two requests that noise pushes
    below zero when a step is short (a few % of the tiny test model's ``base`` samples, enough for
    p10 <= 0); every other sample is one timed span."""
    return component in ("model", "base") and phase == "decode"


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
        return entry_key(
            self.component,
            self.phase,
            self.batch,
            self.tokens,
            self.context,
            self.heads,
            self.kv_heads,
            self.ffn,
            self.subnet_id,
        )

    @property
    def label(self) -> str:
        """For people (progress, errors): ``attn prefill 128 tok, 32 heads (4 kv)``, ``model L12 w3/4
        decode @512``; ``key`` is the stable identity."""
        where = f"prefill {self.tokens} tok" if self.phase == "prefill" else f"decode @{self.context}"
        if self.component == "mlp" and self.phase == "decode":
            where = "decode"  # one token whatever the context
        batch = f" b{self.batch}" if self.batch != 1 else ""
        what = {
            "attn": f", {self.heads} heads ({self.kv_heads} kv)",
            "mlp": f", ffn {self.ffn}",
            "layer": f", {self.heads} heads ({self.kv_heads} kv), ffn {self.ffn}",
        }.get(self.component, "")
        if self.component == "model":
            return f"model {self._subnet_text()} {where}{batch}"
        return f"{self.component} {where}{batch}{what}"

    def _subnet_text(self) -> str:
        subnet = self.subnet
        if subnet is None:
            return "L0"
        if subnet.width_ratio is not None:
            return f"L{subnet.num_layers} w{Fraction(subnet.width_ratio).limit_denominator(64)}"
        first = subnet.layers[0]
        if subnet.is_uniform:
            return f"L{subnet.num_layers} {first.heads}h ffn {first.ffn}"
        return f"L{subnet.num_layers} per-layer {subnet.id[:6]}"

    @property
    def unit(self) -> tuple:
        """Entries with the same unit share one built module or engine (all phases and contexts)."""
        return (self.component, self.heads, self.kv_heads, self.ffn, self.subnet_id)

    @property
    def runs_whole(self) -> bool:
        """Served by an engine through the flow's loop (``base`` is the engine with no layers)."""
        return self.component in ("model", "base")
