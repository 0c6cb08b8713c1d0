"""The contract every deployment flow implements.

A backend declares which measurement methods it supports. Every flow can run whole models through
its own serving loop (``EngineSpec`` -> ``compile`` -> ``load`` -> ``Engine``), which is what the
``difference`` method and every truth row use; a flow whose blocks can be timed alone (eager
PyTorch) also offers ``build_component`` for the ``components`` method. Compiling is separate
from loading so an engine is built once per shape and reused across rounds (see
``amoeba_profile.measure.artifacts``). The backend owns its clock: its workpieces return times measured
with it. Backends know nothing of tables or pickers.
"""

from __future__ import annotations

import json
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import ArtifactError, UnsupportedShape
from amoeba_profile.core.inputs import MIB, read_bounded
from amoeba_profile.core.timing import Workpiece
from amoeba_profile.core.workload import Workload

ENGINE_RECORD = "engine.json"
ENGINE_RECORD_BYTES = 4 * MIB  # a spec and a few settings; TensorRT-LLM's lists every rounded layer


def read_engine_record(artifact: Path, name: str = ENGINE_RECORD) -> dict[str, Any]:
    """The JSON record (with its ``spec``) that a backend's ``compile`` wrote into ``artifact``.

    It is read as every input is (``inputs.read_bounded``): a FIFO, a link to /dev/zero or a huge
    file planted in the cache is refused at once, never waited on or read into memory. Anything
    wrong with it is an ``ArtifactError`` that names the file and the cache entry to delete, since
    a plain rerun would read the same file and fail the same way."""
    path = Path(artifact) / name
    advice = f"delete the cached engine {artifact} so that the next run compiles it again"
    try:
        record = json.loads(read_bounded(path, ENGINE_RECORD_BYTES, "cached engine record", error=ArtifactError))
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; {advice}") from None
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(
            f"{path}: not a readable engine record ({' '.join(str(exc).split())[:120]}); {advice}"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise ArtifactError(f"{path}: not an engine record (no 'spec' object); {advice}")
    return record


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str
    install_hint: str = ""


EXPERIMENTAL = "experimental: not yet run on hardware"
RAW_DIR_VAR = "AMOEBA_RAW_DIR"
RAW_RECORDS = 200  # per file: the first run's outputs, not a second copy of every sample
_raw_counts: dict[Path, int] = {}


def save_raw(flow: str, kind: str, record: Any) -> None:
    """Keep one raw output of a flow's library (as it came, JSON-serialisable) in
    ``$AMOEBA_RAW_DIR/<flow>/<kind>.jsonl``, up to ``RAW_RECORDS`` lines per file; nothing when the
    variable is unset. The device scripts set it, so the first run on hardware leaves the library's
    own outputs to replace the test samples that were constructed from its source. Called between
    samples, never inside a timed region."""
    folder = os.environ.get(RAW_DIR_VAR)
    if not folder:
        return
    path = Path(folder) / flow / f"{kind}.jsonl"
    if path not in _raw_counts:
        path.parent.mkdir(parents=True, exist_ok=True)
        _raw_counts[path] = sum(1 for _ in path.open()) if path.is_file() else 0
    if _raw_counts[path] >= RAW_RECORDS:
        return
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
    _raw_counts[path] += 1


@dataclass(frozen=True)
class Maturity:
    """Whether a flow's adapter has a recorded run on real hardware. ``label`` is what the flow
    listing prints: ``verified on <devices>`` or ``EXPERIMENTAL``; ``note`` says why."""

    verified: bool
    label: str
    note: str


@dataclass(frozen=True)
class ToolResult:
    """What a flow's own benchmark tool measured for one full model and workload (``crosscheck``).

    ``command``: the command line it ran (or, for an in-process tool, the calls it made);
    ``definitions``: how the tool's numbers relate to ``ttft_ms``/``tpot_ms`` of ``workload.py``;
    ``raw``: the tool's own output as it printed or wrote it, kept beside the agreement."""

    tool: str
    command: tuple[str, ...]
    ttft_ms: float
    tpot_ms: float
    definitions: str
    raw: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "command": list(self.command),
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "definitions": self.definitions,
            "raw": self.raw,
        }


@dataclass(frozen=True)
class Capabilities:
    per_layer_heads: bool
    per_layer_ffn: bool
    methods: tuple[str, ...]
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]


@dataclass(frozen=True)
class EngineSpec:
    """What one engine is compiled for: the layer shapes (heads, kv_heads, ffn) in order, the
    largest batch, the longest prompt and the longest sequence it must serve. Layer indices do not
    matter for latency, so they are not part of the spec (nor of the artifact's key)."""

    arch: ModelArch
    layers: tuple[tuple[int, int, int], ...]
    max_batch: int
    max_input_len: int
    max_seq_len: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch.to_dict(),
            "layers": [list(x) for x in self.layers],
            "max_batch": self.max_batch,
            "max_input_len": self.max_input_len,
            "max_seq_len": self.max_seq_len,
        }


class Engine(ABC):
    """A loaded model behind the flow's own serving loop (greedy, fixed output length, no early stop).

    The metrics follow ``amoeba_profile.core.workload``: ttft is a request for one new token; tpot at
    context c is (e2e(1 + n) - e2e(1)) / n for a request whose prompt KV of about c - n/2 tokens is
    already cached, so the n timed decode steps are centred on c.
    """

    # Seconds ``load`` spent compiling this engine in-process: a JIT flow (torch.compile) keeps its
    # compiled code in the process, not in the artifact, so a fresh process compiles at load time.
    # 0.0 for a reused engine or an ahead-of-time flow; the build adds it to the row's compile_s.
    compile_s: float = 0.0

    @abstractmethod
    def ttft(self, batch: int, prompt_len: int) -> Workpiece: ...

    @abstractmethod
    def tpot(self, batch: int, context: int, steps: int) -> Workpiece: ...

    def device_busy(self, piece: Workpiece) -> float | None:
        """Fraction of one sample's wall time the accelerator was executing kernels; None where the
        host is the device (CPU) or the flow cannot tell. Below ~0.5 the flow is host-bound."""
        return None

    def jit_compiles(self) -> int | None:
        """A running count of frames the flow's JIT compiler has compiled in this process; None for a
        flow that compiles ahead of time. The build reads it after warm-up and after the timed
        samples: a change means compile work was timed, and the row is flagged ``recompiled``."""
        return None

    def close(self) -> None:
        """Free what the engine holds."""


class BuiltUnit(ABC):
    """Blocks built once for a group of component entries that share them (see ``Entry.unit``).

    One workpiece step runs ``repeat`` copies of the component; the timing is divided by it.
    """

    repeat: int = 1

    @abstractmethod
    def workpiece(self, entry: Entry) -> Workpiece: ...

    def close(self) -> None:
        """Free what the unit holds; the default drops nothing."""


class Backend(ABC):
    """One deployment flow. ``config`` is a frozen dataclass stored in the table's sidecar; the
    backend is rebuilt from it (``type(backend)(**config)``) to validate or extend a table."""

    name: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    config: Any = None
    # Devices a recorded run of this adapter exists on (a shipped table, recorded tool output or its
    # test suite measuring in CI). Empty: the adapter was written against its library's source and
    # has never run, and ``experimental_reason`` says so; the flow listing labels it EXPERIMENTAL
    # until a recorded run exists (then the adapter names the device here).
    verified_on: tuple[str, ...] = ()
    experimental_reason: str = "no recorded run of this adapter on hardware"

    @classmethod
    def maturity(cls) -> Maturity:
        """The adapter's own declaration, read by ``amoeba-profile backends`` and the README's table."""
        if cls.verified_on:
            return Maturity(True, f"verified on {', '.join(cls.verified_on)}", "")
        return Maturity(False, EXPERIMENTAL, cls.experimental_reason)

    @classmethod
    def default_methods(cls) -> dict[str, dict[str, str]]:
        """Device kind (``cpu``, ``cuda``) -> ``{"method", "evidence"}``: the measurement method
        validated for this flow there and the evidence, from ``methods.json`` beside the adapter's
        module (``defaults[<flow name>]``); empty when the flow declares none, and a build then
        uses the fallback (``measure.methods``). A plugin ships its evidence the same way."""
        return dict(cls._declared("methods.json", "defaults") or {})

    @classmethod
    def _declared(cls, file: str, section: str) -> dict[str, Any] | None:
        """This flow's entry in ``section`` of the JSON ``file`` beside the adapter's module."""
        path = Path(sys.modules[cls.__module__].__file__ or "").with_name(file)
        if not path.is_file():
            return None
        declared = json.loads(read_bounded(path, MIB, file)).get(section, {}).get(cls.name)
        return dict(declared) if declared is not None else None

    @classmethod
    def roofline_profile(cls) -> dict[str, Any] | None:
        """The flow's roofline profile for ``build-lut --predict`` (kernels per component, launch
        cost, efficiencies, whether the KV cache is copied), from ``roofline.json`` beside the
        adapter's module (``profiles[<flow name>]``); None when the flow declares none. Like
        ``methods.json``, a plugin ships its own."""
        return cls._declared("roofline.json", "profiles")

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability: ...

    @classmethod
    @abstractmethod
    def capabilities(cls) -> Capabilities: ...

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Library versions a table from this backend depends on (part of the table's identity)."""

    @abstractmethod
    def environment(self) -> dict[str, Any]:
        """Versions and flags a table built with this backend depends on."""

    @property
    @abstractmethod
    def clock_name(self) -> str:
        """Which clock the workpieces use (``perf_counter``, ``cuda-events``, a library's timer)."""

    @abstractmethod
    def device_arch(self) -> str:
        """The device architecture engines are compiled for (``sm_90``, ``x86_64``...)."""

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    @abstractmethod
    def compile(self, spec: EngineSpec, dest: Path) -> None:
        """Build the engine for ``spec`` into the empty folder ``dest`` (random weights, never downloaded)."""

    @abstractmethod
    def load(self, spec: EngineSpec, artifact: Path) -> Engine:
        """Load a compiled engine for serving."""

    def build_component(self, arch: ModelArch, entry: Entry) -> BuiltUnit:
        """Blocks for one ``attn``/``mlp`` entry (``components`` method only)."""
        raise UnsupportedShape(f"backend {self.name!r} cannot time lone components; use --method difference")

    def chain_length(self, arch: ModelArch, component: str, heads: int, kv_heads: int, ffn: int) -> int:
        """How many copies of an ``attn``/``mlp`` block one timed step runs (``components`` method);
        the build's memory pre-flight sizes a component chain by it."""
        return 1

    def check_spec(self, spec: EngineSpec) -> None:
        """Raise UnsupportedShape when the flow cannot express ``spec`` (the reason in the message)."""

    def crosscheck_tool(self, arch: ModelArch, workload: Workload, work_dir: Path, repetitions: int) -> ToolResult:
        """Time the full model of ``arch`` at ``workload`` with the flow's own benchmark tool (a code
        path apart from this adapter's workpieces), ``repetitions`` requests, using the empty folder
        ``work_dir`` for what the tool reads; ``amoeba_profile.measure.crosscheck`` compares it with the table."""
        raise UnsupportedShape(f"backend {self.name!r} has no benchmark tool of its own wired in for a cross-check")

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the device ran out of memory (recorded as an ``oom`` row)."""
        return isinstance(exc, MemoryError)

    def host_cores(self) -> int:
        """CPU cores the measured work keeps busy: other processes' load is judged against these.
        One (the thread that drives an accelerator) unless the flow computes on the CPU itself."""
        return 1
