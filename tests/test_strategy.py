import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from amoeba_profile.core import strategy as strategy_module
from amoeba_profile.core.arch import BUILTIN_ARCHS, ModelArch
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.strategy import Strategy, load_pickled

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
            width[name] = (
                None
                if proj == "down_proj"
                else {np.float64(r): np.arange(128) < 100 - 10 * layer - 20 * i for i, r in enumerate(ratios)}
            )
    data = {
        "strategy": {1: np.array([1, 1, 0, 1]), 2: np.array([1, 0, 0, 1])},
        "width_mask": width,
        "bias": {"model.layers.0.self_attn.o_proj": np.zeros(64)},
    }
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


# --- Memory bombs: tiny files that would make an unbounded loader allocate gigabytes. ----------


class Crafted:
    """Pickles as ``fn(*args)`` followed by BUILD with ``state``: how a hostile file is written."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def ndarray_call_bomb(n=10**9):
    """``numpy.ndarray((n,), object)`` called directly: n pointers, each set to None (8n bytes)."""
    return pickle.dumps({"strategy": Crafted(np.ndarray, ((n,), "O"))}, protocol=3)


def setstate_bomb(n=10**9):
    """NumPy's own array recipe with a state whose shape promises n objects and holds none
    (unguarded, NumPy sizes the array from the shape first: gigabytes, or a crash)."""
    recipe, args, _ = np.array([True]).__reduce__()
    return pickle.dumps(Crafted(recipe, args, (1, (n,), np.dtype(object), False, [])), protocol=3)


def laughs_bomb(depth=9, width=10):
    """Lists nested ``depth`` deep, each holding ``width`` references to the one below: a few
    hundred bytes whose tree has width**depth leaves, which np.asarray would expand."""
    level = [0]
    for _ in range(depth):
        level = [level] * width
    return pickle.dumps({"strategy": {1: level}}, protocol=3)


BOMBS = {  # name: (generator, why it is refused)
    "ndarray-call": (ndarray_call_bomb, "numpy.ndarray may only name the type"),
    "setstate": (setstate_bomb, "an array of 1000000000 elements is over the limit"),
    "laughs": (laughs_bomb, "expands to more than"),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_memory_bombs_are_refused_in_bounded_memory(tmp_path, name):
    path = tmp_path / f"{name}.pkl"
    generator, reason = BOMBS[name]
    path.write_bytes(generator())
    assert path.stat().st_size < 400
    rss_mb, message = load_in_child(path)
    assert message.startswith(f"UsageError: {path}: ") and reason in message, message
    assert rss_mb < 300, f"{name}: peak RSS {rss_mb:.0f} MB"


def load_in_child(path, address_space_gb=4):
    """Load ``path`` with Strategy.load in a child process capped at ``address_space_gb`` (so a
    regression fails fast instead of taking the machine); returns (peak RSS in MB, error line)."""
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({address_space_gb << 30}, {address_space_gb << 30}))\n"
        "from amoeba_profile.core.arch import ModelArch\n"
        "from amoeba_profile.core.strategy import Strategy\n"
        "try:\n"
        "    Strategy.load(sys.argv[1], ModelArch('tiny', 64, 4, 8, 4, 8, 128, 256))\n"
        "    message = 'loaded'\n"
        "except Exception as exc:\n"
        "    message = f'{type(exc).__name__}: {exc}'\n"
        # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the forking
        # pytest process's size; the high-water mark belongs to the new address space.
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n"
        "print(message)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss, message = proc.stdout.strip().split("\n", 1)
    return float(rss), message


def test_devices_fifos_and_oversized_files_are_refused_unread(tmp_path):
    link = tmp_path / "zero.npy"
    link.symlink_to("/dev/zero")
    for path in (Path("/dev/zero"), link):
        with pytest.raises(UsageError, match="not a regular file"):
            load_pickled(path)
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        load_pickled(fifo)  # refused without blocking on the open
    sparse = tmp_path / "huge.npy"
    with open(sparse, "wb") as handle:
        handle.truncate(strategy_module.MAX_FILE_BYTES + 1)
    with pytest.raises(UsageError, match="over the 256 MiB limit"):
        load_pickled(sparse)


def test_cycles_depth_and_opcode_count_are_bounded(tmp_path, monkeypatch):
    cycle = []
    cycle.append(cycle)
    deep = [0]
    for _ in range(strategy_module.MAX_DEPTH + 5):
        deep = [deep]
    cases = {
        "cycle.pkl": (cycle, "reference cycle"),
        "deep.pkl": (deep, "nests more than"),
        "long.pkl": (list(range(5000)), "more than 1000 pickle opcodes"),
    }
    monkeypatch.setattr(strategy_module, "MAX_OPCODES", 1000)
    for name, (value, reason) in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps({"strategy": value}, protocol=3))
        with pytest.raises(UsageError, match=reason):
            load_pickled(tmp_path / name)


def test_array_state_must_match_its_data(tmp_path):
    recipe, args, _ = np.array([True]).__reduce__()
    states = {
        "short": (1, (1000,), np.dtype("b1"), False, b"x"),
        "object-dtype-bytes": (1, (1,), np.dtype(object), False, b"x"),
        "not-a-shape": (1, (-1,), np.dtype("b1"), False, b""),
    }
    for name, state in states.items():
        (tmp_path / name).write_bytes(pickle.dumps(Crafted(recipe, args, state), protocol=3))
        with pytest.raises(UsageError, match="refused|needs|not a tuple of sizes"):
            load_pickled(tmp_path / name)
    (tmp_path / "void").write_bytes(pickle.dumps(np.zeros(2, dtype="V8"), protocol=3))
    with pytest.raises(UsageError, match="not a plain number or object type"):
        load_pickled(tmp_path / "void")
    # A dtype whose state smuggles in a sub-array of 10^5 x 10^5 float64 per element.
    dtype = Crafted(np.dtype, ("f8", False, True), (3, "<", (np.dtype("f8"), (10**5, 10**5)), None, None, -1, -1, 0))
    (tmp_path / "subarray").write_bytes(pickle.dumps(Crafted(recipe, args, (1, (1,), dtype, False, b"")), protocol=3))
    with pytest.raises(UsageError, match="describes more than a plain type"):
        load_pickled(tmp_path / "subarray")
    ok = np.arange(6, dtype="<i4").reshape(2, 3)
    (tmp_path / "ok").write_bytes(pickle.dumps({"a": ok, "s": np.float32(1.5)}, protocol=3))
    loaded = load_pickled(tmp_path / "ok")
    assert (loaded["a"] == ok).all() and loaded["a"].dtype == ok.dtype and loaded["s"] == np.float32(1.5)


def test_structure_errors_name_the_file(tmp_path):
    for name, data, reason in (
        ("notdict", {"strategy": [1, 2]}, "'strategy' dict"),
        ("key", {"strategy": {"x": np.ones(4)}}, "strategy key 'x'"),
        ("ragged", {"strategy": {1: [[1, 1], [1]]}}, r"strategy\[1\] is not a 0/1 array"),
        ("masks", {"strategy": {}, "width_mask": {"model.layers.0.mlp.up_proj": [1]}}, "must map numeric ratios"),
    ):
        np.save(tmp_path / f"{name}.npy", np.array(data, dtype=object), allow_pickle=True)
        with pytest.raises(UsageError, match=reason):
            Strategy.load(tmp_path / f"{name}.npy", ARCH)
