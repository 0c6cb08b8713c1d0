"""The GGUF writer of the llama.cpp backend, read back with gguf-py's own reader (no llama.cpp needed)."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (extra 'llama-cpp') writes the model files")

from amoeba_profile.backends.llama_cpp import gguf as writer

from amoeba_profile.core.dtypes import BYTES_PER_ELEMENT
from amoeba_profile.core.errors import AmoebaError, UnsupportedShape
from amoeba_profile.core.subnet import LayerShape, Subnet
from amoeba_profile.selection.memory import weight_params

PER_LAYER = ((8, 4, 128), (4, 2, 64), (8, 4, 96), (6, 3, 128))


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _tensors(reader) -> dict:
    """name -> (ggml type name, llama.cpp ne)"""
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}


def test_uniform_layers_are_written_as_llama_with_scalar_widths(tiny_arch, tmp_path):
    path = tmp_path / "m.gguf"
    size = writer.write_gguf(path, tiny_arch, ((8, 4, 128),) * 4, "f16")
    reader = gguf.GGUFReader(path)
    fields = _fields(reader)
    assert size == path.stat().st_size
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert fields["llama.block_count"] == 4 and fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128
    assert fields["llama.attention.head_count"] == 8 and fields["llama.attention.head_count_kv"] == 4
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 8
    assert fields["llama.vocab_size"] == 256 and fields["tokenizer.ggml.model"] == "none"
    tensors = _tensors(reader)
    assert len(tensors) == 3 + 9 * 4
    assert tensors["token_embd.weight"] == ("F16", [64, 256])
    assert tensors["output.weight"] == ("F16", [64, 256])
    assert tensors["blk.3.attn_norm.weight"] == ("F32", [64])
    assert not list(tmp_path.glob(".*tmp")), "no temporary file is left behind"


def test_per_layer_widths_are_written_as_deci_arrays_with_per_layer_tensors(tiny_arch, tmp_path):
    path = tmp_path / "m.gguf"
    writer.write_gguf(path, tiny_arch, PER_LAYER, "f16")
    reader = gguf.GGUFReader(path)
    fields = _fields(reader)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 4
    assert fields["deci.attention.head_count"] == [8, 4, 8, 6]
    assert fields["deci.attention.head_count_kv"] == [4, 2, 4, 3]
    assert fields["deci.feed_forward_length"] == [128, 64, 96, 128]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 8
    tensors = _tensors(reader)
    for i, (heads, kv, ffn) in enumerate(PER_LAYER):
        assert tensors[f"blk.{i}.attn_q.weight"][1] == [64, heads * 8]
        assert tensors[f"blk.{i}.attn_k.weight"][1] == [64, kv * 8]
        assert tensors[f"blk.{i}.attn_v.weight"][1] == [64, kv * 8]
        assert tensors[f"blk.{i}.attn_output.weight"][1] == [heads * 8, 64]
        assert tensors[f"blk.{i}.ffn_gate.weight"][1] == tensors[f"blk.{i}.ffn_up.weight"][1] == [64, ffn]
        assert tensors[f"blk.{i}.ffn_down.weight"][1] == [ffn, 64]


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0"])
def test_quantized_files_hold_valid_blocks_and_f32_norms(tiny_arch, tmp_path, weight_type):
    layers = ((8, 4, 128), (4, 2, 64), (8, 4, 96), (8, 4, 128))  # every row a whole number of 32-value blocks
    path = tmp_path / "m.gguf"
    writer.write_gguf(path, tiny_arch, layers, weight_type)
    reader = gguf.GGUFReader(path)
    qtype = writer.ggml_type(weight_type)
    assert _fields(reader)["general.file_type"] == int(writer.file_type(weight_type))
    by_name = {t.name: t for t in reader.tensors}
    down = by_name["blk.1.ffn_down.weight"]
    assert down.tensor_type == qtype and [int(x) for x in down.shape] == [64, 64]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    assert down.data.nbytes == 64 * 64 // block * block_bytes
    values = gguf.quants.dequantize(down.data, qtype)
    assert values.shape == (64, 64) and np.isfinite(values).all() and 0 < np.abs(values).max() <= 0.03
    assert by_name["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_q4_0_refuses_rows_that_are_not_whole_blocks(tiny_arch, tmp_path):
    with pytest.raises(UnsupportedShape, match="attn_output.*not whole q4_0 blocks of 32"):
        writer.write_gguf(tmp_path / "m.gguf", tiny_arch, ((6, 3, 128),) * 2, "q4_0")
    assert not list(tmp_path.iterdir())


def test_tied_embeddings_write_no_output_projection(tiny_arch, tmp_path):
    from dataclasses import replace

    path = tmp_path / "m.gguf"
    writer.write_gguf(path, replace(tiny_arch, tie_embeddings=True), ((8, 4, 128),), "f16")
    assert "output.weight" not in _tensors(gguf.GGUFReader(path))


@pytest.mark.parametrize(
    "layers, reason",
    [
        (((8, 4, 0),), "ffn 0 with attention .* drop that layer's attention output"),
        (((8, 0, 128),), "not a LLaMA layer"),
        (((0, 0, 128),), "not a LLaMA layer"),
        (((8, 3, 128),), "does not divide"),
        ((), "block_count > 0"),
    ],
)
def test_shapes_llama_cpp_would_misread_are_refused(tiny_arch, tmp_path, layers, reason):
    with pytest.raises(UnsupportedShape, match=reason):
        writer.write_gguf(tmp_path / "m.gguf", tiny_arch, layers, "f16")
    assert not list(tmp_path.iterdir())


def test_a_full_disk_is_refused_before_writing(tiny_arch, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(AmoebaError, match="GiB free"):
        writer.write_gguf(tmp_path / "m.gguf", tiny_arch, ((8, 4, 128),), "f16")
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_neither_file_nor_temp(tiny_arch, tmp_path, monkeypatch):
    def broken(self, spec):
        raise OSError("disk went away")

    monkeypatch.setattr(writer._Pools, "tensor", broken)
    with pytest.raises(OSError, match="disk went away"):
        writer.write_gguf(tmp_path / "m.gguf", tiny_arch, ((8, 4, 128),), "f16")
    assert not list(tmp_path.iterdir())


def test_size_bound_covers_the_written_file(tiny_arch, tmp_path):
    path = tmp_path / "m.gguf"
    size = writer.write_gguf(path, tiny_arch, PER_LAYER, "f16")
    data = sum(t.nbytes for t in writer.tensor_specs(tiny_arch, PER_LAYER, "f16"))
    assert data < size <= writer.file_bytes(tiny_arch, PER_LAYER, "f16")


def test_element_sizes_and_parameter_count_match_the_files_tensors(tiny_arch):
    """dtypes' block sizes are gguf's, and the file holds exactly the parameters the estimates count."""
    for weight_type in writer.WEIGHT_TYPES:
        block, size = gguf.GGML_QUANT_SIZES[writer.ggml_type(weight_type)]
        assert BYTES_PER_ELEMENT[weight_type] == size / block
    subnet = Subnet(tiny_arch, tuple(LayerShape(i, *shape) for i, shape in enumerate(PER_LAYER)))
    specs = writer.tensor_specs(tiny_arch, PER_LAYER, "q8_0")
    assert sum(int(np.prod(t.shape)) for t in specs) == weight_params(subnet)
