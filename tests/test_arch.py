import json

import pytest

from amoeba_profile.core.arch import (
    BUILTIN_ARCHS,
    ModelArch,
    attn_params,
    from_hf_config,
    layer_params,
    mlp_params,
    non_layer_params,
    resolve_arch,
)
from amoeba_profile.core.errors import ArchError

MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
}


def test_builtins_are_consistent():
    assert {"llama2-7b", "vicuna-7b", "llama2-13b", "llama3-8b", "tinyllama-1.1b"} <= set(BUILTIN_ARCHS)
    for arch in BUILTIN_ARCHS.values():
        arch.check()
    assert BUILTIN_ARCHS["llama3-8b"].group_size == 4
    assert BUILTIN_ARCHS["tinyllama-1.1b"].group_size == 8
    assert BUILTIN_ARCHS["llama2-7b"].head_dim * 32 == 4096


def test_foreign_mistral_gqa_config(tmp_path):
    folder = tmp_path / "Mistral-7B-v0.1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B))
    arch = resolve_arch(str(folder))
    assert arch.name == "mistral-7b-v0.1"
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.ffn_size) == (32, 8, 128, 14336)
    assert arch.group_size == 4


def test_head_dim_needed_when_heads_do_not_divide_hidden():
    config = dict(MISTRAL_7B, num_attention_heads=24, num_key_value_heads=8)
    with pytest.raises(ArchError, match="head_dim"):
        from_hf_config(config, "x", "cfg.json")
    arch = from_hf_config(dict(config, head_dim=128), "x", "cfg.json")
    assert arch.num_heads * arch.head_dim == 3072


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ArchError, match=field) as info:
        from_hf_config(dict(MISTRAL_7B, **change), "x", "my/config.json")
    assert "my/config.json" in str(info.value)


def test_missing_field_is_named():
    config = dict(MISTRAL_7B)
    del config["intermediate_size"]
    with pytest.raises(ArchError, match="missing field 'intermediate_size'"):
        from_hf_config(config, "x", "c.json")


def test_unknown_name_and_unreadable_file(tmp_path):
    with pytest.raises(ArchError, match="unknown model 'llama9'"):
        resolve_arch("llama9")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ArchError, match="not a readable JSON"):
        resolve_arch(str(bad))


def test_round_trip_dict():
    arch = BUILTIN_ARCHS["llama3-8b"]
    assert ModelArch.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rms_norm_eps": "1e-5"}, "field 'rms_norm_eps' must be a finite number, got '1e-5'"),
        ({"rope_theta": "10000"}, "field 'rope_theta' must be a finite number"),
        ({"rope_theta": float("nan")}, "field 'rope_theta' must be a finite number, got nan"),
        ({"rms_norm_eps": 0}, "field 'rms_norm_eps' must be a positive number"),
        ({"max_position_embeddings": "4096"}, "field 'max_position_embeddings' must be a positive integer"),
        ({"num_key_value_heads": 0}, "field 'num_key_value_heads' must be a positive integer, got 0"),
        ({"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' must be true or false, got 'false'"),
        ({"head_dim": 7, "num_attention_heads": 32}, "field 'head_dim'=7 must be even"),
        (
            {"hidden_size": 4000, "num_attention_heads": 32, "num_key_value_heads": 8},
            r"field 'head_dim'=125 \(hidden_size 4000 / num_attention_heads 32\) must be even",
        ),
        ({"hidden_size": 10**40}, "field 'hidden_size'=10000000000000000000000000000000000000000 is above the maximum"),
        ({"intermediate_size": 1.5}, "field 'intermediate_size' must be a positive integer, got 1.5"),
        ({"num_hidden_layers": True}, "field 'num_hidden_layers' must be a positive integer, got True"),
        ({"mlp_bias": "false"}, "field 'mlp_bias' must be true or false"),
    ],
)
def test_every_field_is_typed_and_named(change, message):
    with pytest.raises(ArchError, match=message) as info:
        from_hf_config(dict(MISTRAL_7B, **change), "x", "my/config.json")
    assert str(info.value).startswith("my/config.json: ") and "\n" not in str(info.value)


def test_absent_or_null_fields_take_defaults():
    config = dict(MISTRAL_7B, num_key_value_heads=None, head_dim=None)
    del config["tie_word_embeddings"], config["rope_theta"]
    arch = from_hf_config(config, "x", "c.json")
    assert (arch.num_kv_heads, arch.head_dim, arch.tie_embeddings, arch.rope_theta) == (32, 128, False, 10000.0)


def test_nan_in_config_file_and_stored_arch_are_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MISTRAL_7B).replace('"rope_theta": 10000.0', '"rope_theta": NaN'))
    with pytest.raises(ArchError, match=f"{path}: field 'rope_theta' must be a finite number, got nan"):
        resolve_arch(str(path))
    stored = dict(BUILTIN_ARCHS["llama3-8b"].to_dict(), rms_norm_eps=float("inf"))
    with pytest.raises(ArchError, match="field 'rms_norm_eps' must be a finite number"):
        ModelArch.from_dict(stored)
    with pytest.raises(ArchError, match=r"unknown fields \['extra'\], missing \['vocab_size'\]"):
        ModelArch.from_dict({**{k: v for k, v in stored.items() if k != "vocab_size"}, "extra": 1})
    with pytest.raises(ArchError, match="must be a mapping"):
        ModelArch.from_dict("llama3-8b")


def test_parameter_counts_of_llama2_7b_by_hand():
    arch = BUILTIN_ARCHS["llama2-7b"]
    assert attn_params(arch, 32, 32) == 4 * 4096 * 4096 and mlp_params(arch, 11008) == 3 * 4096 * 11008
    assert layer_params(arch, 32, 32, 11008) == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert non_layer_params(arch) == 2 * 32000 * 4096 + 4096
    assert 32 * layer_params(arch, 32, 32, 11008) + non_layer_params(arch) == 6_738_415_616  # Llama-2-7b-hf
    assert attn_params(BUILTIN_ARCHS["tinyllama-1.1b"], 32, 4) == 2048 * (32 + 4 + 4 + 32) * 64  # GQA: q, k, v, o
