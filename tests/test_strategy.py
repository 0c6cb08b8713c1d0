import os
import pickle

import numpy as np
import pytest

from amoeba_profile.arch import BUILTIN_ARCHS, ModelArch
from amoeba_profile.errors import UsageError
from amoeba_profile.strategy import Strategy, load_pickled

ARCH = ModelArch("tiny", 64, 4, 8, 4, 8, 128, 256)  # 8 heads of 8, 4 kv heads (groups of 2), ffn 128


def heads_mask(kept_heads, n=8, head_dim=8):
    return np.repeat(np.isin(np.arange(n), kept_heads), head_dim)


def write_strategy(path, prefix="model.", ratios=(0.8, 0.65)):
    width = {}
    for layer in range(4):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"{prefix}layers.{layer}.self_attn.{proj}"
            if proj == "o_proj":
                width[name] = None
            elif proj == "q_proj":
                width[name] = {r: heads_mask(range(8 - 2 * (i + 1) + (layer % 2) * 0)) for i, r in enumerate(ratios)}
            else:
                width[name] = {r: heads_mask(range(4 - (i + 1)), n=4) for i, r in enumerate(ratios)}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{prefix}layers.{layer}.mlp.{proj}"
            width[name] = None if proj == "down_proj" else {
                np.float64(r): np.arange(128) < 100 - 10 * layer - 20 * i for i, r in enumerate(ratios)}
    data = {"strategy": {1: np.array([1, 1, 0, 1]), 2: np.array([1, 0, 0, 1])}, "width_mask": width,
            "bias": {"model.layers.0.self_attn.o_proj": np.zeros(64)}}
    np.save(path, data, allow_pickle=True)
    return path


def test_exact_layers_and_per_layer_widths(tmp_path):
    strategy = Strategy.load(write_strategy(tmp_path / "s.npy"), ARCH)
    assert strategy.depths == [2, 3, 4] and strategy.ratios == [0.65, 0.8, 1.0]
    subnet = strategy.subnet(3, 0.8)
    assert subnet.kept_indices == [0, 1, 3] and subnet.width_ratio == 0.8
    assert [(l.heads, l.kv_heads, l.ffn) for l in subnet.layers] == [(6, 3, 100), (6, 3, 90), (6, 3, 70)]
    narrow = strategy.subnet(2, 0.65)
    assert [(l.index, l.heads, l.kv_heads, l.ffn) for l in narrow.layers] == [(0, 4, 2, 80), (3, 4, 2, 50)]
    assert strategy.subnet(4, 1.0).is_uniform  # ratio 1 and key 0 (absent) mean the full model
    assert len(strategy.subnets()) == 9


def test_grid_extent_spans_every_layer_of_every_shape(tmp_path):
    strategy = Strategy.load(write_strategy(tmp_path / "s.npy"), ARCH)
    assert strategy.grid_extent() == (((4, 2), (8, 4)), (50, 128))  # layer 3 at 0.65 keeps 50 FFN channels


def test_peft_prefix_and_ratio_tolerance(tmp_path):
    strategy = Strategy.load(write_strategy(tmp_path / "s.npy", prefix="base_model.model.model."), ARCH)
    assert strategy.subnet(3, 0.8000001).layers[0].ffn == 100
    with pytest.raises(UsageError, match=r"no width ratio 0.7 for layers.0.q_proj; available: 0.65, 0.8"):
        strategy.subnet(3, 0.7)
    with pytest.raises(UsageError, match=r"no layer strategy for 1 layers; available depths \[2, 3, 4\]"):
        strategy.subnet(1, 0.8)


def test_strategy_must_match_the_architecture(tmp_path):
    path = write_strategy(tmp_path / "s.npy")
    with pytest.raises(UsageError, match="covers 4 layers, llama2-7b has 32"):
        Strategy.load(path, BUILTIN_ARCHS["llama2-7b"])
    np.save(tmp_path / "bad.npy", {"strategy": {1: np.array([1, 1, 1, 1])}}, allow_pickle=True)
    with pytest.raises(UsageError, match="keeps 4 layers, expected 3"):
        Strategy.load(tmp_path / "bad.npy", ARCH)
    np.save(tmp_path / "list.npy", np.array([1, 2, 3]))
    with pytest.raises(UsageError, match="expected a dict"):
        Strategy.load(tmp_path / "list.npy", ARCH)


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.target}",)


def test_malicious_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.npy"
    np.save(path, np.array({"strategy": Exploit(target)}, dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match=r"refused to load (posix|nt|os)\.system"):
        load_pickled(path)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"strategy": Exploit(target)}))
    with pytest.raises(UsageError, match="refused to load"):
        Strategy.load(raw, ARCH)
    assert not target.exists()


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UsageError, match="not a readable strategy file"):
        load_pickled(path)
    with pytest.raises(UsageError, match="cannot read"):
        load_pickled(tmp_path / "missing.npy")
