"""LLaMA-family architectures: the base shapes that subnets are cut from.

Named architectures are data (a dict of name -> ModelArch); any LLaMA-like Hugging Face
``config.json`` is accepted too, and a field we cannot honour is an error that names it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ArchError


@dataclass(frozen=True)
class ModelArch:
    """A LLaMA-like decoder-only transformer, described by the sizes that drive latency."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    tie_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 4096

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention, >1 for GQA)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelArch":
        arch = cls(**data)
        arch.check()
        return arch

    def check(self) -> None:
        """Raise ArchError naming the first field that makes this architecture unusable."""
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ArchError(f"{self.name}: field '{field}' must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ArchError(
                f"{self.name}: field 'num_key_value_heads'={self.num_kv_heads} does not divide "
                f"num_attention_heads={self.num_heads}"
            )


# Parameter counts of the LLaMA block (no biases): the one definition that the quality proxy, the
# memory estimate and the backends' size estimates use.
def attn_params(arch: ModelArch, heads: int, kv_heads: int) -> int:
    """q/o projections (``heads``) and k/v projections (``kv_heads``)."""
    return arch.hidden_size * arch.head_dim * 2 * (heads + kv_heads)


def mlp_params(arch: ModelArch, ffn: int) -> int:
    """gate, up and down projections of the SwiGLU MLP."""
    return 3 * arch.hidden_size * ffn


def layer_params(arch: ModelArch, heads: int, kv_heads: int, ffn: int) -> int:
    """One decoder layer: attention, MLP and its two RMSNorms."""
    return attn_params(arch, heads, kv_heads) + mlp_params(arch, ffn) + 2 * arch.hidden_size


def non_layer_params(arch: ModelArch) -> int:
    """Everything that is not a decoder layer: embeddings, lm_head (once when tied), final norm."""
    return arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2) + arch.hidden_size


BUILTIN_ARCHS: dict[str, ModelArch] = {
    arch.name: arch
    for arch in (
        ModelArch("llama2-7b", 4096, 32, 32, 32, 128, 11008, 32000, max_position=4096),
        ModelArch("vicuna-7b", 4096, 32, 32, 32, 128, 11008, 32000, max_position=4096),
        ModelArch("llama2-13b", 5120, 40, 40, 40, 128, 13824, 32000, max_position=4096),
        ModelArch("llama3-8b", 4096, 32, 32, 8, 128, 14336, 128256, rope_theta=500000.0, max_position=8192),
        ModelArch("tinyllama-1.1b", 2048, 22, 32, 4, 64, 5632, 32000, max_position=2048),
    )
}

# model_type values whose decoder block is the LLaMA block (RMSNorm, RoPE, SwiGLU, optional GQA).
_LLAMA_LIKE_TYPES = {"llama", "mistral"}


def _require_int(config: dict[str, Any], field: str, source: str) -> int:
    if field not in config:
        raise ArchError(f"{source}: missing field '{field}'")
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArchError(f"{source}: field '{field}' must be a positive integer, got {value!r}")
    return value


def from_hf_config(config: dict[str, Any], name: str, source: str) -> ModelArch:
    """Translate a Hugging Face LLaMA-like config dict; ``source`` names it in errors."""
    model_type = config.get("model_type")
    if model_type not in _LLAMA_LIKE_TYPES:
        raise ArchError(
            f"{source}: field 'model_type'={model_type!r} is not LLaMA-like (supported: {sorted(_LLAMA_LIKE_TYPES)})"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ArchError(f"{source}: field 'hidden_act'={act!r} is unsupported (LLaMA blocks use 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ArchError(f"{source}: field '{flag}'=true is unsupported (LLaMA blocks have no biases)")
    hidden = _require_int(config, "hidden_size", source)
    heads = _require_int(config, "num_attention_heads", source)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (hidden // heads if hidden % heads == 0 else None)
    if head_dim is None:
        raise ArchError(f"{source}: field 'head_dim' is required when hidden_size={hidden} is not a multiple of heads={heads}")
    arch = ModelArch(
        name=name,
        hidden_size=hidden,
        num_layers=_require_int(config, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_size=_require_int(config, "intermediate_size", source),
        vocab_size=_require_int(config, "vocab_size", source),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        max_position=int(config.get("max_position_embeddings", 4096)),
    )
    try:
        arch.check()
    except ArchError as exc:
        raise ArchError(str(exc).replace(f"{name}:", f"{source}:", 1)) from None
    return arch


def resolve_arch(name_or_path: str) -> ModelArch:
    """A built-in name, a path to a config.json, or a folder holding one."""
    if name_or_path in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ArchError(
            f"unknown model {name_or_path!r}: use one of {sorted(BUILTIN_ARCHS)} or a path to a LLaMA-like config.json"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArchError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise ArchError(f"{path}: a config.json must hold a JSON object")
    stem = path.parent.name if path.name == "config.json" else path.stem
    return from_hf_config(config, name=_slug(stem or "custom"), source=str(path))


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() or c in ".-" else "-" for c in text)
    return "-".join(part for part in out.split("-") if part) or "custom"
