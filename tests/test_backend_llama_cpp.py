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

from amoeba_profile.measure.artifacts import ArtifactCache  # noqa: E402
from amoeba_profile.backends import get_backend  # noqa: E402
from amoeba_profile.backends.llama_cpp import adapter as llama_cpp  # noqa: E402
from amoeba_profile.backends.base import EngineSpec  # noqa: E402
from amoeba_profile.backends.llama_cpp.gguf import tensor_specs  # noqa: E402
from amoeba_profile.core.errors import AmoebaError, BackendUnavailable, UnsupportedShape  # noqa: E402
from amoeba_profile.measure.methods import choose_method  # noqa: E402

DATA = Path(__file__).parent / "data"
PP_REPORT = DATA / "llama-bench-0c1e57098-pp16.json"
TG_REPORT = DATA / "llama-bench-0c1e57098-tg4-d13.json"
VERSION_TEXT = "version: 0.5.0-dev (build 0, commit 0c1e57098)\nbuilt with GNU 12.2.0 for Linux x86_64\n"
PER_LAYER = ((8, 4, 128), (4, 2, 64), (8, 4, 96), (8, 4, 128))

REAL = llama_cpp.find_llama_bench()
needs_llama_bench = pytest.mark.skipif(
    REAL is None, reason=f"no llama-bench (run scripts/build-llama-cpp.sh and export {llama_cpp.ENV_VAR})")


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A llama-bench stand-in: prints VERSION_TEXT for --version, else replays the report named by
    $FAKE_REPORT (or fails like llama-bench with $FAKE_FAIL), logging each command line."""
    script = tmp_path / "bin" / "llama-bench"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"open({str(tmp_path / 'calls.log')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"if sys.argv[1:] == ['--version']:\n    sys.stderr.write({VERSION_TEXT!r}); sys.exit(0)\n"
        "if os.environ.get('FAKE_FAIL'):\n    sys.stderr.write(os.environ['FAKE_FAIL'] + '\\n'); sys.exit(1)\n"
        "sys.stdout.write(open(os.environ['FAKE_REPORT']).read())\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(llama_cpp.ENV_VAR, str(script.parent))
    monkeypatch.setenv("FAKE_REPORT", str(PP_REPORT))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
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


def test_reports_without_samples_are_errors():
    with pytest.raises(AmoebaError, match="printed no JSON"):
        llama_cpp.parse_bench_json("main: error: failed to load model\n")
    broken = json.loads(PP_REPORT.read_text())
    del broken[0]["samples_ns"]
    with pytest.raises(AmoebaError, match="samples_ns"):
        llama_cpp.parse_bench_json(json.dumps(broken))


def test_version_line_gives_commit_and_build():
    assert llama_cpp.parse_version(VERSION_TEXT) == {
        "version": "0.5.0-dev", "build_number": "0", "commit": "0c1e57098", "compiler": "GNU 12.2.0",
        "target": "Linux x86_64"}
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
    tail = ["-r", "5", "-t", "2", "-b", "256", "-ub", "64", "-ngl", "0", "-o", "json"]
    assert backend.command(model, 16, 0, 0) == [str(stand_in.resolve()), "-m", str(model), "-p", "16", "-n", "0",
                                                "-d", "0", *tail]
    engine = llama_cpp.LlamaCppEngine(backend, _spec(tiny_arch, PER_LAYER), model)
    piece = engine.tpot(1, 128, 8)
    assert (piece.prompt, piece.gen, piece.depth) == (0, 8, 125)


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
    backend = llama_cpp.LlamaCppBackend(threads=1)
    with pytest.raises(AmoebaError, match=r"expected one test \(p=32"):
        backend.run_test(tmp_path / "model.gguf", 32, 0, 0)
    report = json.loads(PP_REPORT.read_text())
    report[0]["build_commit"] = "deadbeef"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report))
    monkeypatch.setenv("FAKE_REPORT", str(other))
    with pytest.raises(AmoebaError, match="build changed"):
        backend.run_test(tmp_path / "model.gguf", 16, 0, 0)


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
@pytest.mark.parametrize("layers, weight_type", [(((8, 4, 128),) * 4, "f16"), (PER_LAYER, "f16"),
                                                 (PER_LAYER, "q4_0")])
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
        [sys.executable, "-m", "amoeba_profile.cli.main", "build-lut", "--backend", "llama.cpp", "--model",
         str(tiny_config_path), "--out", str(out), "--quick", "--widths", "1,1/2", "--prompt-len", "16",
         "--contexts", "16", "--decode-steps", "4"],
        capture_output=True, text=True, timeout=600, env=env)
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
    assert lut.meta["versions"]["llama.cpp"] == "0c1e57098" and lut.meta["backend_config"]["dtype"] == "f16"
    assert lut.meta["backend_config"]["threads"] == 1
