"""Exports load in the tools they are for: transformers for the plain LLaMA form, a mirror of
TensorRT-LLM's Nemotron-NAS reader for the DeciLM form, a mirror of MLC-LLM's config reader."""

import json

import pytest

from amoeba_profile.core.arch import BUILTIN_ARCHS, ModelArch, resolve_arch
from amoeba_profile.core.errors import UnsupportedShape
from amoeba_profile.core.export import export_subnet, llama_config
from amoeba_profile.core.subnet import LayerShape, Subnet

TINY = BUILTIN_ARCHS["tinyllama-1.1b"]
LLAMA2 = BUILTIN_ARCHS["llama2-7b"]

# The fields of a Nemotron-NAS checkpoint's block_config.py AttentionConfig / FFNConfig (the
# llama4 / mamba extensions aside); BlockConfig drops any other field with a warning.
_ATTENTION_FIELDS = {
    "no_op",
    "replace_with_linear",
    "sparsify",
    "n_heads_in_group",
    "window_length",
    "num_sink_tokens",
    "use_prefill_window_in_sink_attention",
    "unshifted_sink",
}
_FFN_FIELDS = {"no_op", "replace_with_linear", "sparsify", "ffn_mult"}


def trtllm_nemotron_nas_layers(config: dict) -> list[tuple[int, int, int, int]]:
    """(query heads, kv heads, head_dim, FFN width) per layer, as TensorRT-LLM reads a Nemotron-NAS config.

    Mirrors the field accesses of TensorRT-LLM (version.py 1.0.0rc4 in the snapshot read):
    - models/nemotron_nas/config.py @42a7b092, DeciConfig.from_hugging_face: model_type must be
      "deci" or "nemotron-nas"; reads hidden_size, hidden_act, intermediate_size,
      num_attention_heads, num_hidden_layers, num_key_value_heads, rms_norm_eps, rope_scaling,
      rope_theta, vocab_size, max_position_embeddings, block_configs;
    - models/nemotron_nas/convert.py @2a9abd95, hf_block_config_to_layer_config: per block
      attention["no_op"], ["replace_with_linear"], .get("sparsify"), ["n_heads_in_group"] and
      ffn["no_op"], ["replace_with_linear"], .get("sparsify"), ["ffn_mult"]; FFN width is
      _ffn_mult_to_intermediate_size: int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256;
    - _torch/models/modeling_nemotron_nas.py @0193dbd4: kv heads = num_attention_heads // n_heads_in_group,
      query heads = num_attention_heads for every layer;
    - _torch/modules/attention.py @00547a25: head_dim = config.head_dim when it is an int, else
      hidden_size // num_attention_heads.
    The HF side (block_config.py of Nemotron-NAS checkpoints): no_op and replace_with_linear are
    exclusive, an active attention needs n_heads_in_group, an active FFN needs ffn_mult (rounded to
    6 decimals), and configuration_decilm.py asserts len(block_configs) == num_hidden_layers.
    """
    assert config["model_type"] in ("deci", "nemotron-nas")
    assert config["architectures"] == ["DeciLMForCausalLM"]
    for field in (
        "hidden_act",
        "intermediate_size",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_scaling",
        "rope_theta",
        "vocab_size",
        "max_position_embeddings",
    ):
        assert field in config, field
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config["head_dim"] if isinstance(config.get("head_dim"), int) else hidden // heads
    blocks = config["block_configs"]
    assert len(blocks) == config["num_hidden_layers"]
    layers = []
    for block in blocks:
        attn, ffn = block["attention"], block["ffn"]
        assert set(attn) <= _ATTENTION_FIELDS and set(ffn) <= _FFN_FIELDS
        for sub in (attn, ffn):
            assert not (sub["no_op"] or sub["replace_with_linear"] or sub.get("sparsify"))
        group = attn["n_heads_in_group"]
        assert isinstance(group, int) and group > 0 and heads % group == 0
        mult = round(ffn["ffn_mult"], 6)
        width = int(2 * mult * hidden / 3)
        width += -width % 256
        layers.append((heads, heads // group, head_dim, width))
    return layers


def mlc_llama_shape(chat_config: dict) -> tuple[int, int, int, int, int]:
    """(layers, heads, kv heads, head_dim, ffn) as MLC-LLM reads mlc-chat-config.json.

    Mirrors mlc-llm @01ced331: protocol/mlc_chat_config.py MLCChatConfig's required fields and
    conv_template (protocol/conversation_protocol.py: roles, seps of 1 or 2), and
    model/llama/llama_model.py LlamaConfig.__post_init__ (context_window_size, head_dim default
    hidden // heads, heads % kv == 0) and LlamaModel (assert hidden_size % num_attention_heads == 0).
    """
    for field in (
        "model_type",
        "quantization",
        "model_config",
        "vocab_size",
        "context_window_size",
        "sliding_window_size",
        "prefill_chunk_size",
        "attention_sink_size",
        "tensor_parallel_shards",
        "conv_template",
    ):
        assert field in chat_config, field
    assert chat_config["model_type"] == "llama" and chat_config["quantization"].startswith("q0")
    template = chat_config["conv_template"]
    assert isinstance(template["roles"], dict) and 1 <= len(template["seps"]) <= 2
    model = chat_config["model_config"]
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "rms_norm_eps",
        "vocab_size",
    ):
        assert field in model, field
    heads = model["num_attention_heads"]
    kv = model.get("num_key_value_heads") or heads
    head_dim = model.get("head_dim") or model["hidden_size"] // heads
    assert model["context_window_size"] > 0 and heads % kv == 0
    assert model["hidden_size"] % heads == 0
    return model["num_hidden_layers"], heads, kv, head_dim, model["intermediate_size"]


def hf_layer_shapes(folder) -> tuple[int, list[tuple[int, int, int, int]]]:
    """(layers, per-layer (q_out, k_out, o_in, ffn)) of the model transformers builds from config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = [
        (
            l.self_attn.q_proj.out_features,
            l.self_attn.k_proj.out_features,
            l.self_attn.o_proj.in_features,
            l.mlp.gate_proj.out_features,
        )
        for l in model.model.layers
    ]
    return config.num_hidden_layers, shapes


def files(report):
    return [f.name for f in report.files]


@pytest.mark.parametrize("width, heads, kv, ffn", [(1.0, 32, 4, 5632), (7 / 8, 32, 4, 4928)])
def test_uniform_pick_loads_in_transformers_and_mlc(tmp_path, width, heads, kv, ffn):
    subnet = Subnet.uniform(TINY, 18, width)
    assert (subnet.layers[0].heads, subnet.layers[0].ffn) == (heads, ffn)
    report = export_subnet(subnet, tmp_path, "float16")
    assert files(report) == ["subnet.json", "config.json", "mlc-chat-config.json", "amoeballm_flags.txt", "export.json"]
    assert report.files[1].form == "llama" and report.adjustments == () and report.skipped == ()
    layers, shapes = hf_layer_shapes(tmp_path)
    assert layers == 18 and set(shapes) == {(heads * 64, kv * 64, heads * 64, ffn)}
    chat = json.loads((tmp_path / "mlc-chat-config.json").read_text())
    assert mlc_llama_shape(chat) == (18, heads, kv, 64, ffn) and chat["quantization"] == "q0f16"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["amoeba_kept_layers"] == subnet.kept_indices and config["head_dim"] == 64
    arch = resolve_arch(str(tmp_path / "config.json"))
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.ffn_size) == (18, heads, kv, ffn)
    assert Subnet.from_json((tmp_path / "subnet.json").read_text()) == subnet
    assert (tmp_path / "amoeballm_flags.txt").read_text().strip() == f"--eval_num_layer 18 --eval_num_width {width:g}"
    assert json.loads((tmp_path / "export.json").read_text()) == report.to_dict()
    assert report.folder == tmp_path and all((tmp_path / name).is_file() for name in files(report))


def test_explicit_head_dim_makes_16_heads_load(tmp_path):
    """16 heads divide 2048 with quotient 128, not TinyLlama's 64: head_dim must be written."""
    subnet = Subnet(TINY, tuple(LayerShape(i, 16, 2, 2816) for i in range(4)))
    export_subnet(subnet, tmp_path, "float32")
    _, shapes = hf_layer_shapes(tmp_path)
    assert set(shapes) == {(16 * 64, 2 * 64, 16 * 64, 2816)}


@pytest.mark.parametrize("width, rounded_ffn", [(3 / 4, 4352), (5 / 8, 3584)])
def test_24_head_picks_export_as_nemotron_nas(tmp_path, width, rounded_ffn):
    subnet = Subnet.uniform(TINY, 18, width)
    layer = subnet.layers[0]
    assert (layer.heads, layer.kv_heads) == (24, 3)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(llama_config(subnet, "float16")))
    with pytest.raises(Exception, match=r"hidden size \(2048\) is not a multiple of the number of attention heads"):
        hf_layer_shapes(tmp_path / "llama")  # why the plain form is not written
    report = export_subnet(subnet, tmp_path / "out", "float16")
    assert files(report) == [
        "subnet.json",
        "config.json",
        "configuration_decilm.py",
        "amoeballm_flags.txt",
        "export.json",
    ]
    assert report.files[1].form == "nemotron-nas"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert trtllm_nemotron_nas_layers(config) == [(24, 3, 64, rounded_ffn)] * 18
    assert [a for a in report.adjustments if "FFN" in a] == [
        f"layer {i}: FFN {layer.ffn} written as {rounded_ffn} (ffn_mult {config['block_configs'][0]['ffn']['ffn_mult']:g}; "
        "the readers round FFN widths up to a multiple of 256)"
        for i in subnet.kept_indices
    ]
    assert any("PyTorch flow only" in a for a in report.adjustments)
    assert any(s.startswith("mlc-chat-config.json: 24 query heads do not divide") for s in report.skipped)


def test_per_layer_pick_exports_block_configs(tmp_path):
    layers = (
        LayerShape(0, 32, 4, 5632),
        LayerShape(3, 32, 4, 4096),
        LayerShape(7, 32, 4, 3000),
        LayerShape(21, 32, 4, 5632),
    )
    subnet = Subnet(TINY, layers)
    report = export_subnet(subnet, tmp_path, "bfloat16")
    assert files(report) == ["subnet.json", "config.json", "configuration_decilm.py", "export.json"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert trtllm_nemotron_nas_layers(config) == [
        (32, 4, 64, 5632),
        (32, 4, 64, 4096),
        (32, 4, 64, 3072),
        (32, 4, 64, 5632),
    ]
    assert config["amoeba_kept_layers"] == [0, 3, 7, 21]
    assert report.adjustments == (
        "layer 7: FFN 3000 written as 3072 (ffn_mult 2.25; the readers round FFN widths up to a multiple of 256)",
    )
    assert (
        report.skipped[0] == "plain LLaMA config.json: widths differ per layer (transformers' LlamaConfig refuses it)"
    )
    assert Subnet.from_json((tmp_path / "subnet.json").read_text()) == subnet


@pytest.mark.parametrize("width, heads", [(7 / 8, 28), (3 / 4, 24), (5 / 8, 20)])
def test_llama2_narrow_widths_export_as_nemotron_nas(tmp_path, width, heads):
    subnet = Subnet.uniform(LLAMA2, 24, width)
    report = export_subnet(subnet, tmp_path, "float16")
    assert report.files[1].form == "nemotron-nas"
    config = json.loads((tmp_path / "config.json").read_text())
    layers = trtllm_nemotron_nas_layers(config)
    assert {(h, kv, d) for h, kv, d, _ in layers} == {(heads, heads, 128)}
    assert {f for *_, f in layers} == {-(-subnet.layers[0].ffn // 256) * 256}


def test_mixed_query_heads_are_refused_before_writing(tmp_path):
    subnet = Subnet(TINY, (LayerShape(0, 32, 4, 5632), LayerShape(7, 16, 2, 3072)))
    with pytest.raises(UnsupportedShape, match="^layer 7 has 16 query heads and layer 0 has 32: "):
        export_subnet(subnet, tmp_path / "out", "float32")
    assert not (tmp_path / "out").exists()


# DeciLM form through transformers itself: AutoConfig.from_pretrained(folder, trust_remote_code=True)
# imports the shipped configuration_decilm.py (auto_map), as TensorRT-LLM's PyTorch flow does. Runs
# on the transformers installed here (the CI's supported 5.x).
DECI_TINY = ModelArch("deci-tiny", 256, 4, 8, 4, 32, 1024, 512, max_position=256)


def _reader_ffn(mult):
    """TensorRT-LLM's _ffn_mult_to_intermediate_size: int(2 * mult * hidden / 3) up to a multiple of 256."""
    width = int(2 * mult * DECI_TINY.hidden_size / 3)
    return width + -width % 256


def _auto_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), trust_remote_code=True)


def _trtllm_view(config):
    """Per layer (kv heads, FFN width, attention no_op, ffn no_op) as modeling_nemotron_nas.py reads the
    loaded config's attributes (kv heads 0 for a block without n_heads_in_group, i.e. a no-op)."""
    heads = config.num_attention_heads
    return [
        (
            heads // b.attention.n_heads_in_group if b.attention.n_heads_in_group else 0,
            None if b.ffn.no_op else _reader_ffn(b.ffn.ffn_mult),
            b.attention.no_op,
            b.ffn.no_op,
        )
        for b in config.block_configs
    ]


@pytest.mark.parametrize(
    "layers, expected",
    [
        # uniform, 6 query heads that do not divide hidden 256: the DeciLM form
        (tuple(LayerShape(i, 6, 3, 768) for i in range(4)), [(3, 768, False, False)] * 4),
        # per-layer FFN (600 is written as 768)
        (
            (LayerShape(0, 8, 4, 1024), LayerShape(1, 8, 4, 512), LayerShape(3, 8, 4, 600)),
            [(4, 1024, False, False), (4, 512, False, False), (4, 768, False, False)],
        ),
    ],
)
def test_deci_exports_load_through_autoconfig(tmp_path, layers, expected):
    subnet = Subnet(DECI_TINY, layers)
    report = export_subnet(subnet, tmp_path, "float16")
    assert report.files[1].form == "nemotron-nas"
    config = _auto_config(tmp_path)
    assert type(config).__name__ == "DeciLMConfig" and config.model_type == "nemotron-nas"
    assert (config.num_attention_heads, config.head_dim, config.hidden_size) == (layers[0].heads, 32, 256)
    assert (config.num_hidden_layers, config.vocab_size, config.max_position_embeddings) == (len(layers), 512, 256)
    assert config.rope_theta == DECI_TINY.rope_theta and config.amoeba_kept_layers == subnet.kept_indices
    assert _trtllm_view(config) == expected
    saved = tmp_path / "saved"  # save_pretrained writes the blocks back as plain dicts; they load again
    config.save_pretrained(saved)
    assert (
        json.loads((saved / "config.json").read_text())["block_configs"]
        == json.loads((tmp_path / "config.json").read_text())["block_configs"]
    )
    assert _trtllm_view(_auto_config(saved)) == expected


def test_deci_config_loads_per_layer_kv_and_no_op_blocks(tmp_path):
    """Per-layer kv heads at one query-head count and no-op attention or FFN blocks, as Nemotron-NAS
    checkpoints write them (a Subnet cannot express them: its GQA groups tie kv to query heads, and
    every layer has both blocks), in the config an export ships: every field TensorRT-LLM reads is
    an attribute, a no-op attention's n_heads_in_group None, a no-op FFN's ffn_mult None."""
    subnet = Subnet(DECI_TINY, tuple(LayerShape(i, 8, 4, 1024 - 256 * (i % 2)) for i in range(4)))
    export_subnet(subnet, tmp_path, "float16")
    config = json.loads((tmp_path / "config.json").read_text())
    blocks = config["block_configs"]
    blocks[1]["attention"]["n_heads_in_group"] = 4  # 2 kv heads here, 4 in the other layers
    blocks[2] = {"attention": {"no_op": True}, "ffn": blocks[2]["ffn"]}
    blocks[3] = {"attention": blocks[3]["attention"], "ffn": {"no_op": True, "replace_with_linear": False}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = _auto_config(tmp_path)
    assert _trtllm_view(loaded) == [
        (4, 1024, False, False),
        (2, 768, False, False),
        (0, 1024, True, False),
        (4, None, False, True),
    ]
    assert loaded.block_configs[2].attention.replace_with_linear is False
    assert loaded.block_configs[3].ffn.ffn_mult is None and loaded.block_configs[2].attention.n_heads_in_group is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["block_configs"][0]["attention"].update(no_op=True, replace_with_linear=True), "exclusive"),
        (lambda c: c["block_configs"][0]["ffn"].pop("ffn_mult"), "an active ffn needs ffn_mult"),
        (lambda c: c["block_configs"].pop(), "3 block_configs for num_hidden_layers=4"),
    ],
)
def test_deci_config_refuses_what_block_config_refuses(tmp_path, edit, message):
    export_subnet(
        Subnet(DECI_TINY, tuple(LayerShape(i, 8, 4, 512 * (1 + i % 2)) for i in range(4))), tmp_path, "float16"
    )
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        _auto_config(tmp_path)
