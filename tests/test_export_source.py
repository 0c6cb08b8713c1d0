"""An export describes the model it was cut from: every field of the source config.json that the pick
does not change is carried, and export.json lists every field that differs, and every source field
a written file cannot express. Round trips of Llama-3.2-1B-, Mistral-7B- and TinyLlama-style
configs (tiny sizes, their real special fields); the build says which fields its latency tables do
not represent."""

import json
import sys

import pytest

from amoeba_profile.cli import main as cli
from amoeba_profile.core.arch import BUILTIN_ARCHS, load_model, unrepresented_fields
from amoeba_profile.core.export import export_subnet
from amoeba_profile.core.subnet import LayerShape, Subnet
from amoeba_profile.table.lut import load_one

SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 8,
    "num_hidden_layers": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "initializer_range": 0.02,
    "use_cache": True,
    "hidden_act": "silu",
}
LLAMA_32 = {
    **SIZES,
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "head_dim": 8,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "tie_word_embeddings": True,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 128,
        "rope_type": "llama3",
    },
}
MISTRAL = {
    **SIZES,
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "num_key_value_heads": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
    "rope_theta": 10000.0,
    "sliding_window": 64,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
}
TINYLLAMA = {
    **SIZES,
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_key_value_heads": 4,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pretraining_tp": 1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
    "vocab_size": 32000,
}
STYLES = {"llama-3.2-1b": LLAMA_32, "mistral-7b": MISTRAL, "tinyllama": TINYLLAMA}
# What any export of a pruned shape changes on purpose (export.json names each with why).
SHAPE_FIELDS = {
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "torch_dtype",
    "amoeba_kept_layers",
    "amoeba_base_model",
    "amoeba_subnet_id",
}


def _write(tmp_path, name, config):
    path = tmp_path / name / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(config))
    return path


def _equal_but_listed(source: dict, exported: dict, changes: list[dict]) -> set[str]:
    """Check that ``exported`` is ``source`` except the fields ``changes`` lists, each listed with
    its true before and after; returns the listed fields."""
    listed = {c["field"]: c for c in changes}
    for field in set(source) | set(exported):
        if field in listed:
            change = listed[field]
            assert exported[field] == change["exported"], field
            assert (source[field] == change["source"]) if "source" in change else field not in source, field
            assert change["why"], field
        else:
            assert field in source and field in exported and source[field] == exported[field], field
    return set(listed)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_uniform_export_is_the_source_config_except_the_listed_changes(tmp_path, style):
    from transformers import AutoConfig

    source = STYLES[style]
    path = _write(tmp_path, style, source)
    arch, config = load_model(str(path))
    assert config == source
    subnet = Subnet.uniform(arch, 3, 0.5)  # 4 of 8 heads: a plain LLaMA / Mistral config
    report = export_subnet(subnet, tmp_path / "out", "float32", config)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    listing = json.loads((tmp_path / "out" / "export.json").read_text())
    assert listing == report.to_dict() and listing["subnet_id"] == subnet.id
    assert listing["config_source"].startswith("the config.json the table was built from")
    expected = SHAPE_FIELDS | ({"head_dim"} if "head_dim" not in source else set())
    assert _equal_but_listed(source, exported, listing["config_changes"]) == expected
    assert report.adjustments == () and report.not_expressed == ()
    for field in (
        "rope_scaling",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "sliding_window",
        "model_type",
        "architectures",
    ):
        assert exported.get(field, "absent") == source.get(field, "absent"), field
    # transformers reads both as the same model but for the listed fields (dtype is torch_dtype's name there)
    loaded = AutoConfig.from_pretrained(path.parent).to_dict()
    again = AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    renamed = {"dtype" if f == "torch_dtype" else f for f in expected} | {"_name_or_path"}
    differ = {f for f in set(loaded) | set(again) if loaded.get(f, "absent") != again.get(f, "absent")}
    assert differ <= renamed and {"num_hidden_layers", "num_attention_heads", "dtype"} <= differ
    assert (
        type(AutoConfig.from_pretrained(tmp_path / "out")).__name__
        == type(AutoConfig.from_pretrained(path.parent)).__name__
    )


def test_mlc_chat_config_carries_token_ids_and_rope_scaling_or_is_skipped_for_a_window(tmp_path):
    arch, config = load_model(str(_write(tmp_path, "llama-3.2-1b", LLAMA_32)))
    export_subnet(Subnet.uniform(arch, 3, 0.5), tmp_path / "llama", "float16", config)
    chat = json.loads((tmp_path / "llama" / "mlc-chat-config.json").read_text())
    assert (chat["bos_token_id"], chat["eos_token_id"]) == (128000, 128001)
    assert chat["conv_template"]["system_prefix_token_ids"] == [128000]
    assert chat["conv_template"]["stop_token_ids"] == [128001]
    assert chat["model_config"]["rope_scaling"] == LLAMA_32["rope_scaling"]
    arch, config = load_model(str(_write(tmp_path, "mistral-7b", MISTRAL)))
    report = export_subnet(Subnet.uniform(arch, 3, 0.5), tmp_path / "mistral", "float16", config)
    assert not (tmp_path / "mistral" / "mlc-chat-config.json").exists()
    assert [f.name for f in report.files] == ["subnet.json", "config.json", "amoeballm_flags.txt", "export.json"]
    assert report.skipped == (
        "mlc-chat-config.json: the source's sliding_window=64 (MLC-LLM's llama model has no "
        "sliding window; generate one with mlc_llm gen_config for a model type that has)",
    )


@pytest.mark.parametrize("style", ["llama-3.2-1b", "mistral-7b"])
def test_per_layer_export_carries_the_source_into_the_deci_form(tmp_path, style):
    source = STYLES[style]
    arch, config = load_model(str(_write(tmp_path, style, source)))
    kv = arch.num_kv_heads
    subnet = Subnet(arch, tuple(LayerShape(i, 8, kv, ffn) for i, ffn in ((0, 128), (1, 64), (3, 96))))
    report = export_subnet(subnet, tmp_path / "out", "bfloat16", config)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["model_type"] == "nemotron-nas" and len(exported["block_configs"]) == 3
    listed = _equal_but_listed(source, exported, [c.to_dict() for c in report.config_changes])
    form = {
        "architectures",
        "model_type",
        "auto_map",
        "block_configs",
        "intermediate_size",
        "num_key_value_heads",
        "num_hidden_layers",
        "amoeba_kept_layers",
        "amoeba_base_model",
        "amoeba_subnet_id",
    }
    defaults = {"rope_scaling", "attention_bias", "mlp_bias", "pretraining_tp"} - set(
        source
    )  # DeciLM readers read them
    assert listed == form | defaults | ({"head_dim"} if "head_dim" not in source else set())
    assert exported["bos_token_id"] == source["bos_token_id"] and exported.get("rope_scaling") == source.get(
        "rope_scaling"
    )
    if "sliding_window" in source:
        assert exported["sliding_window"] == 64
        assert report.not_expressed[0].startswith(
            "sliding_window=64: the DeciLM / Nemotron-NAS form sets attention windows per block"
        )
    else:
        assert report.not_expressed == ()


def test_builtin_and_unrecorded_sources(tmp_path, tiny_arch):
    """A built-in model exports its own config (llama3-8b's special tokens, not LLaMA-2's); a table
    that recorded no config says which fields are defaults, and a config of another model is refused."""
    from amoeba_profile.core.errors import LutError

    llama3 = BUILTIN_ARCHS["llama3-8b"]
    report = export_subnet(Subnet.uniform(llama3, 24, 1.0), tmp_path / "l3", "float16")
    exported = json.loads((tmp_path / "l3" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (128000, 128001)
    assert report.config_source == "the built-in model llama3-8b" and report.adjustments == ()
    report = export_subnet(Subnet.uniform(tiny_arch, 3, 1.0), tmp_path / "tiny", "float32")
    assert report.adjustments[0].startswith("the table records no source config.json")
    with pytest.raises(LutError, match="describes another model"):
        export_subnet(Subnet.uniform(tiny_arch, 3, 1.0), tmp_path / "x", "float32", {**TINYLLAMA, "vocab_size": 512})


def test_unrepresented_fields_are_named():
    assert unrepresented_fields(LLAMA_32) == ["rope_scaling=llama3 (timed with plain RoPE)"]
    assert unrepresented_fields(MISTRAL) == [
        "sliding_window=64 (decode is timed attending to the whole context; the "
        "window attends to fewer tokens beyond it)"
    ]
    assert unrepresented_fields(TINYLLAMA) == []
    assert unrepresented_fields({**TINYLLAMA, "pretraining_tp": 2, "quantization_config": {"bits": 4}}) == [
        "pretraining_tp=2",
        "quantization_config",
    ]


def run_main(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["amoeba-profile", *args])
    monkeypatch.setitem(cli._state, "debug", False)
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_build_warns_records_the_source_and_select_exports_it(tmp_path, monkeypatch, capsys):
    """build-lut names the fields its table does not represent, in one line, and keeps the config in
    the sidecar; select --export on that table writes the Mistral config with its window."""
    path = _write(tmp_path, "mistral-7b", MISTRAL)
    out = tmp_path / "lut"
    code, stdout, err = run_main(
        monkeypatch,
        capsys,
        "build-lut",
        "--predict",
        "--device",
        "rtx-a5000",
        "--backend",
        "tensorrt-llm",
        "--model",
        str(path),
        "--out",
        str(out),
        "--prompt-len",
        "16",
        "--contexts",
        "16,64",
    )
    assert code == 0, err
    assert err.splitlines()[0] == (
        f"warning: {path}: the latency model does not represent sliding_window=64 (decode "
        "is timed attending to the whole context; the window attends to fewer tokens "
        "beyond it) (kept in the table's sidecar: select --export carries them)"
    )
    table = load_one(out)
    assert table.meta.source_config == MISTRAL
    code, stdout, err = run_main(
        monkeypatch,
        capsys,
        "select",
        "--lut",
        str(out),
        "--budget-ms",
        "1000",
        "--prompt-len",
        "16",
        "--gen-len",
        "20",
        "--export",
        str(tmp_path / "pick"),
    )
    assert code == 0, err
    exported = json.loads((tmp_path / "pick" / "config.json").read_text())
    assert (exported["model_type"], exported["sliding_window"], exported["architectures"]) == (
        "mistral",
        64,
        ["MistralForCausalLM"],
    )
    assert "note: config.json differs from the config.json the table was built from" in err
    tiny = _write(tmp_path, "tinyllama", TINYLLAMA)
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "build-lut",
        "--predict",
        "--device",
        "rtx-a5000",
        "--backend",
        "tensorrt-llm",
        "--model",
        str(tiny),
        "--out",
        str(tmp_path / "lut2"),
        "--prompt-len",
        "16",
        "--contexts",
        "16,64",
    )
    assert code == 0 and "does not represent" not in err
