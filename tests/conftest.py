"""Shared fixtures: tiny architectures (hidden 64-128, 4 layers) so the suite runs on 2 cores.

The suite must pass, in about the same time, on a machine that something else keeps busy. So it
pins one intra-op thread here and in every CLI subprocess (torch's default of one per core
oversubscribes as soon as another process runs: the suite took 911 s instead of 114 s), lets CLI
builds measure at once instead of waiting for a quiet CPU (AMOEBA_BUSY=warn), and keeps its
measurement locks to itself, so a real build elsewhere on the machine never blocks a test.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Before numpy and torch are imported anywhere: OpenMP and OpenBLAS read it once, and CLI
# subprocesses inherit it. Compiled engines of every test (and of CLI subprocesses) go to a
# scratch cache, not ~/.cache.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["AMOEBA_BUSY"] = "warn"
os.environ["AMOEBA_LOCK_DIR"] = tempfile.mkdtemp(prefix="amoeba-locks-")
os.environ.setdefault("AMOEBA_ARTIFACTS", tempfile.mkdtemp(prefix="amoeba-artifacts-"))

import pytest
import torch

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.timing import Measurement, TimingProtocol
from amoeba_profile.table.lut import Lut, measured_row, rows_frame

torch.set_num_threads(1)

TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 256,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
}

# Few samples: the tests check the machinery, not the figures (benchmarks/ does that).
FAST_PROTOCOL = TimingProtocol(warmup_min=1, warmup_max=2, rounds=2, samples_per_round=2, min_round_s=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """A test that builds a backend with more threads must not leave them to the tests after it."""
    yield
    torch.set_num_threads(1)


@pytest.fixture
def tiny_arch() -> ModelArch:
    return ModelArch("tiny", 64, 4, 8, 4, 8, 128, 256, max_position=512)


def write_tiny_config(root: Path) -> Path:
    """``<root>/tiny/config.json`` holding TINY_CONFIG (the folder name is the model's name)."""
    folder = root / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder / "config.json"


@pytest.fixture
def tiny_config_path(tmp_path: Path) -> Path:
    return write_tiny_config(tmp_path)


def synthetic_lut(arch: ModelArch, attn, mlp, base, contexts=(16, 64), prompt_len=16, meta=None) -> Lut:
    """A table with known values: attn(heads, phase, context), mlp(ffn, phase), base(phase, context) in ms."""
    rows = []

    def add(entry: Entry, value: float) -> None:
        rows.append(
            measured_row(
                entry, Measurement.from_samples([value, value, value]), "ok", method="components", repeat=1, wall_s=0.0
            )
        )

    heads_set = sorted({h for h in range(arch.group_size, arch.num_heads + 1, arch.group_size)})
    for heads in heads_set:
        kv = heads // arch.group_size
        add(Entry("attn", "prefill", 1, prompt_len, 0, heads, kv), attn(heads, "prefill", 0))
        for c in contexts:
            add(Entry("attn", "decode", 1, 1, c, heads, kv), attn(heads, "decode", c))
    for ffn in (arch.ffn_size // 2, arch.ffn_size):
        add(Entry("mlp", "prefill", 1, prompt_len, 0, ffn=ffn), mlp(ffn, "prefill"))
        add(Entry("mlp", "decode", 1, 1, 0, ffn=ffn), mlp(ffn, "decode"))
    add(Entry("base", "prefill", 1, prompt_len, 0), base("prefill", 0))
    for c in contexts:
        add(Entry("base", "decode", 1, 1, c), base("decode", c))
    full_meta = {
        "arch": arch.to_dict(),
        "backend": "pytorch",
        "source": "measured",
        "grid": {"widths": [1.0, 0.5], "batch": 1},
    }
    full_meta.update(meta or {})
    return Lut(rows_frame(rows), full_meta)


@pytest.fixture
def fake_backend(monkeypatch):
    """Registers the pure-Python whole-engine backend (tests/fake_engine.py) as ``fake-engine``."""
    import fake_engine
    from amoeba_profile.backends import REGISTRY

    monkeypatch.setitem(REGISTRY, "fake-engine", "fake_engine:FakeEngineBackend")
    fake_engine.COMPILES.clear()
    return fake_engine


class SimulatedLoad:
    """A ``CpuLoad`` on a simulated clock: other processes keep ``others(t)`` cores busy, this
    process none. Time moves only when it is slept on or read (a read stands for ``step_s`` of
    measuring since the last one), so waits and windows cost no real time."""

    def __init__(self, others=lambda t: 0.0, cores: int = 2, step_s: float = 1.0):
        self.others, self.n, self.step_s = others, cores, step_s
        self.t, self.busy = 0.0, 0.0

    def _advance(self, seconds: float) -> None:
        self.busy += self.others(self.t) * seconds
        self.t += seconds

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self._advance(seconds)

    def cores(self) -> int:
        return self.n

    def read(self) -> dict:
        self._advance(self.step_s)
        return {"t": self.t, "busy_s": self.busy, "own_s": 0.0, "cores": self.n}
