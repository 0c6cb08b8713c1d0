"""llama.cpp on CPU, timed by its own benchmark loop, ``llama-bench``.

The artifact of a shape is a random-weight GGUF file (``llama_cpp_gguf``): ``llama`` for uniform
widths, ``deci`` for per-layer widths. Each workpiece is one llama-bench test, run as a process
(``subprocess.run``, blocking) with ``-o json``; llama-bench times every repetition itself
(``std::chrono::high_resolution_clock`` around the test's ``llama_decode`` calls, after its own
warm-up run) and reports them as ``samples_ns``. One process run makes ``repetitions + 1``
repetitions and drops the first: llama-bench's warm-up is a pp run and a one-token tg at depth 0,
so the first repetition of a tg test at depth d still pays one-time graph and buffer set-up (1.7x
the later ones on the tiny test model). The workpiece hands the other samples out one per
``sample_ms`` call and runs llama-bench again when they are used up, so the warm-up and sampling of
``measure.py`` see llama-bench's own steady-state samples.

How the metrics (``workload.py``) map onto llama-bench's tests, for one sequence:
- ``ttft_ms`` = the pp test, ``-p P -n 0``: P random tokens decoded into an empty cache in
  ``n_batch`` chunks, ending with the logits of the last token, which are the first token's. No
  extra tg step: a tg step would make the second token. llama-bench does not sample (an argmax
  over the vocabulary) nor tokenize; a server's per-request work is not in it either. llama-bench
  clears the cache between repetitions, untimed.
- ``tpot_ms`` at context c with n decode steps = the tg test ``-n n -d D`` divided by n, where
  ``D = c - n // 2 + 1`` random tokens are in the cache first (untimed, computed once per process
  and restored before each repetition). The n single-token decodes then run at positions
  ``c - n // 2 + 1 ... c - n // 2 + n``, the same positions as the decode steps of the
  serving-loop definition ((e2e(1 + n) - e2e(1)) / n over a cached prompt of c - n // 2 tokens).

llama-bench serves one sequence, so a batch above 1 is an unsupported shape (that needs
``llama-batched-bench``). A model without decoder layers cannot be loaded (``block_count > 0``), so
the difference fit goes on without the 0-layer model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..device.cpu import cpu_info
from ..errors import AmoebaError, BackendUnavailable, UnsupportedShape, UsageError
from .base import Availability, Backend, Capabilities, Engine, EngineSpec, read_engine_record
from .llama_cpp_gguf import WEIGHT_TYPES, check_layers, write_gguf

ENV_VAR = "AMOEBA_LLAMA_CPP"
BINARY = "llama-bench"
INSTALL_HINT = (f"pip install 'amoeba-profile[llama-cpp]', run scripts/build-llama-cpp.sh and export the "
                f"{ENV_VAR}=<path to llama-bench> it prints")
DTYPE_ALIASES = {"f16": "f16", "float16": "f16", "fp16": "f16", "q8_0": "q8_0", "q4_0": "q4_0"}
_OOM_MARKERS = ("failed to allocate", "out of memory", "bad_alloc", "unable to allocate")


def find_llama_bench(explicit: str | None = None) -> Path | None:
    """``explicit``, else ``$AMOEBA_LLAMA_CPP``, else ``llama-bench`` on PATH; each may name the
    binary or the folder holding it. None when nothing executable is found."""
    for candidate in (explicit, os.environ.get(ENV_VAR), shutil.which(BINARY)):
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.is_dir():
            path = path / BINARY
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
        if candidate == explicit:
            return None  # an explicit path that is not a binary is not silently replaced
    return None


def default_threads() -> int:
    """The pytorch backend's default (``pytorch.default_threads``): the cores other processes leave
    idle, or ``$OMP_NUM_THREADS``; ggml's threads meet at a barrier after every op as OpenMP's do."""
    from .pytorch import default_threads as shared_default

    return shared_default("cpu")[0]


def parse_version(text: str) -> dict[str, str]:
    """``llama-bench --version`` output (``version: 0.5.0-dev (build 0, commit 0c1e57098)`` then
    ``built with GNU 12.2.0 for Linux x86_64``) -> version, build_number, commit, compiler, target."""
    head = re.search(r"version:\s*(\S+)\s*\(build\s+(\d+),\s*commit\s+(\S+?)\)", text)
    if head is None:
        raise BackendUnavailable(f"unrecognised 'llama-bench --version' output {text.strip()[:120]!r}; {INSTALL_HINT}")
    built = re.search(r"built with (.+?) for (.+)", text)
    return {"version": head.group(1), "build_number": head.group(2), "commit": head.group(3),
            "compiler": built.group(1).strip() if built else "", "target": built.group(2).strip() if built else ""}


@dataclass(frozen=True)
class BenchTest:
    """One test of a llama-bench ``-o json`` report: pp (n_prompt > 0) or tg (n_gen > 0) at a
    KV depth; ``samples_ns`` holds each repetition's time for the whole test."""

    n_prompt: int
    n_gen: int
    n_depth: int
    n_threads: int
    n_batch: int
    n_ubatch: int
    samples_ns: tuple[int, ...]
    avg_ns: int
    build_commit: str
    build_number: int
    cpu_info: str
    backends: str
    model_type: str
    model_size: int  # bytes of the model's tensors, as llama.cpp loaded them
    model_n_params: int

    def samples_ms(self, per: int) -> list[float]:
        """Each repetition in milliseconds, divided by ``per`` (decode steps for a tg test)."""
        return [ns / 1e6 / per for ns in self.samples_ns]


def parse_bench_json(text: str) -> list[BenchTest]:
    """The tests of a llama-bench ``-o json`` report (a JSON list, one object per test)."""
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AmoebaError(f"llama-bench printed no JSON report ({exc}): {text.strip()[:200]!r}") from None
    if not isinstance(report, list):
        raise AmoebaError("llama-bench JSON report is not a list of tests")
    tests = []
    for item in report:
        try:
            tests.append(BenchTest(
                n_prompt=int(item["n_prompt"]), n_gen=int(item["n_gen"]), n_depth=int(item["n_depth"]),
                n_threads=int(item["n_threads"]), n_batch=int(item["n_batch"]), n_ubatch=int(item["n_ubatch"]),
                samples_ns=tuple(int(x) for x in item["samples_ns"]), avg_ns=int(item["avg_ns"]),
                build_commit=str(item["build_commit"]), build_number=int(item["build_number"]),
                cpu_info=str(item.get("cpu_info", "")), backends=str(item.get("backends", "")),
                model_type=str(item.get("model_type", "")), model_size=int(item["model_size"]),
                model_n_params=int(item["model_n_params"]),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise AmoebaError(f"llama-bench JSON test lacks or mangles field {exc}") from None
    return tests


@dataclass(frozen=True)
class LlamaCppConfig:
    """Stored in the table's sidecar; ``LlamaCppBackend(**config)`` rebuilds the same backend.

    ``dtype`` is the GGUF weight type; ``threads``, ``n_batch`` and ``n_ubatch`` are llama-bench's
    ``-t``, ``-b`` and ``-ub``; ``repetitions`` is how many samples one process run yields (it runs
    ``-r repetitions + 1`` and drops the first);
    ``binary`` is the llama-bench that was found (its build is in ``versions``).

    On a shared CPU give it no more threads than idle cores: ggml's threads meet at a barrier after
    every operation, so one descheduled thread stalls all. On the 2-core VM at load ~8, a 2-layer
    TinyLlama-width f16 model decoded (tg4 at depth 125) at 1.2 tokens/s with ``-t 2`` and 23 with
    ``-t 1``."""

    device: str = "cpu"
    dtype: str = "f16"
    threads: int | None = None
    binary: str | None = None
    n_batch: int = 2048
    n_ubatch: int = 512
    repetitions: int = 10


class _BenchPiece:
    """One llama-bench test as a workpiece: each sample is one of llama-bench's repetitions, in ms
    (per decode step for a tg test), the first of each process run dropped. Runs llama-bench again
    when its samples are used up."""

    max_steps = 1  # llama-bench resets the cache between its repetitions; one repetition per sample

    def __init__(self, backend: "LlamaCppBackend", model: Path, prompt: int, gen: int, depth: int):
        self.backend, self.model = backend, model
        self.prompt, self.gen, self.depth = prompt, gen, depth
        self.pending: list[float] = []

    def sample_ms(self, steps: int) -> float:
        del steps  # always 1 (max_steps)
        if not self.pending:
            test = self.backend.run_test(self.model, self.prompt, self.gen, self.depth)
            self.pending = test.samples_ms(self.gen or 1)[1:]
        return self.pending.pop(0)


class LlamaCppEngine(Engine):
    def __init__(self, backend: "LlamaCppBackend", spec: EngineSpec, model: Path):
        self.backend, self.spec, self.model = backend, spec, model

    def ttft(self, batch: int, prompt_len: int) -> _BenchPiece:
        _one_sequence(batch)
        return _BenchPiece(self.backend, self.model, prompt_len, 0, 0)

    def tpot(self, batch: int, context: int, steps: int) -> _BenchPiece:
        _one_sequence(batch)
        return _BenchPiece(self.backend, self.model, 0, steps, tpot_depth(context, steps))


def tpot_depth(context: int, steps: int) -> int:
    """llama-bench ``-d`` whose ``steps`` decodes sit at the positions of the serving-loop window
    centred on ``context`` (a cached prompt of context - steps // 2 tokens, then its last token)."""
    return max(0, context - steps // 2) + 1


def _one_sequence(batch: int) -> None:
    if batch != 1:
        raise UnsupportedShape(f"llama-bench serves one sequence, not a batch of {batch} (that needs llama-batched-bench)")


class LlamaCppBackend(Backend):
    name = "llama.cpp"

    def __init__(self, device: str = "cpu", dtype: str | None = None, threads: int | None = None,
                 binary: str | None = None, n_batch: int = 2048, n_ubatch: int = 512, repetitions: int = 10):
        if device != "cpu":
            raise UsageError(f"the llama.cpp backend runs a CPU build of llama-bench; device {device!r} is not supported")
        weight_type = DTYPE_ALIASES.get((dtype or "f16").lower())
        if weight_type is None:
            raise UsageError(f"unknown llama.cpp weight type {dtype!r}: use one of {list(WEIGHT_TYPES)}")
        for label, value in (("n_batch", n_batch), ("n_ubatch", n_ubatch), ("repetitions", repetitions)):
            if value < 1:
                raise UsageError(f"llama.cpp {label} must be >= 1, got {value}")
        found = find_llama_bench(binary)
        if found is None:
            raise BackendUnavailable(f"no llama-bench at {binary or '$' + ENV_VAR + ' or PATH'}; {INSTALL_HINT}")
        self.config = LlamaCppConfig(device, weight_type, threads or default_threads(), str(found), n_batch, n_ubatch,
                                     repetitions)
        self.device, self.dtype = device, weight_type
        self.build = parse_version(self._run_version(found))

    @staticmethod
    def _run_version(binary: Path) -> str:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BackendUnavailable(f"{binary} --version failed (exit {done.returncode}); a llama-bench without "
                                     f"--version is too old: {INSTALL_HINT}")
        return done.stdout + done.stderr

    @classmethod
    def availability(cls) -> Availability:
        if importlib.util.find_spec("gguf") is None:
            return Availability(False, "the gguf package is not installed (it writes the model files)", INSTALL_HINT)
        binary = find_llama_bench()
        if binary is None:
            return Availability(False, f"no llama-bench in ${ENV_VAR} or on PATH", INSTALL_HINT)
        return Availability(True, f"llama-bench at {binary}; CPU, f16/q8_0/q4_0 GGUF with per-layer widths (deci)")

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(per_layer_heads=True, per_layer_ffn=True, methods=("difference",), dtypes=WEIGHT_TYPES,
                            devices=("cpu",))

    @property
    def clock_name(self) -> str:
        return "llama-bench samples_ns (high_resolution_clock per repetition)"

    def host_cores(self) -> int:
        return self.config.threads

    def versions(self) -> dict[str, str]:
        return {"llama.cpp": self.build["commit"], "llama.cpp_build": self.build["build_number"],
                "gguf": importlib.metadata.version("gguf")}

    def device_arch(self) -> str:
        return platform.machine()

    def environment(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **self.versions(),
            "llama.cpp_version": self.build["version"], "compiler": self.build["compiler"],
            "target": self.build["target"], "binary": cfg.binary, "device": "cpu", "dtype": cfg.dtype,
            "threads": cfg.threads, "n_batch": cfg.n_batch, "n_ubatch": cfg.n_ubatch, "repetitions": cfg.repetitions,
            "cpu_isa": cpu_info()["isa"], "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "serving_loop": "llama-bench: pp test for ttft, tg test at a KV depth for tpot, one sequence",
        }

    def check_spec(self, spec: EngineSpec) -> None:
        _one_sequence(spec.max_batch)
        check_layers(spec.arch, spec.layers, self.dtype)

    def compile(self, spec: EngineSpec, dest: Path) -> None:
        write_gguf(dest / "model.gguf", spec.arch, spec.layers, self.dtype)
        (dest / "engine.json").write_text(json.dumps({"flow": "llama.cpp", "spec": spec.to_dict()}, sort_keys=True))

    def load(self, spec: EngineSpec, artifact: Path) -> Engine:
        stored = read_engine_record(artifact)["spec"]
        if stored != spec.to_dict():
            raise UsageError(f"{artifact}: artifact holds another shape than requested; delete it to recompile")
        return LlamaCppEngine(self, spec, artifact / "model.gguf")

    def command(self, model: Path, prompt: int, gen: int, depth: int) -> list[str]:
        """The llama-bench command line of one test (CPU only: ``-ngl 0``)."""
        cfg = self.config
        return [cfg.binary, "-m", str(model), "-p", str(prompt), "-n", str(gen), "-d", str(depth),
                "-r", str(cfg.repetitions + 1), "-t", str(cfg.threads), "-b", str(cfg.n_batch), "-ub", str(cfg.n_ubatch),
                "-ngl", "0", "-o", "json"]

    def run_test(self, model: Path, prompt: int, gen: int, depth: int) -> BenchTest:
        """Run one llama-bench test to completion (blocking) and return its report."""
        done = subprocess.run(self.command(model, prompt, gen, depth), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise AmoebaError(f"llama-bench exited {done.returncode} on {model.name} (p={prompt}, n={gen}, d={depth}): "
                              f"{tail}")
        tests = parse_bench_json(done.stdout)
        if len(tests) != 1 or (tests[0].n_prompt, tests[0].n_gen, tests[0].n_depth) != (prompt, gen, depth):
            raise AmoebaError(f"llama-bench reported {[(t.n_prompt, t.n_gen, t.n_depth) for t in tests]}, "
                              f"expected one test (p={prompt}, n={gen}, d={depth})")
        if tests[0].build_commit != self.build["commit"]:
            raise AmoebaError(f"llama-bench build changed during the build ({self.build['commit']} -> "
                              f"{tests[0].build_commit}); rerun")
        return tests[0]

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError) or any(marker in str(exc) for marker in _OOM_MARKERS)
