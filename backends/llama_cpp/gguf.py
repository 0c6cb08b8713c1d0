"""Random-weight GGUF files for any subnet, so llama.cpp runs the exact per-layer shapes.

Latency does not depend on weight values, so no checkpoint is read or downloaded: every tensor is
tiled from a small random pool (for quantized types, a pool of real blocks made by
``gguf.quants.quantize``), and the file is streamed tensor by tensor, so memory stays at about
one tensor.

Which GGUF architecture carries the shapes:
- ``llama`` when every layer has the same widths. llama.cpp reads per-layer head and FFN arrays for
  every architecture, but the ``llama`` graph builds every layer with layer 0's widths.
- ``deci`` (the Nemotron-NAS architecture) otherwise: its loader and graph use each layer's
  ``n_head``, ``n_head_kv`` and ``n_ff`` (``src/models/deci.cpp``). With these array-valued keys
  a deci layer is the LLaMA block (RMSNorm, RoPE, GQA, SwiGLU).

Traps of deci that are refused here rather than written: a layer with attention but ``n_ff = 0``
skips the residual add and silently drops that layer's attention output; ``n_head_kv = 0`` with
heads means "linear attention" (a lone output projection); ``n_head = 0`` is an attention-free
layer. None is a LLaMA layer. llama.cpp also asserts ``block_count > 0``, so a model without
decoder layers cannot be written.

Weights are stored like ``llama-quantize --pure``: every 2-D weight (embeddings, output and the
seven projections) in the chosen type, norms in F32. A real Q4_0 file from ``llama-quantize``
keeps ``output.weight`` in Q6_K; that difference is in the base, not in the per-layer cost.
The tokenizer is ``none`` with ``<arch>.vocab_size`` dummy tokens: llama-bench feeds random token
ids and needs no vocabulary (``llama-server`` and ``llama-cli`` refuse such a file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import AmoebaError, UnsupportedShape, UsageError

Layers = tuple[tuple[int, int, int], ...]  # (heads, kv_heads, ffn) per decoder layer, in order

WEIGHT_TYPES = ("f16", "q8_0", "q4_0")
_POOL_BLOCKS = 1 << 14  # distinct random blocks tiled over each tensor (~0.5 M values)
_HEADER_MARGIN = 1 << 20  # metadata, tensor infos and alignment padding, generously


def _gguf():
    import gguf

    return gguf


def ggml_type(weight_type: str):
    gguf = _gguf()
    types = {
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }
    if weight_type not in types:
        raise UsageError(f"unknown llama.cpp weight type {weight_type!r}: use one of {list(WEIGHT_TYPES)}")
    return types[weight_type]


def file_type(weight_type: str) -> int:
    gguf = _gguf()
    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[weight_type]


def gguf_architecture(layers: Layers) -> str:
    """``llama`` for one width everywhere, ``deci`` for per-layer widths (see the module docstring)."""
    return "llama" if len(set(layers)) == 1 else "deci"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file: ``shape`` in numpy order (rows, row length), as gguf-py takes it;
    llama.cpp's ``ne`` is the reverse."""

    name: str
    shape: tuple[int, ...]
    weight_type: str  # f16 | q8_0 | q4_0 | f32

    @property
    def nbytes(self) -> int:
        gguf = _gguf()
        qtype = gguf.GGMLQuantizationType.F32 if self.weight_type == "f32" else ggml_type(self.weight_type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        values = int(np.prod(self.shape))
        return values // block * size


def check_layers(arch: ModelArch, layers: Layers, weight_type: str) -> None:
    """Raise UnsupportedShape when llama.cpp cannot run ``layers`` as LLaMA layers in ``weight_type``."""
    if not layers:
        raise UnsupportedShape("llama.cpp loads no model without decoder layers (it asserts block_count > 0)")
    for index, (heads, kv, ffn) in enumerate(layers):
        if ffn < 1 and heads > 0:
            raise UnsupportedShape(
                f"layer {index}: ffn 0 with attention would make llama.cpp's deci graph skip the "
                "residual and drop that layer's attention output"
            )
        if heads < 1 or kv < 1 or ffn < 1:
            raise UnsupportedShape(
                f"layer {index}: heads={heads}, kv_heads={kv}, ffn={ffn}; deci reads a zero as an "
                "attention-free, linear-attention or FFN-free layer, not a LLaMA layer"
            )
        if heads % kv:
            raise UnsupportedShape(f"layer {index}: kv_heads={kv} does not divide heads={heads}")
    block = _gguf().GGML_QUANT_SIZES[ggml_type(weight_type)][0]
    for spec in tensor_specs(arch, layers, weight_type):
        if spec.weight_type == weight_type and spec.shape[-1] % block:
            raise UnsupportedShape(
                f"{spec.name}: rows of {spec.shape[-1]} values are not whole {weight_type} blocks of {block}; use f16"
            )


def tensor_specs(arch: ModelArch, layers: Layers, weight_type: str) -> list[TensorSpec]:
    """Every tensor llama.cpp's llama/deci loader requires, in file order."""
    hidden, head_dim, vocab = arch.hidden_size, arch.head_dim, arch.vocab_size
    out = [TensorSpec("token_embd.weight", (vocab, hidden), weight_type)]
    for i, (heads, kv, ffn) in enumerate(layers):
        out += [
            TensorSpec(f"blk.{i}.attn_norm.weight", (hidden,), "f32"),
            TensorSpec(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), weight_type),
            TensorSpec(f"blk.{i}.attn_k.weight", (kv * head_dim, hidden), weight_type),
            TensorSpec(f"blk.{i}.attn_v.weight", (kv * head_dim, hidden), weight_type),
            TensorSpec(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim), weight_type),
            TensorSpec(f"blk.{i}.ffn_norm.weight", (hidden,), "f32"),
            TensorSpec(f"blk.{i}.ffn_gate.weight", (ffn, hidden), weight_type),
            TensorSpec(f"blk.{i}.ffn_up.weight", (ffn, hidden), weight_type),
            TensorSpec(f"blk.{i}.ffn_down.weight", (hidden, ffn), weight_type),
        ]
    out.append(TensorSpec("output_norm.weight", (hidden,), "f32"))
    if not arch.tie_embeddings:  # tied: llama.cpp reuses token_embd as the output projection
        out.append(TensorSpec("output.weight", (vocab, hidden), weight_type))
    return out


def file_bytes(arch: ModelArch, layers: Layers, weight_type: str) -> int:
    """An upper bound of the file's size: tensor data (each padded to the 32-byte alignment) plus
    a margin for metadata."""
    return sum(-(-t.nbytes // 32) * 32 for t in tensor_specs(arch, layers, weight_type)) + _HEADER_MARGIN


def _add_metadata(writer, arch: ModelArch, layers: Layers, weight_type: str) -> None:
    uniform = gguf_architecture(layers) == "llama"
    heads, kvs, ffns = ([layer[k] for layer in layers] for k in range(3))
    writer.add_name(f"amoeba-profile random {arch.name}")
    writer.add_file_type(file_type(weight_type))
    writer.add_context_length(arch.max_position)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(ffns[0] if uniform else ffns)
    writer.add_head_count(heads[0] if uniform else heads)
    writer.add_head_count_kv(kvs[0] if uniform else kvs)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_tokenizer_model("none")


class _Pools:
    """Random data to tile tensors from: F16 values, or whole quantized blocks made by gguf-py."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.cache: dict[str, np.ndarray] = {}

    def pool(self, weight_type: str) -> np.ndarray:
        if weight_type not in self.cache:
            gguf = _gguf()
            block = gguf.GGML_QUANT_SIZES[ggml_type(weight_type)][0]
            values = self.rng.uniform(-0.02, 0.02, (_POOL_BLOCKS, block)).astype(np.float32)
            if weight_type == "f16":
                self.cache[weight_type] = values.astype(np.float16).reshape(-1)
            else:
                self.cache[weight_type] = gguf.quants.quantize(values, ggml_type(weight_type)).reshape(-1)
        return self.cache[weight_type]

    def tensor(self, spec: TensorSpec) -> np.ndarray:
        """The tensor's data: norms are ones; weights repeat the pool (whole blocks) to its size."""
        if spec.weight_type == "f32":
            return np.ones(spec.shape, dtype=np.float32)
        pool = self.pool(spec.weight_type)
        count = int(np.prod(spec.shape)) if spec.weight_type == "f16" else spec.nbytes
        return np.resize(pool, count)


def write_gguf(path: Path, arch: ModelArch, layers: Layers, weight_type: str, seed: int = 0) -> int:
    """Write the model for ``layers`` to ``path``; return its size in bytes.

    The file is written under a temporary name beside ``path`` and renamed when complete, so
    ``path`` is either absent or whole; the temporary file is removed on any failure. Refuses (with
    nothing written) when the disk has less room than the file needs.
    """
    gguf = _gguf()
    check_layers(arch, layers, weight_type)
    path = Path(path)
    needed = file_bytes(arch, layers, weight_type)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise AmoebaError(
            f"{path.parent}: {free / 2**30:.2f} GiB free, the {weight_type} GGUF of "
            f"{len(layers)} layers needs {needed / 2**30:.2f} GiB; free space or move --artifacts"
        )
    specs = tensor_specs(arch, layers, weight_type)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(temp_name)
    writer = gguf.GGUFWriter(temp, gguf_architecture(layers))
    try:
        _add_metadata(writer, arch, layers, weight_type)
        for spec in specs:
            raw = None if spec.weight_type in ("f16", "f32") else ggml_type(spec.weight_type)
            dtype = {"f16": np.float16, "f32": np.float32}.get(spec.weight_type, np.float32)
            writer.add_tensor_info(spec.name, spec.shape, np.dtype(dtype), spec.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        pools = _Pools(seed)
        for spec in specs:  # one tensor in memory at a time
            writer.write_tensor_data(pools.tensor(spec))
        writer.close()
        os.replace(temp, path)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise
    return path.stat().st_size
