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

Settings that change the numbers are pinned, passed and read back: flash attention (``-fa``, whose
own default ``auto`` lets llama.cpp decide per device, so a table would not say which kernel ran)
and the KV cache types (``-ctk``/``-ctv``) are config fields with explicit defaults (``on``, ``f16``,
``f16``; ``--backend-option flash_attn=off`` etc.), so they are in the table's ``backend_config``
and identity; every report's ``flash_attn``, ``type_k`` and ``type_v`` must match them. llama.cpp
refuses a quantized V cache without flash attention, and so does the config.

The build (commit, build number) is part of the table's identity. It is read from
``llama-bench --version`` where the build has that flag, else from the ``build_commit`` and
``build_number`` fields of a one-token llama-bench run on a tiny model written for it, so a
llama-bench without ``--version`` is not reported unavailable.
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from amoeba_profile.backends.base import (
    Availability,
    Backend,
    Capabilities,
    Engine,
    EngineSpec,
    ToolResult,
    read_engine_record,
    save_raw,
)
from amoeba_profile.backends.llama_cpp.gguf import WEIGHT_TYPES, check_layers, write_gguf

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import AmoebaError, BackendUnavailable, UnsupportedShape, UsageError
from amoeba_profile.core.workload import Workload, tpot_prompt_tokens
from amoeba_profile.device.cpu import cpu_info
from amoeba_profile.device.threads import default_threads as device_default_threads

ENV_VAR = "AMOEBA_LLAMA_CPP"
BINARY = "llama-bench"
BATCHED_BINARY = "llama-batched-bench"  # built beside llama-bench by scripts/build-llama-cpp.sh
INSTALL_HINT = (
    f"pip install 'amoeba-profile[llama-cpp]', run scripts/build-llama-cpp.sh and export the "
    f"{ENV_VAR}=<path to llama-bench> it prints"
)
DTYPE_ALIASES = {"f16": "f16", "float16": "f16", "fp16": "f16", "q8_0": "q8_0", "q4_0": "q4_0"}
_OOM_MARKERS = ("failed to allocate", "out of memory", "bad_alloc", "unable to allocate")
FLASH_ATTN = ("on", "off")  # llama-bench also takes auto: llama.cpp's choice per device, not a pinned setting
# The KV cache types llama-bench's -ctk/-ctv parse (tools/llama-bench ggml_type_from_name).
KV_CACHE_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
# llama-bench's JSON writes flash_attn as llama_flash_attn_type (-1 auto, 0 off, 1 on); older builds as a bool.
_FLASH_ATTN_JSON = {-1: "auto", 0: "off", 1: "on"}
# The model of the build probe: one tiny f16 layer, written and run in a temporary folder.
PROBE_ARCH = ModelArch("llama-bench-probe", 64, 1, 2, 1, 32, 64, 32, max_position=64)


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
    """The cores other processes leave idle, at most one per physical core, or ``$OMP_NUM_THREADS``
    (``device.threads``): ggml's threads meet at a barrier after every op as OpenMP's do."""
    return device_default_threads("cpu", cpu_info()["cores"], "one per physical core")[0]


def parse_version(text: str) -> dict[str, str]:
    """``llama-bench --version`` output (``version: 0.5.0-dev (build 0, commit 0c1e57098)`` then
    ``built with GNU 12.2.0 for Linux x86_64``) -> version, build_number, commit, compiler, target."""
    head = re.search(r"version:\s*(\S+)\s*\(build\s+(\d+),\s*commit\s+(\S+?)\)", text)
    if head is None:
        raise BackendUnavailable(f"unrecognised 'llama-bench --version' output {text.strip()[:120]!r}; {INSTALL_HINT}")
    built = re.search(r"built with (.+?) for (.+)", text)
    return {
        "version": head.group(1),
        "build_number": head.group(2),
        "commit": head.group(3),
        "compiler": built.group(1).strip() if built else "",
        "target": built.group(2).strip() if built else "",
    }


def detect_build(binary: Path) -> dict[str, str]:
    """The build of ``binary``: from ``--version`` where it has the flag, else from a one-token run.

    ``detected_by`` says which; a probe gives no version string, compiler or target (llama-bench's
    JSON has none of them), only the commit and build number that identify the build."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        try:
            return {**parse_version(done.stdout + done.stderr), "detected_by": "llama-bench --version"}
        except BackendUnavailable:
            pass  # a build whose --version prints something else: the probe still finds its commit
    return probe_build(binary)


def probe_command(binary: Path, model: Path) -> list[str]:
    """A one-token llama-bench run whose JSON report carries the build fields."""
    return [str(binary), "-m", str(model), "-p", "1", "-n", "0", "-r", "1", "-t", "1", "-ngl", "0", "-o", "json"]


def probe_build(binary: Path) -> dict[str, str]:
    """The build fields of a one-token run of ``binary`` on a tiny model written for it."""
    with tempfile.TemporaryDirectory(prefix="amoeba-llama-bench-probe-") as folder:
        model = Path(folder) / "probe.gguf"
        write_gguf(model, PROBE_ARCH, ((2, 1, 64),), "f16")
        done = subprocess.run(probe_command(binary, model), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-2:])
        raise BackendUnavailable(
            f"{binary}: neither --version nor a one-token run identifies its build (exit "
            f"{done.returncode}: {tail}); {INSTALL_HINT}"
        )
    tests = parse_bench_json(done.stdout)
    if not tests:
        raise BackendUnavailable(f"{binary}: a one-token run printed no test; {INSTALL_HINT}")
    return {
        "version": "",
        "build_number": str(tests[0].build_number),
        "commit": tests[0].build_commit,
        "compiler": "",
        "target": "",
        "detected_by": "build_commit and build_number of a one-token llama-bench run",
    }


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
    flash_attn: str  # on, off or auto
    type_k: str
    type_v: str
    cpu_info: str
    backends: str
    model_type: str
    model_size: int  # bytes of the model's tensors, as llama.cpp loaded them
    model_n_params: int

    def samples_ms(self, per: int) -> list[float]:
        """Each repetition in milliseconds, divided by ``per`` (decode steps for a tg test)."""
        return [ns / 1e6 / per for ns in self.samples_ns]


def _flash_attn_name(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and value in _FLASH_ATTN_JSON:
        return _FLASH_ATTN_JSON[value]
    raise ValueError("'flash_attn'")


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
            tests.append(
                BenchTest(
                    n_prompt=int(item["n_prompt"]),
                    n_gen=int(item["n_gen"]),
                    n_depth=int(item["n_depth"]),
                    n_threads=int(item["n_threads"]),
                    n_batch=int(item["n_batch"]),
                    n_ubatch=int(item["n_ubatch"]),
                    samples_ns=tuple(int(x) for x in item["samples_ns"]),
                    avg_ns=int(item["avg_ns"]),
                    build_commit=str(item["build_commit"]),
                    build_number=int(item["build_number"]),
                    flash_attn=_flash_attn_name(item["flash_attn"]),
                    type_k=str(item["type_k"]),
                    type_v=str(item["type_v"]),
                    cpu_info=str(item.get("cpu_info", "")),
                    backends=str(item.get("backends", "")),
                    model_type=str(item.get("model_type", "")),
                    model_size=int(item["model_size"]),
                    model_n_params=int(item["model_n_params"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AmoebaError(f"llama-bench JSON test lacks or mangles field {exc}") from None
    return tests


@dataclass(frozen=True)
class LlamaCppConfig:
    """Stored in the table's sidecar; ``LlamaCppBackend(**config)`` rebuilds the same backend.

    ``dtype`` is the GGUF weight type; ``threads``, ``n_batch`` and ``n_ubatch`` are llama-bench's
    ``-t``, ``-b`` and ``-ub``; ``flash_attn``, ``type_k`` and ``type_v`` its ``-fa``, ``-ctk`` and
    ``-ctv`` (``on`` is what ``auto`` picks on a CPU, whose backend runs the flash-attention op;
    ``f16`` is llama-bench's own KV default); ``repetitions`` is how many samples one process run yields (it runs
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
    flash_attn: str = "on"
    type_k: str = "f16"
    type_v: str = "f16"


def check_settings(flash_attn: str, type_k: str, type_v: str) -> tuple[str, str, str]:
    """The pinned llama.cpp settings, normalized; UsageError for one llama-bench would not run."""
    flash_attn, type_k, type_v = (str(v).strip().lower() for v in (flash_attn, type_k, type_v))
    if flash_attn not in FLASH_ATTN:
        raise UsageError(
            f"llama.cpp flash_attn must be one of {list(FLASH_ATTN)}, not {flash_attn!r} (auto leaves the "
            "choice to llama.cpp per device, and the table could not say which kernel it timed)"
        )
    for label, value in (("type_k", type_k), ("type_v", type_v)):
        if value not in KV_CACHE_TYPES:
            raise UsageError(f"llama.cpp {label} must be one of {list(KV_CACHE_TYPES)}, not {value!r}")
    if flash_attn == "off" and type_v not in ("f16", "bf16"):
        raise UsageError(f"llama.cpp refuses a quantized V cache ({type_v}) without flash attention; use flash_attn=on")
    return flash_attn, type_k, type_v


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


@dataclass(frozen=True)
class BatchedRun:
    """One line of ``llama-batched-bench --output-format jsonl``: ``pl`` sequences of ``pp`` prompt
    tokens prefilled together in ``t_pp_s``, then ``tg`` tokens each generated in ``t_tg_s``."""

    pp: int
    tg: int
    pl: int
    t_pp_s: float
    t_tg_s: float
    flash_attn: str


def parse_batched_bench(text: str) -> list[BatchedRun]:
    """The JSONL lines of a llama-batched-bench run (its other output is log text, skipped)."""
    runs = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
            runs.append(
                BatchedRun(
                    int(item["pp"]),
                    int(item["tg"]),
                    int(item["pl"]),
                    float(item["t_pp"]),
                    float(item["t_tg"]),
                    _flash_attn_name(item["flash_attn"]),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise AmoebaError(f"llama-batched-bench JSONL line lacks or mangles field {exc}: {line[:120]!r}") from None
    if not runs:
        raise AmoebaError(f"llama-batched-bench printed no JSONL result: {text.strip()[-200:]!r}")
    return runs


LLAMA_BENCH_DEFINITIONS = (
    "llama-bench on the full model in one GGUF file: ttft_ms = median of its pp test (-p P -n 0: the prompt "
    "decoded into an empty cache, no token sampled); tpot_ms = median of its tg test (-p 0 -n N-1 -d P: N-1 "
    "single-token decodes after a P-token cache, the generation's own decode window) / (N - 1). The table composes "
    "the same quantities from a difference fit over partial-depth models and centred decode windows"
)
BATCHED_BENCH_DEFINITIONS = (
    "llama-batched-bench on the full model: -npl B sequences of P prompt tokens prefilled in one batch (t_pp, "
    "ttft_ms = t_pp), then N-1 tokens each decoded together (tpot_ms = t_tg / (N - 1)); one run, no sampling"
)


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
    return tpot_prompt_tokens(context, steps)


def _one_sequence(batch: int) -> None:
    if batch != 1:
        raise UnsupportedShape(
            f"llama-bench serves one sequence, not a batch of {batch} (that needs llama-batched-bench)"
        )


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    verified_on = ("cpu",)  # tests/data holds llama-bench reports recorded from a real build

    def __init__(
        self,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int | None = None,
        binary: str | None = None,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        repetitions: int = 10,
        flash_attn: str = "on",
        type_k: str = "f16",
        type_v: str = "f16",
    ):
        if device != "cpu":
            raise UsageError(
                f"the llama.cpp backend runs a CPU build of llama-bench; device {device!r} is not supported"
            )
        weight_type = DTYPE_ALIASES.get((dtype or "f16").lower())
        if weight_type is None:
            raise UsageError(f"unknown llama.cpp weight type {dtype!r}: use one of {list(WEIGHT_TYPES)}")
        for label, value in (("n_batch", n_batch), ("n_ubatch", n_ubatch), ("repetitions", repetitions)):
            if value < 1:
                raise UsageError(f"llama.cpp {label} must be >= 1, got {value}")
        settings = check_settings(flash_attn, type_k, type_v)
        found = find_llama_bench(binary)
        if found is None:
            raise BackendUnavailable(f"no llama-bench at {binary or '$' + ENV_VAR + ' or PATH'}; {INSTALL_HINT}")
        self.config = LlamaCppConfig(
            device, weight_type, threads or default_threads(), str(found), n_batch, n_ubatch, repetitions, *settings
        )
        self.device, self.dtype = device, weight_type
        self.build = detect_build(found)

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
        return Capabilities(
            per_layer_heads=True, per_layer_ffn=True, methods=("difference",), dtypes=WEIGHT_TYPES, devices=("cpu",)
        )

    @property
    def clock_name(self) -> str:
        return "llama-bench samples_ns (high_resolution_clock per repetition)"

    def host_cores(self) -> int:
        return self.config.threads

    def versions(self) -> dict[str, str]:
        return {
            "llama.cpp": self.build["commit"],
            "llama.cpp_build": self.build["build_number"],
            "gguf": importlib.metadata.version("gguf"),
        }

    def device_arch(self) -> str:
        return platform.machine()

    def environment(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **self.versions(),
            "llama.cpp_version": self.build["version"],
            "compiler": self.build["compiler"],
            "target": self.build["target"],
            "build_detected_by": self.build["detected_by"],
            "binary": cfg.binary,
            "device": "cpu",
            "dtype": cfg.dtype,
            "threads": cfg.threads,
            "n_batch": cfg.n_batch,
            "n_ubatch": cfg.n_ubatch,
            "repetitions": cfg.repetitions,
            "flash_attn": cfg.flash_attn,
            "type_k": cfg.type_k,
            "type_v": cfg.type_v,
            "cpu_isa": cpu_info()["isa"],
            "python": platform.python_version(),
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
        return [
            cfg.binary,
            "-m",
            str(model),
            "-p",
            str(prompt),
            "-n",
            str(gen),
            "-d",
            str(depth),
            "-r",
            str(cfg.repetitions + 1),
            "-t",
            str(cfg.threads),
            "-b",
            str(cfg.n_batch),
            "-ub",
            str(cfg.n_ubatch),
            "-fa",
            cfg.flash_attn,
            "-ctk",
            cfg.type_k,
            "-ctv",
            cfg.type_v,
            "-ngl",
            "0",
            "-o",
            "json",
        ]

    def run_test(self, model: Path, prompt: int, gen: int, depth: int) -> BenchTest:
        """Run one llama-bench test to completion (blocking) and return its report."""
        done = subprocess.run(self.command(model, prompt, gen, depth), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise AmoebaError(
                f"llama-bench exited {done.returncode} on {model.name} (p={prompt}, n={gen}, d={depth}): {tail}"
            )
        save_raw(
            "llama.cpp", "llama-bench", {"command": self.command(model, prompt, gen, depth), "stdout": done.stdout}
        )
        tests = parse_bench_json(done.stdout)
        if len(tests) != 1 or (tests[0].n_prompt, tests[0].n_gen, tests[0].n_depth) != (prompt, gen, depth):
            raise AmoebaError(
                f"llama-bench reported {[(t.n_prompt, t.n_gen, t.n_depth) for t in tests]}, "
                f"expected one test (p={prompt}, n={gen}, d={depth})"
            )
        if tests[0].build_commit != self.build["commit"]:
            raise AmoebaError(
                f"llama-bench build changed during the build ({self.build['commit']} -> {tests[0].build_commit}); rerun"
            )
        self.check_reported_settings(tests[0])
        return tests[0]

    def check_reported_settings(self, test: BenchTest) -> None:
        """Refuse a report whose flash attention or KV cache types are not the pinned ones."""
        cfg = self.config
        ran, asked = (test.flash_attn, test.type_k, test.type_v), (cfg.flash_attn, cfg.type_k, cfg.type_v)
        if ran != asked:
            raise AmoebaError(
                f"llama-bench ran with flash_attn={ran[0]}, type_k={ran[1]}, type_v={ran[2]} where "
                f"-fa {asked[0]} -ctk {asked[1]} -ctv {asked[2]} were asked; this llama-bench does not "
                "honour them - rebuild it with scripts/build-llama-cpp.sh"
            )

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError) or any(marker in str(exc) for marker in _OOM_MARKERS)

    def batched_bench_command(self, model: Path, workload: Workload) -> list[str]:
        """llama-batched-bench for ``workload.batch`` sequences of the workload's lengths, with this
        backend's threads, batch sizes, flash attention and KV cache types, JSONL out."""
        cfg = self.config
        context = workload.batch * (workload.prompt_len + workload.gen_len)
        return [
            str(Path(cfg.binary).with_name(BATCHED_BINARY)),
            "-m",
            str(model),
            "-c",
            str(context),
            "-b",
            str(cfg.n_batch),
            "-ub",
            str(cfg.n_ubatch),
            "-npp",
            str(workload.prompt_len),
            "-ntg",
            str(workload.gen_len - 1),
            "-npl",
            str(workload.batch),
            "-t",
            str(cfg.threads),
            "-fa",
            cfg.flash_attn,
            "-ctk",
            cfg.type_k,
            "-ctv",
            cfg.type_v,
            "-ngl",
            "0",
            "--output-format",
            "jsonl",
        ]

    def crosscheck_tool(self, arch: ModelArch, workload: Workload, work_dir: Path, repetitions: int) -> ToolResult:
        """The full model through llama-bench (batch 1: a pp and a tg test, each of the backend's
        ``repetitions`` + 1 repetitions, the first dropped) or llama-batched-bench (one run)."""
        model = work_dir / "model.gguf"
        write_gguf(model, arch, ((arch.num_heads, arch.num_kv_heads, arch.ffn_size),) * arch.num_layers, self.dtype)
        steps = workload.gen_len - 1
        if workload.batch > 1:
            command = self.batched_bench_command(model, workload)
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise AmoebaError(
                    f"{BATCHED_BINARY} exited {done.returncode}: {' | '.join(done.stderr.strip().splitlines()[-3:])}"
                )
            runs: list[BatchedRun | None] = [
                r
                for r in parse_batched_bench(done.stdout)
                if (r.pp, r.tg, r.pl) == (workload.prompt_len, steps, workload.batch)
            ]
            (run,) = runs or [None]
            if run is None or run.flash_attn != self.config.flash_attn:
                raise AmoebaError(
                    f"{BATCHED_BINARY} did not report pp={workload.prompt_len}, tg={steps}, "
                    f"pl={workload.batch} with flash_attn={self.config.flash_attn}"
                )
            return ToolResult(
                BATCHED_BINARY,
                tuple(command),
                run.t_pp_s * 1e3,
                run.t_tg_s * 1e3 / steps,
                BATCHED_BENCH_DEFINITIONS,
                done.stdout,
            )
        prefill = self.run_test(model, workload.prompt_len, 0, 0)
        decode = self.run_test(model, 0, steps, workload.prompt_len)
        commands = (
            " ".join(self.command(model, workload.prompt_len, 0, 0)),
            " ".join(self.command(model, 0, steps, workload.prompt_len)),
        )
        # The first repetition of each run pays one-time set-up (module docstring), as in the workpieces.
        raw = json.dumps(
            {"pp_samples_ns": prefill.samples_ns, "tg_samples_ns": decode.samples_ns, "first_repetition_dropped": True}
        )
        return ToolResult(
            "llama-bench",
            commands,
            float(np.median(prefill.samples_ms(1)[1:])),
            float(np.median(decode.samples_ms(steps)[1:])),
            LLAMA_BENCH_DEFINITIONS,
            raw,
        )
