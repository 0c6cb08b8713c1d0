import json

from amoeba_profile.arch import BUILTIN_ARCHS, resolve_arch
from amoeba_profile.export import export_subnet
from amoeba_profile.subnet import LayerShape, Subnet

TINY = BUILTIN_ARCHS["tinyllama-1.1b"]


def test_uniform_export_round_trip(tmp_path):
    subnet = Subnet.uniform(TINY, 18, 0.75)
    paths = export_subnet(subnet, tmp_path, "float16")
    assert [p.name for p in paths] == ["subnet.json", "config.json", "amoeballm_flags.txt"]
    assert Subnet.from_json((tmp_path / "subnet.json").read_text()) == subnet
    arch = resolve_arch(str(tmp_path / "config.json"))
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.ffn_size) == (18, 24, 3, 4224)
    assert arch.head_dim == TINY.head_dim and arch.vocab_size == TINY.vocab_size
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["amoeba_kept_layers"] == subnet.kept_indices and config["amoeba_subnet_id"] == subnet.id
    assert (tmp_path / "amoeballm_flags.txt").read_text().strip() == "--eval_num_layer 18 --eval_num_width 0.75"


def test_per_layer_export_writes_blocks(tmp_path):
    subnet = Subnet(TINY, (LayerShape(0, 32, 4, 5632), LayerShape(7, 16, 2, 3000)))
    names = [p.name for p in export_subnet(subnet, tmp_path, "float32")]
    assert names == ["subnet.json", "blocks.json"]
    blocks = json.loads((tmp_path / "blocks.json").read_text())["blocks"]
    assert blocks[1] == {"source_layer": 7, "num_attention_heads": 16, "num_key_value_heads": 2, "intermediate_size": 3000}
    assert Subnet.from_json((tmp_path / "subnet.json").read_text()) == subnet
