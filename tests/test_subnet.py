import pytest
from hypothesis import given
from hypothesis import strategies as st

from amoeba_profile.core.arch import BUILTIN_ARCHS
from amoeba_profile.core.errors import UnsupportedShape, UsageError
from amoeba_profile.core.subnet import (
    DesignSpace,
    LayerShape,
    Subnet,
    default_depths,
    kept_layers,
    parse_ratio,
    width_shape,
)

LLAMA2 = BUILTIN_ARCHS["llama2-7b"]
TINY = BUILTIN_ARCHS["tinyllama-1.1b"]
LLAMA3 = BUILTIN_ARCHS["llama3-8b"]


def test_amoeba_grid_for_32_layers_and_scaled():
    assert default_depths(LLAMA2) == list(range(20, 33))
    assert default_depths(TINY) == list(range(14, 23))  # 22 * 20/32 = 13.75 -> 14
    space = DesignSpace.amoeba(LLAMA2)
    assert len(list(space.subnets())) == 13 * 4


def test_width_shapes_mha():
    assert width_shape(LLAMA2, 1.0) == (32, 32, 11008)
    assert width_shape(LLAMA2, 7 / 8) == (28, 28, 9632)
    assert width_shape(LLAMA2, 5 / 8) == (20, 20, 6880)
    assert width_shape(LLAMA2, 5 / 8, ffn_multiple=64) == (20, 20, 6912)


def test_width_shapes_prune_whole_gqa_groups():
    # TinyLlama: 4 kv groups of 8 query heads; ratios round to whole groups (ties keep more).
    assert width_shape(TINY, 7 / 8) == (32, 4, 4928)
    assert width_shape(TINY, 3 / 4) == (24, 3, 4224)
    assert width_shape(TINY, 5 / 8) == (24, 3, 3520)
    heads, kv, _ = width_shape(LLAMA3, 5 / 8)
    assert (heads, kv) == (20, 5) and heads // kv == LLAMA3.group_size


def test_drop_rules():
    assert kept_layers(LLAMA2, 20) == list(range(19)) + [31]
    assert kept_layers(LLAMA2, 32) == list(range(32))
    uniform = kept_layers(LLAMA2, 20, "uniform")
    assert len(uniform) == 20 and uniform[0] == 0 and uniform[-1] == 31
    with pytest.raises(UsageError, match="drop rule"):
        kept_layers(LLAMA2, 20, "random")
    with pytest.raises(UnsupportedShape):
        kept_layers(LLAMA2, 33)


def test_per_layer_subnet_validation():
    ok = Subnet(TINY, (LayerShape(0, 32, 4, 5632), LayerShape(5, 16, 2, 1000)))
    assert not ok.is_uniform and ok.kept_indices == [0, 5]
    with pytest.raises(UnsupportedShape, match="whole GQA groups"):
        Subnet(TINY, (LayerShape(0, 30, 4, 5632),))
    with pytest.raises(UnsupportedShape, match="increase"):
        Subnet(TINY, (LayerShape(3, 32, 4, 5632), LayerShape(3, 32, 4, 5632)))
    with pytest.raises(UnsupportedShape, match="ffn"):
        Subnet(TINY, (LayerShape(0, 32, 4, 9999),))


def test_id_is_stable_and_shape_sensitive():
    a = Subnet.uniform(LLAMA2, 24, 0.75)
    assert a.id == Subnet.uniform(LLAMA2, 24, 0.75).id
    assert a.id != Subnet.uniform(LLAMA2, 24, 0.875).id
    assert a.id != Subnet.uniform(LLAMA2, 24, 0.75, drop_rule="uniform").id
    assert a.id != Subnet.uniform(BUILTIN_ARCHS["vicuna-7b"], 24, 0.75).id  # base arch is part of identity


@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5632)), min_size=1, max_size=22).map(
        lambda shapes: tuple(LayerShape(i, kv * 8, kv, ffn) for i, (kv, ffn) in enumerate(shapes))
    )
)
def test_json_round_trip(layers):
    subnet = Subnet(TINY, layers)
    again = Subnet.from_json(subnet.to_json())
    assert again == subnet and again.id == subnet.id


def test_json_errors():
    with pytest.raises(UsageError, match="does not parse"):
        Subnet.from_json("{")
    data = Subnet.uniform(TINY, 20, 1.0).to_dict()
    data["id"] = "000000000000"
    with pytest.raises(UsageError, match="does not match"):
        Subnet.from_dict(data)


def test_parse_ratio():
    assert parse_ratio("7/8") == 0.875 and parse_ratio("0.5") == 0.5
    for bad in ("abc", "0", "9/8", "1/0"):
        with pytest.raises(UsageError):
            parse_ratio(bad)


def test_layer_runs_group_consecutive_layers_of_one_shape(tiny_arch):
    mixed = Subnet(
        tiny_arch,
        (LayerShape(0, 8, 4, 128), LayerShape(1, 8, 4, 128), LayerShape(2, 4, 2, 64), LayerShape(3, 8, 4, 128)),
    )
    assert mixed.layer_runs() == [([0, 1], 8, 4, 128), ([2], 4, 2, 64), ([3], 8, 4, 128)]
    assert Subnet.uniform(tiny_arch, 3, 0.5).layer_runs() == [([0, 1, 3], 4, 2, 64)]
    compact = mixed.to_compact_dict()
    assert "arch" not in compact and compact["id"] == mixed.id and compact["layer_runs"][1]["layers"] == [2]
