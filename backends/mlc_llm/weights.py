"""Random weights for MLC-LLM's LLaMA model, written as its tensor cache with numpy alone.

MLC-LLM loads weights from a *tensor cache*: an index JSON beside ``params_shard_<i>.bin`` files
(format from TVM ``python/tvm/contrib/tvmjs.py`` ``dump_tensor_cache`` @5d4dc872, read by
``src/runtime/vm/tensor_cache_support.cc``). The index is ``{"metadata": {...}, "records": [shard,
...]}``; a shard is ``{"dataPath", "format": "raw-shard", "nbytes", "records", "md5sum"}``; a record
is ``{"name", "shape", "dtype", "format", "nbytes", "byteOffset"}``, the tensor's bytes at
``byteOffset`` of its shard. The index was ``ndarray-cache.json`` until TVM renamed NDArray to
Tensor (MLC-LLM #3326, ``cpp/serve/function_table.cc`` reads ``tensor-cache.json`` since then), so
the caller names the file the installed TVM reads.

The loader copies each record's ``nbytes`` from its offset and checks only that a shard file has the
size its entry says; records may overlap. So one shard holds a region of ones (every RMSNorm
weight, so activations stay bounded as in a real model) and one random region as long as the
largest weight, and every other weight is a record over the start of that region: the file is the
size of the embedding table (262 MB for llama2-7b in fp16) instead of the model (13.5 GB), while
MLC still allocates and fills a separate device tensor per parameter. Latency does not depend on
weight values. The random region tiles a small pool, as the other backends' weights do.

Parameter names and shapes are those of ``LlamaForCausalLM`` in MLC-LLM
``python/mlc_llm/model/llama/llama_model.py`` @79d603f0 with no quantization (q0f16, q0bf16,
q0f32: ``NoQuantize`` keeps the names): fused ``qkv_proj`` (query, key, value rows stacked) and
``gate_up_proj`` (gate rows, then up rows), ``nn.Linear`` weights as (out, in), and ``lm_head``
only when the embeddings are not tied. MLC's compiled library names each parameter it expects, and
the engine looks them up by name (``vm.builtin.param_array_from_cache_by_name``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.dtypes import bytes_per_element
from amoeba_profile.core.errors import UsageError

TENSOR_CACHE_INDEX = "tensor-cache.json"
NDARRAY_CACHE_INDEX = "ndarray-cache.json"  # TVM before the NDArray -> Tensor rename
SHARD_FILE = "params_shard_0.bin"
_POOL_VALUES = 1 << 20  # distinct random values tiled over the random region
_CHUNK_VALUES = 1 << 22  # values written per write() call


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    ones: bool  # an RMSNorm weight: filled with 1.0

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def llama_params(arch: ModelArch, layers: tuple[tuple[int, int, int], ...]) -> list[Param]:
    """MLC-LLM's parameters of a LLaMA model with these (heads, kv_heads, ffn) layers, in the order
    its ``LlamaForCausalLM`` registers them."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    params = [Param("model.embed_tokens.weight", (arch.vocab_size, hidden), False)]
    for i, (heads, kv, ffn) in enumerate(layers):
        prefix = f"model.layers.{i}"
        params += [
            Param(f"{prefix}.self_attn.qkv_proj.weight", ((heads + 2 * kv) * head_dim, hidden), False),
            Param(f"{prefix}.self_attn.o_proj.weight", (hidden, heads * head_dim), False),
            Param(f"{prefix}.mlp.gate_up_proj.weight", (2 * ffn, hidden), False),
            Param(f"{prefix}.mlp.down_proj.weight", (hidden, ffn), False),
            Param(f"{prefix}.input_layernorm.weight", (hidden,), True),
            Param(f"{prefix}.post_attention_layernorm.weight", (hidden,), True),
        ]
    params.append(Param("model.norm.weight", (hidden,), True))
    if not arch.tie_embeddings:
        params.append(Param("lm_head.weight", (arch.vocab_size, hidden), False))
    return params


DTYPES = ("float16", "bfloat16", "float32")  # q0f16, q0bf16, q0f32


def _encode(values: np.ndarray, dtype: str) -> bytes:
    """float32 values as the bytes of ``dtype``; bfloat16 is the top half of each float32 (numpy has
    no bfloat16; TVM reads a ``bfloat16`` record's bytes as they are)."""
    if dtype == "bfloat16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return values.astype(dtype).tobytes()


def write_tensor_cache(
    folder: Path, params: list[Param], dtype: str, index_name: str = TENSOR_CACHE_INDEX, seed: int = 0
) -> dict:
    """Write ``params`` in ``dtype`` as one shard plus the index ``index_name`` into ``folder``;
    return the index. Values: ones for norm weights, else uniform in [-0.02, 0.02)."""
    if dtype not in DTYPES:
        raise UsageError(f"MLC-LLM weights are written in {list(DTYPES)}, not {dtype!r}")
    itemsize = int(bytes_per_element(dtype))
    ones_values = max((p.numel for p in params if p.ones), default=0)
    random_values = max((p.numel for p in params if not p.ones), default=0)
    ones_bytes, shard_bytes = ones_values * itemsize, (ones_values + random_values) * itemsize
    pool = np.random.default_rng(seed).uniform(-0.02, 0.02, _POOL_VALUES).astype(np.float32)
    # A whole number of pools (or the whole region), so consecutive chunks keep tiling the pool.
    chunk = _encode(np.resize(pool, min(_CHUNK_VALUES, random_values)), dtype)
    md5 = hashlib.md5()
    with open(folder / SHARD_FILE, "wb") as shard:
        data = _encode(np.ones(ones_values, np.float32), dtype)
        shard.write(data)
        md5.update(data)
        left = random_values * itemsize
        while left > 0:
            data = chunk[:left]
            shard.write(data)
            md5.update(data)
            left -= len(data)
    records = [
        {
            "name": p.name,
            "shape": list(p.shape),
            "dtype": dtype,
            "format": "raw",
            "nbytes": p.numel * itemsize,
            "byteOffset": 0 if p.ones else ones_bytes,
        }
        for p in params
    ]
    total_bytes = sum(p.numel * itemsize for p in params)
    index = {
        # What MLC-LLM's convert_weight stores (interface/convert_weight.py _metadata_callback).
        "metadata": {"ParamSize": len(params), "ParamBytes": float(total_bytes), "BitsPerParam": 8.0 * itemsize},
        "records": [
            {
                "dataPath": SHARD_FILE,
                "format": "raw-shard",
                "nbytes": shard_bytes,
                "records": records,
                "md5sum": md5.hexdigest(),
            }
        ],
    }
    (folder / index_name).write_text(json.dumps(index, indent=1) + "\n")
    return index
