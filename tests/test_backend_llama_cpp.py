"""The llama.cpp backend: command lines and report parsing always (a stand-in llama-bench replays
reports recorded from the real one), and real llama-bench runs when one is built.

The recorded reports in tests/data/ come from llama-bench built by scripts/build-llama-cpp.sh from
ggml-org/llama.cpp commit 0c1e57098 (vendored by llama-cpp-python 0.3.36), on the tiny model of
conftest (f16, 4 layers): ``-p 16 -n 0 -r 3`` and ``-p 0 -n 4 -d 13 -r 3``, one thread.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the gguf package (extra 'llama-cpp') writes the model files")

from amoeba_profile.backends import get_backend
from amoeba_profile.backends.base import EngineSpec
from amoeba_profile.backends.llama_cpp import adapter as llama_cpp
from amoeba_profile.backends.llama_cpp.gguf import tensor_specs

from amoeba_profile.core.errors import (
    AmoebaError,
    BackendUnavailable,
    UnsupportedShape,
    UsageError,
)
from amoeba_profile.measure.artifacts import ArtifactCache
from amoeba_profile.measure.methods import choose_method

DATA = Path(__file__).parent / "data"
PP_REPORT = DATA / "llama-bench-0c1e57098-pp16.json"
TG_REPORT = DATA / "llama-bench-0c1e57098-tg4-d13.json"
VERSION_TEXT = "version: 0.5.0-dev (build 0, commit 0c1e57098)\nbuilt with GNU 12.2.0 for Linux x86_64\n"
PER_LAYER = ((8, 4, 128), (4, 2, 64), (8, 4, 96), (8, 4, 128))

REAL = llama_cpp.find_llama_bench()
needs_llama_bench = pytest.mark.skipif(
    REAL is None, reason=f"no llama-bench (run scripts/build-llama-cpp.sh and export {llama_cpp.ENV_VAR})"
)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A llama-bench stand-in: prints VERSION_TEXT for --version (or refuses the flag, as builds without
    it do, with $FAKE_NO_VERSION), else replays the report named by $FAKE_REPORT (or fails like
    llama-bench with $FAKE_FAIL), logging each command line. The replayed report states the -p, -n, -d,
    -fa, -ctk and -ctv it was given, as llama-bench reports the test and settings it ran, unless
    $FAKE_VERBATIM."""
    script = tmp_path / "bin" / "llama-bench"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "args = sys.argv[1:]\n"
        f"open({str(tmp_path / 'calls.log')!r}, 'a').write(' '.join(args) + '\\n')\n"
        "if args == ['--version'] and os.environ.get('FAKE_NO_VERSION'):\n"
        "    sys.stderr.write('error: invalid parameter for argument: --version\\n'); sys.exit(1)\n"
        f"if args == ['--version']:\n    sys.stderr.write({VERSION_TEXT!r}); sys.exit(0)\n"
        "if os.environ.get('FAKE_FAIL'):\n    sys.stderr.write(os.environ['FAKE_FAIL'] + '\\n'); sys.exit(1)\n"
        "report = json.load(open(os.environ['FAKE_REPORT']))\n"
        "for flag, field, value in (('-fa', 'flash_attn', {'on': 1, 'off': 0, 'auto': -1}.get),\n"
        "                           ('-ctk', 'type_k', str), ('-ctv', 'type_v', str), ('-p', 'n_prompt', int),\n"
        "                           ('-n', 'n_gen', int), ('-d', 'n_depth', int)):\n"
        "    if flag in args and not os.environ.get('FAKE_VERBATIM'):\n"
        "        for test in report:\n"
        "            test[field] = value(args[args.index(flag) + 1])\n"
        "sys.stdout.write(json.dumps(report))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(llama_cpp.ENV_VAR, str(script.parent))
    monkeypatch.setenv("FAKE_REPORT", str(PP_REPORT))
    for name in ("FAKE_FAIL", "FAKE_NO_VERSION", "FAKE_VERBATIM"):
        monkeypatch.delenv(name, raising=False)
    return script


def _calls(stand_in: Path) -> list[str]:
    return (stand_in.parent.parent / "calls.log").read_text().splitlines()


def _spec(arch, layers, batch=1) -> EngineSpec:
    return EngineSpec(arch, layers, batch, 64, 66)


def test_recorded_reports_parse_to_their_samples():
    (pp,) = llama_cpp.parse_bench_json(PP_REPORT.read_text())
    (tg,) = llama_cpp.parse_bench_json(TG_REPORT.read_text())
    raw_pp, raw_tg = json.loads(PP_REPORT.read_text())[0], json.loads(TG_REPORT.read_text())[0]
    assert (pp.n_prompt, pp.n_gen, pp.n_depth) == (16, 0, 0)
    assert (tg.n_prompt, tg.n_gen, tg.n_depth) == (0, 4, 13)
    assert pp.build_commit == tg.build_commit == "0c1e57098" and pp.n_threads == 1
    assert pp.samples_ns == tuple(raw_pp["samples_ns"]) and len(pp.samples_ns) == 3
    assert pp.samples_ms(1) == [ns / 1e6 for ns in raw_pp["samples_ns"]]
    assert tg.samples_ms(4) == [ns / 4e6 for ns in raw_tg["samples_ns"]]
    assert pp.avg_ns == raw_pp["avg_ns"] and min(pp.samples_ns) <= pp.avg_ns <= max(pp.samples_ns)
    # recorded without -fa/-ctk/-ctv: llama-bench's defaults, flash attention auto (-1) and f16 caches
    assert (pp.flash_attn, pp.type_k, pp.type_v) == ("auto", "f16", "f16")


@pytest.mark.parametrize("value, name", [(-1, "auto"), (0, "off"), (1, "on"), (False, "off"), (True, "on")])
def test_flash_attn_reads_as_llama_bench_writes_it(value, name):
    report = json.loads(PP_REPORT.read_text())
    report[0]["flash_attn"] = value  # llama_flash_attn_type, or a bool in builds before it
    assert llama_cpp.parse_bench_json(json.dumps(report))[0].flash_attn == name
    report[0]["flash_attn"] = 2
    with pytest.raises(AmoebaError, match="flash_attn"):
        llama_cpp.parse_bench_json(json.dumps(report))


def test_reports_without_samples_are_errors():
    with pytest.raises(AmoebaError, match="printed no JSON"):
        llama_cpp.parse_bench_json("main: error: failed to load model\n")
    broken = json.loads(PP_REPORT.read_text())
    del broken[0]["samples_ns"]
    with pytest.raises(AmoebaError, match="samples_ns"):
        llama_cpp.parse_bench_json(json.dumps(broken))


def test_version_line_gives_commit_and_build():
    assert llama_cpp.parse_version(VERSION_TEXT) == {
        "version": "0.5.0-dev",
        "build_number": "0",
        "commit": "0c1e57098",
        "compiler": "GNU 12.2.0",
        "target": "Linux x86_64",
    }
    with pytest.raises(BackendUnavailable, match="unrecognised"):
        llama_cpp.parse_version("error: invalid parameter for argument: --version")


def test_tpot_depth_puts_the_decode_steps_on_the_serving_loop_window():
    # a cached prompt of c - n//2 tokens, then its last token: the n decodes start one position later
    assert llama_cpp.tpot_depth(128, 8) == 125
    assert llama_cpp.tpot_depth(4, 8) == 1


def test_config_and_versions_come_from_the_binary(stand_in):
    backend = get_backend("llama.cpp", dtype="Q4_0", threads=3)
    assert backend.config == llama_cpp.LlamaCppConfig("cpu", "q4_0", 3, str(stand_in.resolve()), 2048, 512, 10)
    assert backend.dtype == "q4_0" and backend.name == "llama.cpp"
    assert backend.versions()["llama.cpp"] == "0c1e57098" and "gguf" in backend.versions()
    env = backend.environment()
    assert env["threads"] == 3 and env["compiler"] == "GNU 12.2.0" and isinstance(env["cpu_isa"], list)
    rebuilt = get_backend("llama.cpp", **backend.config_dict())
    assert rebuilt.config == backend.config


def test_command_lines_follow_llama_bench_definitions(stand_in, tiny_arch, tmp_path):
    backend = llama_cpp.LlamaCppBackend(threads=2, n_batch=256, n_ubatch=64, repetitions=4)
    model = tmp_path / "model.gguf"
    tail = [
        "-r",
        "5",
        "-t",
        "2",
        "-b",
        "256",
        "-ub",
        "64",
        "-fa",
        "on",
        "-ctk",
        "f16",
        "-ctv",
        "f16",
        "-ngl",
        "0",
        "-o",
        "json",
    ]
    assert backend.command(model, 16, 0, 0) == [
        str(stand_in.resolve()),
        "-m",
        str(model),
        "-p",
        "16",
        "-n",
        "0",
        "-d",
        "0",
        *tail,
    ]
    engine = llama_cpp.LlamaCppEngine(backend, _spec(tiny_arch, PER_LAYER), model)
    piece = engine.tpot(1, 128, 8)
    assert (piece.prompt, piece.gen, piece.depth) == (0, 8, 125)


def test_flash_attention_and_kv_types_are_pinned_passed_and_read_back(stand_in, tmp_path, monkeypatch):
    backend = get_backend("llama.cpp", threads=1, flash_attn="OFF", type_k="q8_0", type_v="f16")
    assert (backend.config.flash_attn, backend.config.type_k, backend.config.type_v) == ("off", "q8_0", "f16")
    assert backend.config_dict()["flash_attn"] == "off"  # in backend_config: the table's identity
    env = backend.environment()
    assert (env["flash_attn"], env["type_k"], env["type_v"]) == ("off", "q8_0", "f16")
    command = backend.command(tmp_path / "model.gguf", 16, 0, 0)
    assert command[command.index("-fa") + 1] == "off" and command[command.index("-ctk") + 1] == "q8_0"
    assert command[command.index("-ctv") + 1] == "f16"
    test = backend.run_test(tmp_path / "model.gguf", 16, 0, 0)
    assert (test.flash_attn, test.type_k, test.type_v) == ("off", "q8_0", "f16")
    monkeypatch.setenv("FAKE_VERBATIM", "1")  # a build that ignored the flags: the recorded auto / f16 / f16
    with pytest.raises(AmoebaError, match="ran with flash_attn=auto, type_k=f16, type_v=f16 where -fa off -ctk q8_0"):
        backend.run_test(tmp_path / "model.gguf", 16, 0, 0)
    defaults = get_backend("llama.cpp", threads=1)
    assert (defaults.config.flash_attn, defaults.config.type_k, defaults.config.type_v) == ("on", "f16", "f16")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"flash_attn": "auto"}, "must be one of \\['on', 'off'\\], not 'auto'"),
        ({"type_k": "q3_k"}, "type_k must be one of"),
        ({"flash_attn": "off", "type_v": "q4_0"}, "quantized V cache"),
    ],
)
def test_unpinned_or_impossible_settings_are_refused(stand_in, options, message):
    with pytest.raises(UsageError, match=message):
        get_backend("llama.cpp", threads=1, **options)


def test_a_build_without_version_flag_is_identified_by_a_one_token_run(stand_in, monkeypatch):
    monkeypatch.setenv("FAKE_NO_VERSION", "1")
    backend = get_backend("llama.cpp", threads=1)  # not BackendUnavailable
    assert backend.versions()["llama.cpp"] == "0c1e57098" and backend.versions()["llama.cpp_build"] == "0"
    assert "one-token llama-bench run" in backend.environment()["build_detected_by"]
    calls = _calls(stand_in)
    assert calls[0] == "--version" and " -p 1 -n 0 -r 1 " in calls[1] and calls[1].endswith("-o json")
    assert calls[1].split()[1].endswith("probe.gguf")
    monkeypatch.setenv("FAKE_FAIL", "error: failed to load model")
    with pytest.raises(BackendUnavailable, match="neither --version nor a one-token run.*failed to load model"):
        get_backend("llama.cpp", threads=1)


def test_a_workpiece_hands_out_llama_bench_samples_and_reruns_when_used_up(stand_in, tiny_arch, tmp_path):
    backend = llama_cpp.LlamaCppBackend(threads=1, repetitions=2)
    engine = llama_cpp.LlamaCppEngine(backend, _spec(tiny_arch, PER_LAYER), tmp_path / "model.gguf")
    recorded = [ns / 1e6 for ns in json.loads(PP_REPORT.read_text())[0]["samples_ns"]]
    piece = engine.ttft(1, 16)
    assert piece.max_steps == 1
    got = [piece.sample_ms(1) for _ in range(3)]
    assert got == recorded[1:] + recorded[1:2]  # each run's first repetition is dropped
    runs = [c for c in _calls(stand_in) if c != "--version"]
    assert len(runs) == 2 and all(" -p 16 -n 0 -d 0 -r 3 " in c for c in runs)


def test_a_tpot_sample_is_one_decode_step(stand_in, tiny_arch, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_REPORT", str(TG_REPORT))
    backend = llama_cpp.LlamaCppBackend(threads=1, repetitions=2)
    engine = llama_cpp.LlamaCppEngine(backend, _spec(tiny_arch, PER_LAYER), tmp_path / "model.gguf")
    piece = engine.tpot(1, 14, 4)  # depth 14 - 2 + 1 = 13, as recorded
    assert piece.sample_ms(1) == json.loads(TG_REPORT.read_text())[0]["samples_ns"][1] / 4e6


def test_a_report_for_another_test_or_build_is_refused(stand_in, tiny_arch, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VERBATIM", "1")
    backend = llama_cpp.LlamaCppBackend(threads=1)
    with pytest.raises(AmoebaError, match=r"expected one test \(p=32"):
        backend.run_test(tmp_path / "model.gguf", 32, 0, 0)
    report = json.loads(PP_REPORT.read_text())
    report[0]["build_commit"], report[0]["flash_attn"] = "deadbeef", 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report))
    monkeypatch.setenv("FAKE_REPORT", str(other))
    with pytest.raises(AmoebaError, match="build changed"):
        backend.run_test(tmp_path / "model.gguf", 16, 0, 0)


def test_raw_reports_are_kept_for_the_first_run_when_asked(stand_in, tmp_path, monkeypatch):
    from amoeba_profile.backends import base

    backend = llama_cpp.LlamaCppBackend(threads=1)
    backend.run_test(tmp_path / "model.gguf", 16, 0, 0)  # AMOEBA_RAW_DIR unset: nothing kept
    monkeypatch.setenv(base.RAW_DIR_VAR, str(tmp_path / "raw"))
    monkeypatch.setattr(base, "RAW_RECORDS", 2)
    for _ in range(3):
        backend.run_test(tmp_path / "model.gguf", 16, 0, 0)
    lines = (tmp_path / "raw" / "llama.cpp" / "llama-bench.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the first run's outputs, capped
    kept = json.loads(lines[0])
    assert kept["command"] == backend.command(tmp_path / "model.gguf", 16, 0, 0)
    assert llama_cpp.parse_bench_json(kept["stdout"])[0].samples_ns == tuple(
        json.loads(PP_REPORT.read_text())[0]["samples_ns"]
    )


def test_a_failing_llama_bench_names_its_error_and_oom_is_classified(stand_in, tmp_path, monkeypatch):
    backend = llama_cpp.LlamaCppBackend(threads=1)
    monkeypatch.setenv("FAKE_FAIL", "llama_model_load: error loading model: unable to allocate CPU buffer")
    with pytest.raises(AmoebaError, match="exited 1 .*unable to allocate") as info:
        backend.run_test(tmp_path / "model.gguf", 16, 0, 0)
    assert backend.is_out_of_memory(info.value)
    assert not backend.is_out_of_memory(AmoebaError("llama-bench exited 1: invalid model"))


def test_shapes_llama_bench_cannot_serve_are_unsupported(stand_in, tiny_arch):
    backend = llama_cpp.LlamaCppBackend(threads=1)
    backend.check_spec(_spec(tiny_arch, PER_LAYER))
    with pytest.raises(UnsupportedShape, match="one sequence"):
        backend.check_spec(_spec(tiny_arch, PER_LAYER, batch=2))
    with pytest.raises(UnsupportedShape, match="block_count > 0"):
        backend.check_spec(_spec(tiny_arch, ()))


def test_binary_lookup_and_unavailability(stand_in, tmp_path, monkeypatch):
    assert llama_cpp.find_llama_bench(str(stand_in)) == stand_in.resolve()
    assert llama_cpp.find_llama_bench(str(stand_in.parent)) == stand_in.resolve()
    assert llama_cpp.find_llama_bench(str(tmp_path / "missing")) is None
    with pytest.raises(BackendUnavailable, match="no llama-bench at .*missing"):
        llama_cpp.LlamaCppBackend(binary=str(tmp_path / "missing"))
    monkeypatch.delenv(llama_cpp.ENV_VAR)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    available = llama_cpp.LlamaCppBackend.availability()
    assert not available.ok and "build-llama-cpp.sh" in available.install_hint
    with pytest.raises(BackendUnavailable, match="build-llama-cpp.sh"):
        get_backend("llama.cpp")


def test_backends_table_prints_the_install_hint_verbatim(tmp_path, monkeypatch):
    from rich.console import Console

    from amoeba_profile.cli.report import backends_table

    monkeypatch.delenv(llama_cpp.ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    console = Console(record=True, width=400)
    console.print(backends_table())
    assert "pip install 'amoeba-profile[llama-cpp]'" in console.export_text()  # not eaten as rich markup


def test_default_threads_follow_the_shared_rule(monkeypatch):
    """One policy for every CPU flow (device.threads): the idle cores, capped by the flow's default."""
    from amoeba_profile.backends.pytorch.eager import default_threads

    from amoeba_profile.device import threads
    from amoeba_profile.device.load import Contention

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "idle_cores", lambda load: (1, Contention(1.0, 2, 1, 0.5)))
    assert llama_cpp.default_threads() == default_threads("cpu")[0] == 1


def test_the_default_method_is_difference():
    method, why = choose_method("llama.cpp", llama_cpp.LlamaCppBackend.capabilities().methods, "cpu")
    assert method == "difference" and "whole models" in why


# --- with a real llama-bench ------------------------------------------------------------------


def _n_params(arch, layers) -> int:
    return sum(int(np.prod(t.shape)) for t in tensor_specs(arch, layers, "f16"))


@needs_llama_bench
@pytest.mark.parametrize("layers, weight_type", [(((8, 4, 128),) * 4, "f16"), (PER_LAYER, "f16"), (PER_LAYER, "q4_0")])
def test_llama_bench_runs_the_written_shapes(tiny_arch, tmp_path, layers, weight_type):
    backend = llama_cpp.LlamaCppBackend(dtype=weight_type, threads=1, repetitions=2)
    spec = _spec(tiny_arch, layers)
    backend.check_spec(spec)
    artifact = ArtifactCache(tmp_path).ensure(backend, spec)
    engine = backend.load(spec, artifact.path)
    test = backend.run_test(engine.model, 16, 0, 0)
    # llama.cpp counted exactly the per-layer tensors written: it read every layer's own widths
    assert test.model_n_params == _n_params(tiny_arch, layers)
    assert test.model_type.startswith("deci" if len(set(layers)) > 1 else "llama")
    assert len(test.samples_ns) == 3 and min(test.samples_ns) > 0
    ttft = engine.ttft(1, 16).sample_ms(1)
    tpot = engine.tpot(1, 32, 4).sample_ms(1)
    assert 0 < tpot < ttft * 16 and ttft < 1e4


@needs_llama_bench
def test_build_lut_end_to_end_with_llama_bench(tiny_config_path, tmp_path):
    from amoeba_profile.table.lut import load_table

    out = tmp_path / "lut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AMOEBA_ARTIFACTS": str(tmp_path / "artifacts")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "amoeba_profile.cli.main",
            "build-lut",
            "--backend",
            "llama.cpp",
            "--model",
            str(tiny_config_path),
            "--out",
            str(out),
            "--quick",
            "--widths",
            "1,1/2",
            "--prompt-len",
            "16",
            "--contexts",
            "16",
            "--decode-steps",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "method: difference" in proc.stderr
    (path,) = out.rglob("*.csv")
    assert path.parent.name == "llama.cpp" and path.name == "tiny-f16.csv"
    lut = load_table(path)
    frame = lut.frame
    models = frame[frame.component == "model"]
    assert set(models[models.num_layers == 0].status) == {"unsupported"}
    ok = models[models.status == "ok"]
    assert len(ok) == 2 * 3 * 3 and (ok.median_ms > 0).all()  # (prefill, decode) x 3 shapes x 3 depths
    layers = frame[(frame.component == "layer") & (frame.status == "ok")]
    assert set(layers.method) == {"difference"} and len(layers) >= 2
    assert lut.meta.versions["llama.cpp"] == "0c1e57098" and lut.meta.backend_config["dtype"] == "f16"
    assert lut.meta.backend_config["threads"] == 1


# --- cross-check tools (amoeba_profile.measure.crosscheck) ----------------------------------------------


def test_crosscheck_runs_llama_bench_on_the_full_model(stand_in, tiny_arch, tmp_path):
    from amoeba_profile.core.workload import Workload

    backend = llama_cpp.LlamaCppBackend(threads=1, repetitions=3)
    result = backend.crosscheck_tool(tiny_arch, Workload(1, 16, 5), tmp_path, 3)
    runs = [c for c in _calls(stand_in) if c != "--version"]
    assert len(runs) == 2
    assert " -p 16 -n 0 -d 0 -r 4 " in runs[0] and " -p 0 -n 4 -d 16 -r 4 " in runs[1]  # prompt; N-1 steps after P
    assert all(" -fa on -ctk f16 -ctv f16 " in r for r in runs)
    model = tmp_path / "model.gguf"
    assert runs[0].split()[1] == str(model) and model.stat().st_size > 0  # the full model in one file
    recorded = [ns / 1e6 for ns in json.loads(PP_REPORT.read_text())[0]["samples_ns"]]
    assert result.tool == "llama-bench" and result.ttft_ms == pytest.approx(np.median(recorded[1:]))
    assert result.tpot_ms == pytest.approx(np.median(recorded[1:]) / 4)  # the stand-in replays the same samples
    assert json.loads(result.raw)["first_repetition_dropped"] is True and "-d 16" in result.command[1]


# One line per (pp, tg, pl) as llama-batched-bench writes it with --output-format jsonl
# (tools/batched-bench/batched-bench.cpp; CONSTRUCTED from that format string, not recorded), among log lines.
BATCHED_OUTPUT = """main: n_kv_max = 192, n_batch = 2048, n_ubatch = 512, flash_attn = 1, is_pp_shared = 0
{"n_kv_max": 192, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 1, "is_pp_shared": 0, "n_gpu_layers": 0, \
"n_threads": 1, "n_threads_batch": 1, "pp": 16, "tg": 7, "pl": 4, "n_kv": 92, "t_pp": 0.012000, \
"speed_pp": 5333.333496, "t_tg": 0.028000, "speed_tg": 1000.000000, "t": 0.040000, "speed": 2300.000000}

llama_perf_context_print:        load time =      10.00 ms
"""


def test_batched_bench_command_and_output(stand_in, tmp_path):
    from amoeba_profile.core.workload import Workload

    backend = llama_cpp.LlamaCppBackend(threads=2, n_batch=256, n_ubatch=64)
    command = backend.batched_bench_command(tmp_path / "m.gguf", Workload(4, 16, 8))
    assert command[0] == str(stand_in.resolve().with_name("llama-batched-bench"))
    assert command[1:] == [
        "-m",
        str(tmp_path / "m.gguf"),
        "-c",
        "96",
        "-b",
        "256",
        "-ub",
        "64",
        "-npp",
        "16",
        "-ntg",
        "7",
        "-npl",
        "4",
        "-t",
        "2",
        "-fa",
        "on",
        "-ctk",
        "f16",
        "-ctv",
        "f16",
        "-ngl",
        "0",
        "--output-format",
        "jsonl",
    ]
    (run,) = llama_cpp.parse_batched_bench(BATCHED_OUTPUT)
    assert (run.pp, run.tg, run.pl, run.flash_attn) == (16, 7, 4, "on")
    assert (run.t_pp_s, run.t_tg_s) == (0.012, 0.028)
    with pytest.raises(AmoebaError, match="no JSONL result"):
        llama_cpp.parse_batched_bench("main: error: failed to load model\n")
    with pytest.raises(AmoebaError, match="'t_tg'"):
        llama_cpp.parse_batched_bench(BATCHED_OUTPUT.replace('"t_tg"', '"t_xx"'))
