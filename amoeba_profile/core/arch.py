"""LLaMA-family architectures: the base shapes that subnets are cut from.

Named architectures are data (a dict of name -> ModelArch); any LLaMA-like Hugging Face
``config.json`` is accepted too, and a field we cannot honour is an error that names it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from amoeba_profile.core.errors import ArchError
from amoeba_profile.core.inputs import MIB, positive_float, positive_int, read_bounded

# Sizes are tensor dimensions: torch indexes them with 32-bit-safe arithmetic only below 2^31, and
# far smaller values already fail the build's memory pre-flight.
MAX_SIZE = (1 << 31) - 1
_SIZE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "ffn_size",
    "vocab_size",
    "max_position",
)
_CONFIG_BYTES = 16 * MIB


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
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise ArchError(f"an architecture must be a mapping of {sorted(names)}, got {type(data).__name__}")
        unknown = sorted(set(data) - names)
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in data)
        if unknown or missing:
            raise ArchError(f"architecture {data.get('name', '?')!r}: unknown fields {unknown}, missing {missing}")
        arch = cls(**data)
        arch.check()
        return arch

    def check(self) -> None:
        """Raise ArchError naming the first field that makes this architecture unusable."""
        if not isinstance(self.name, str) or not self.name:
            raise ArchError(f"architecture name must be a non-empty string, got {self.name!r}")
        for field in _SIZE_FIELDS:
            positive_int(getattr(self, field), f"{self.name}: field '{field}'", maximum=MAX_SIZE, error=ArchError)
        if self.num_heads % self.num_kv_heads:
            raise ArchError(
                f"{self.name}: field 'num_key_value_heads'={self.num_kv_heads} does not divide "
                f"num_attention_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ArchError(
                f"{self.name}: field 'head_dim'={self.head_dim} must be even (RoPE rotates pairs of channels)"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ArchError(f"{self.name}: field 'tie_embeddings' must be true or false, got {self.tie_embeddings!r}")
        positive_float(self.rms_norm_eps, f"{self.name}: field 'rms_norm_eps'", error=ArchError)
        positive_float(self.rope_theta, f"{self.name}: field 'rope_theta'", error=ArchError)


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

# What a built-in model's config.json holds beyond ModelArch: its tokenizer's special-token ids
# (LLaMA-2's 1 and 2 unless listed: LLaMA-2, Vicuna and TinyLlama share them).
LLAMA2_TOKEN_IDS = (1, 2)
BUILTIN_TOKEN_IDS: dict[str, tuple[int, int]] = {"llama3-8b": (128000, 128001)}

# config.json fields the latency model uses (sizes) or checks (the block type), and fields that do
# not change what a forward computes (ids, metadata, training-only settings); with the values at
# which the others are inert, everything else is a field the latency model does not represent.
_MODELLED_FIELDS = frozenset(
    {
        "model_type",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
    }
)
_NO_COST_FIELDS = frozenset(
    {
        "architectures",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "initializer_range",
        "use_cache",
        "attention_dropout",
        "_name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "tokenizer_class",
        "auto_map",
    }
)
_INERT_VALUES: dict[str, Any] = {"pretraining_tp": 1, "use_sliding_window": False}
_UNREPRESENTED_WHY = {
    "rope_scaling": "timed with plain RoPE",
    "sliding_window": "decode is timed attending to the whole context; the window attends to fewer tokens beyond it",
}


def unrepresented_fields(config: dict[str, Any]) -> list[str]:
    """The fields of a config.json the latency model does not represent, each with its value and,
    where known, what the tables time instead (``sliding_window=4096 (decode is timed ...)``).

    A field absent, null, false or at its inert value (``pretraining_tp: 1``) is left out."""
    out = []
    for field, value in config.items():
        if (
            field in _MODELLED_FIELDS
            or field in _NO_COST_FIELDS
            or value is None
            or value is False
            or _INERT_VALUES.get(field, object()) == value
        ):
            continue
        shown = value if isinstance(value, (int, float, str)) else None
        if isinstance(value, dict) and isinstance(value.get("rope_type", value.get("type")), str):
            shown = value.get("rope_type", value.get("type"))
        why = _UNREPRESENTED_WHY.get(field)
        out.append(field + (f"={shown}" if shown is not None else "") + (f" ({why})" if why else ""))
    return out


def hf_config(arch: ModelArch) -> dict[str, Any]:
    """A LLaMA config.json for ``arch`` (``from_hf_config`` reads it back to ``arch``), with a
    built-in model's special-token ids, else LLaMA-2's."""
    bos, eos = BUILTIN_TOKEN_IDS.get(arch.name, LLAMA2_TOKEN_IDS)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_size,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "num_hidden_layers": arch.num_layers,
        "vocab_size": arch.vocab_size,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": arch.max_position,
        "tie_word_embeddings": arch.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }


def _int(config: dict[str, Any], field: str, source: str, default: int | None = None) -> int:
    """A positive integer field; absent (or JSON null) means ``default``, or an error without one."""
    value = config.get(field)
    if value is None:
        if default is None:
            raise ArchError(f"{source}: missing field '{field}'")
        return default
    return positive_int(value, f"{source}: field '{field}'", maximum=MAX_SIZE, error=ArchError)


def _float(config: dict[str, Any], field: str, source: str, default: float) -> float:
    value = config.get(field)
    return default if value is None else positive_float(value, f"{source}: field '{field}'", error=ArchError)


def _bool(config: dict[str, Any], field: str, source: str) -> bool:
    """JSON true/false only: the string "false" is truthy and must not silently tie embeddings."""
    value = config.get(field, False)
    if not isinstance(value, bool):
        raise ArchError(f"{source}: field '{field}' must be true or false, got {value!r}")
    return value


def from_hf_config(config: dict[str, Any], name: str, source: str) -> ModelArch:
    """Translate a Hugging Face LLaMA-like config dict; ``source`` names it in errors.

    Every field is checked with the name it has in the file: sizes are positive integers, eps and
    theta positive finite numbers, flags JSON booleans. Only an absent (or null) field takes the
    default - ``num_key_value_heads: 0`` is an error, not multi-head attention."""
    model_type = config.get("model_type")
    if model_type not in _LLAMA_LIKE_TYPES:
        raise ArchError(
            f"{source}: field 'model_type'={model_type!r} is not LLaMA-like (supported: {sorted(_LLAMA_LIKE_TYPES)})"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ArchError(f"{source}: field 'hidden_act'={act!r} is unsupported (LLaMA blocks use 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if _bool(config, flag, source):
            raise ArchError(f"{source}: field '{flag}'=true is unsupported (LLaMA blocks have no biases)")
    hidden = _int(config, "hidden_size", source)
    heads = _int(config, "num_attention_heads", source)
    kv_heads = _int(config, "num_key_value_heads", source, default=heads)
    if config.get("head_dim") is None and hidden % heads:
        raise ArchError(
            f"{source}: field 'head_dim' is required when hidden_size={hidden} is not a multiple of heads={heads}"
        )
    head_dim = _int(config, "head_dim", source, default=hidden // heads)
    if head_dim % 2:
        derived = "" if config.get("head_dim") is not None else f" (hidden_size {hidden} / num_attention_heads {heads})"
        raise ArchError(f"{source}: field 'head_dim'={head_dim}{derived} must be even (RoPE rotates pairs of channels)")
    arch = ModelArch(
        name=name,
        hidden_size=hidden,
        num_layers=_int(config, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_size=_int(config, "intermediate_size", source),
        vocab_size=_int(config, "vocab_size", source),
        tie_embeddings=_bool(config, "tie_word_embeddings", source),
        rms_norm_eps=_float(config, "rms_norm_eps", source, 1e-5),
        rope_theta=_float(config, "rope_theta", source, 10000.0),
        max_position=_int(config, "max_position_embeddings", source, default=4096),
    )
    try:
        arch.check()
    except ArchError as exc:
        raise ArchError(str(exc).replace(f"{name}:", f"{source}:", 1)) from None
    return arch


def resolve_arch(name_or_path: str) -> ModelArch:
    """A built-in name, a path to a config.json, or a folder holding one."""
    return load_model(name_or_path)[0]


def _looks_like_path(text: str) -> bool:
    """Whether a --model value that names nothing was meant as a file (so the answer is "no such
    file", not "unknown model")."""
    return "/" in text or os.sep in text or text.endswith(".json") or text.startswith(".")


def load_model(name_or_path: str) -> tuple[ModelArch, dict[str, Any] | None]:
    """The architecture of a built-in name, a config.json or a folder holding one, and the config's
    fields as read (None for a built-in name): a table records them so that an export can carry
    every field the latency model does not use (rope scaling, special tokens, sliding window)."""
    if name_or_path in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[name_or_path], None
    known = f"a model is one of {sorted(BUILTIN_ARCHS)} or a path to a LLaMA-like config.json"
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise ArchError(f"{path.parent}: the folder holds no config.json ({known})")
    elif not path.exists() and not path.is_symlink():
        if _looks_like_path(name_or_path):
            raise ArchError(f"{name_or_path}: the file does not exist ({known})")
        raise ArchError(
            f"unknown model {name_or_path!r}: use one of {sorted(BUILTIN_ARCHS)} or a path to a LLaMA-like config.json"
        )
    raw = read_bounded(path, _CONFIG_BYTES, "model config", error=ArchError)
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ArchError(f"{path}: not a readable JSON config ({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise ArchError(f"{path}: a config.json must hold a JSON object")
    stem = path.parent.name if path.name == "config.json" else path.stem
    return from_hf_config(config, name=_slug(stem or "custom"), source=str(path)), config


_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def renamed(arch: ModelArch, name: str) -> ModelArch:
    """``arch`` under ``name`` (build-lut ``--name``): two configs in folders of the same name would
    otherwise share one table path. The name becomes the table's file name, so it is one word of
    letters, digits, '.', '_' and '-'."""
    if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name):
        raise ArchError(
            f"--name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (it names the table's file)"
        )
    return replace(arch, name=name)


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() or c in ".-" else "-" for c in text)
    return "-".join(part for part in out.split("-") if part) or "custom"
