"""The template of a flow: a pure-Python whole-engine backend that proves the contract without any runtime.

A new flow is one folder (or one pip package, as ``examples/flow-plugin`` packages this file):

1. an adapter class deriving ``amoeba_profile.backends.base.Backend`` with a ``name``, and
   ``availability()`` (an ``Availability`` with the reason and install hint when the library is
   missing: import the library lazily, inside the adapter), ``capabilities()`` (per-layer heads and
   FFN, methods, dtypes, devices), ``versions()``, ``environment()``, ``clock_name``,
   ``check_spec`` / ``compile`` / ``load`` for whole engines (``Engine.ttft`` / ``Engine.tpot``
   return timed workpieces on the flow's own clock), and ``is_out_of_memory``;
2. optionally ``methods.json`` beside the adapter's module: the default measurement method per
   device kind with the evidence (``Backend.default_methods``), and ``verified_on`` once a recorded
   run on hardware exists (until then the listing labels the flow experimental);
3. one entry point in its package's ``pyproject.toml``:
   ``[project.entry-points."amoeba_profile.backends"] my-flow = "my_module:MyBackend"``.

A flow imports only the contract (``amoeba_profile.backends.base``), shared flow utilities
(``amoeba_profile.backends.common``), ``amoeba_profile.core`` and ``amoeba_profile.device``.

This one's latency is deterministic - base(phase, x) + sum of per-layer costs of (heads, ffn,
phase, x), plus an optional interaction when a layer narrows heads and FFN at once - times
multiplicative Gaussian noise: a test double, never a measurement. Like a compiled flow it cannot
time lone components (``difference`` only), compiles an artifact per shape (counted, so tests can
prove engines are not rebuilt) and owns its clock.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amoeba_profile.backends.base import Availability, Backend, Capabilities, Engine, EngineSpec, read_engine_record

from amoeba_profile.core.errors import UnsupportedShape

COMPILES: list[dict[str, Any]] = []


@dataclass(frozen=True)
class FakeConfig:
    device: str = "cpu"
    dtype: str | None = "float16"
    threads: int | None = None
    noise: float = 0.01
    noisy_ffn: int = 0  # models holding a layer with this FFN get 40 % noise (CV re-measure tests)
    interaction_ms: float = 0.0  # extra per layer whose heads and FFN are both narrowed
    device_busy: float | None = None
    version: str = "1.0"
    uniform_only: bool = False
    jit: bool = False  # compile on the first request of an engine, as a JIT flow does in warm-up
    compiles_while_timed: bool = False  # with jit: compile on every request (a recompiling flow)
    load_compile_s: float = 0.0  # seconds each load reports compiling in-process


def layer_ms(heads: int, ffn: int, phase: str, x: int) -> float:
    """The fake flow's true per-layer cost: attention grows with heads and context, MLP with FFN."""
    if phase == "prefill":
        return 0.02 * heads * x / 16 + 0.004 * ffn * x / 16
    return 0.01 * heads * (1 + x / 64) + 0.002 * ffn


def base_ms(phase: str, x: int) -> float:
    return 3.0 + 0.01 * x if phase == "prefill" else 1.5 + 0.001 * x


class _Piece:
    max_steps = 1

    def __init__(self, engine: "FakeEngine", phase: str, x: int):
        self.engine, self.phase, self.x = engine, phase, x

    def sample_ms(self, steps: int) -> float:
        engine = self.engine
        if engine.config.jit and (engine.requests == 0 or engine.config.compiles_while_timed):
            engine.frames += 1
        engine.requests += 1
        return self.engine.true_ms(self.phase, self.x) * max(0.05, self.engine.rng.gauss(1.0, self.engine.noise))


class FakeEngine(Engine):
    def __init__(self, backend: "FakeEngineBackend", spec: EngineSpec):
        self.spec, self.config = spec, backend.config
        self.rng = backend.rng
        self.noise = 0.4 if any(f == self.config.noisy_ffn for _, _, f in spec.layers) else self.config.noise
        self.compile_s = self.config.load_compile_s
        self.requests = self.frames = 0

    def true_ms(self, phase: str, x: int) -> float:
        arch, extra = self.spec.arch, self.config.interaction_ms
        total = base_ms(phase, x)
        for heads, _, ffn in self.spec.layers:
            total += layer_ms(heads, ffn, phase, x)
            if heads < arch.num_heads and ffn < arch.ffn_size:
                total += extra
        return total

    def ttft(self, batch: int, prompt_len: int) -> _Piece:
        return _Piece(self, "prefill", prompt_len)

    def tpot(self, batch: int, context: int, steps: int) -> _Piece:
        return _Piece(self, "decode", context)

    def device_busy(self, piece) -> float | None:
        return self.config.device_busy

    def jit_compiles(self) -> int | None:
        return self.frames if self.config.jit else None


class FakeEngineBackend(Backend):
    name = "fake-engine"

    def __init__(self, **options: Any):
        self.config = FakeConfig(**options)
        self.device, self.dtype = self.config.device, self.config.dtype or "float16"
        self.rng = random.Random(0)

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True, "pure Python")

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(False, False, ("difference",), ("float16",), ("cpu",))

    def versions(self) -> dict[str, str]:
        return {"fakelib": self.config.version}

    def environment(self) -> dict[str, Any]:
        return {**self.versions(), "device": self.device}

    @property
    def clock_name(self) -> str:
        return "fake-engine-timer"

    def device_arch(self) -> str:
        return "fake-arch"

    def check_spec(self, spec: EngineSpec) -> None:
        if self.config.uniform_only and len(set(spec.layers)) > 1:
            raise UnsupportedShape("fake-engine builds one width for all layers")

    def compile(self, spec: EngineSpec, dest: Path) -> None:
        COMPILES.append(spec.to_dict())
        (dest / "engine.json").write_text(json.dumps({"spec": spec.to_dict()}))

    def load(self, spec: EngineSpec, artifact: Path) -> FakeEngine:
        assert read_engine_record(artifact)["spec"] == spec.to_dict()  # read as every flow reads its record
        return FakeEngine(self, spec)
