"""Bytes per element of every dtype a table can be built in: the one definition that the memory
estimate, the roofline and the backends' size estimates use.

Float types are named as torch names them (``float16``, with ``fp16``-style aliases); llama.cpp's
GGUF weight types keep their own names (``f16``, ``q8_0``, ``q4_0``), since a table's dtype is what
its flow ran. A block-quantized type stores 32 values in one block: q8_0 as 32 int8 + an f16 scale
(34 bytes), q4_0 as 32 nibbles + an f16 scale (18 bytes), so an element takes a fraction of a byte
over whole blocks. llama.cpp quantizes weights only: its KV cache stays f16 (llama-bench's
``-ctk``/``-ctv`` default) and it computes activations in f32, where torch keeps all three in the
one dtype.
"""

from __future__ import annotations

from amoeba_profile.core.errors import UsageError

BYTES_PER_ELEMENT: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "f32": 4,
    "f16": 2,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
}
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_GGUF = ("f32", "f16", "q8_0", "q4_0")
_GGUF_KV_CACHE, _GGUF_ACTIVATIONS = "f16", "f32"


def canonical_dtype(dtype: str) -> str:
    """'FP16' -> 'float16': the one spelling tables and backends store. It does not check the name:
    each backend says which dtypes it runs, and ``bytes_per_element`` refuses an unknown one."""
    name = str(dtype).strip().lower()
    return ALIASES.get(name, name)


def _known(dtype: str) -> str:
    name = canonical_dtype(dtype)
    if name not in BYTES_PER_ELEMENT:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(BYTES_PER_ELEMENT)}")
    return name


def bytes_per_element(dtype: str) -> float:
    """Bytes one weight element takes in ``dtype`` (fractional for block-quantized types)."""
    return BYTES_PER_ELEMENT[_known(dtype)]


def kv_cache_bytes_per_element(dtype: str) -> float:
    """Bytes one KV-cache element takes when the weights are in ``dtype``."""
    name = _known(dtype)
    return BYTES_PER_ELEMENT[_GGUF_KV_CACHE if name in _GGUF else name]


def activation_bytes_per_element(dtype: str) -> float:
    """Bytes one activation element takes when the weights are in ``dtype``."""
    name = _known(dtype)
    return BYTES_PER_ELEMENT[_GGUF_ACTIVATIONS if name in _GGUF else name]
