"""The onnxruntime backend: the exported graph computes what the eager model computes, through our
greedy loop with IO binding, and a difference table builds end to end through the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
from amoeba_profile.backends import EngineSpec, get_backend
from amoeba_profile.backends.ort.adapter import OrtBackend, OrtConfig, io_names, session_providers

from amoeba_profile.core.errors import BackendUnavailable, UsageError

AVAILABLE = OrtBackend.availability()
needs_ort = pytest.mark.skipif(not AVAILABLE.ok, reason=f"{AVAILABLE.reason} ({AVAILABLE.install_hint})")

# Per-layer widths differ, so every layer has its own past shape.
LAYERS = ((8, 4, 128), (4, 2, 40), (2, 1, 96))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One engine of a per-layer subnet and the eager model with the same random weights."""
    import torch
    from amoeba_profile.backends.pytorch.eager import build_model

    from amoeba_profile.core.arch import ModelArch
    from amoeba_profile.measure.artifacts import ArtifactCache

    arch = ModelArch("tiny", 64, 4, 8, 4, 8, 128, 256, max_position=512)
    spec = EngineSpec(arch, LAYERS, 2, 64, 80)
    backend = get_backend("onnxruntime")
    torch.manual_seed(0)  # compile builds its model first, so the eager copy below gets the same weights
    artifact = ArtifactCache(tmp_path_factory.mktemp("artifacts")).ensure(backend, spec)
    torch.manual_seed(0)
    model, _ = build_model(spec, "cpu", torch.float32, "sdpa")
    engine = backend.load(spec, artifact.path)
    yield engine, model, artifact
    engine.close()


def _eager_greedy(model, ids, past, steps):
    """Last-position logits of each step of eager greedy decoding from ``past`` (a list of k, v)."""
    import torch
    from amoeba_profile.backends.pytorch.eager import cache_keyword
    from transformers import DynamicCache

    cache = DynamicCache(list(zip(past[0::2], past[1::2])))
    keyword = cache_keyword(type(model).forward)
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, use_cache=True, **{keyword: cache})
            logits.append(out.logits[:, -1, :].numpy())
            ids = out.logits[:, -1, :].argmax(-1, keepdim=True)
    return logits


@needs_ort
def test_graph_has_a_past_and_present_per_layer_shape(exported):
    engine, _, artifact = exported
    inputs = {i.name: i.shape for i in engine.session.get_inputs()}
    outputs = {o.name: o.shape for o in engine.session.get_outputs()}
    assert list(inputs) == io_names(engine.spec)[0] and list(outputs) == io_names(engine.spec)[1]
    for index, (_, kv, _) in enumerate(LAYERS):
        assert inputs[f"past_k_{index}"] == ["batch", kv, "past", 8]
        assert outputs[f"present_v_{index}"] == ["batch", kv, "past + seq", 8]
    assert inputs["input_ids"] == ["batch", "seq"] and outputs["logits"] == ["batch", 256]
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert artifact.compiled and manifest["compile_s"] > 0 and manifest["versions"]["onnxruntime"]


@needs_ort
def test_artifact_keeps_the_weight_pool_not_the_weights(exported):
    """The exporter's weight file is replaced by the pool the random weights tile; the logits test
    below proves the rebuilt weights are the exported ones, byte for byte."""
    engine, model, artifact = exported
    files = {p.name for p in artifact.path.iterdir()}
    assert files == {"model.onnx", "weights.json", "weights.npz", "engine.json", "manifest.json"}
    layout = json.loads((artifact.path / "weights.json").read_text())
    weights = sum(p.numel() for p in model.parameters())
    assert len(layout) == len(engine.weights) and layout.pop("model.model.embed_tokens.weight") == "tiled"
    # the linear layers' weights come out transposed; norm weights this small stay inside the graph
    assert set(layout.values()) == {"transposed"}
    with np.load(artifact.path / "weights.npz") as stored:  # the pool and the stored tensors
        assert sum(stored[key].size for key in stored.files) < weights / 3
    assert json.loads((artifact.path / "engine.json").read_text())["weights"] == {"tiled": 1, "transposed": len(layout)}


@needs_ort
def test_weights_pack_and_unpack_byte_for_byte(tmp_path):
    """A tiling, a transposed tiling and a tensor that tiles neither way all come back exact, and
    ONNX Runtime computes the same from them as from the exporter's file."""
    import onnx
    import onnxruntime
    from amoeba_profile.backends.ort.weights import pack, unpack
    from onnx import TensorProto, helper, numpy_helper

    pool = np.random.default_rng(0).standard_normal(6).astype(np.float32)
    weights = {
        "a": np.resize(pool, 20).reshape(4, 5),
        "b": np.ascontiguousarray(np.resize(pool, 20).reshape(5, 4).T),
        "c": np.ones((4, 5), np.float32),
    }
    nodes = [
        helper.make_node("Add", ["x", "a"], ["xa"]),
        helper.make_node("Add", ["xa", "b"], ["xb"]),
        helper.make_node("Mul", ["xb", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "w",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(path),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    x = {"x": np.arange(20, dtype=np.float32).reshape(4, 5)}
    expected = onnxruntime.InferenceSession(str(path)).run(None, x)[0]
    assert pack(path, pool) == {"a": "tiled", "b": "transposed", "c": "stored"}
    assert not (tmp_path / "model.onnx.data").exists()
    names, arrays = unpack(path)
    for name, array in zip(names, arrays):
        assert array.tobytes() == weights[name].tobytes()
    options = onnxruntime.SessionOptions()
    values = [onnxruntime.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    options.add_external_initializers(names, values)
    np.testing.assert_array_equal(onnxruntime.InferenceSession(str(path), options).run(None, x)[0], expected)


@needs_ort
def test_prefill_and_decode_match_the_eager_model(exported):
    """Logits of the prompt and of each greedy step equal eager transformers (fp32), from an empty
    cache and from a random prefix cache: the presents are fed back as the right pasts."""
    import torch

    engine, model, _ = exported
    rng = np.random.default_rng(1)
    for batch, prefix in ((1, 0), (2, 6)):
        ids = rng.integers(0, 256, (batch, 5 if prefix == 0 else 1))
        past = [
            rng.standard_normal(shape, dtype=np.float32)
            for _, kv, _ in LAYERS
            for shape in [(batch, kv, prefix, 8)] * 2
        ]
        expected = _eager_greedy(model, torch.from_numpy(ids), [torch.from_numpy(p) for p in past], 4)
        assert np.std(expected[0]) > 1e-3  # random weights give non-trivial logits
        for steps in range(1, 5):
            out = engine.generate(engine._value(ids), [engine._value(p) for p in past], steps)
            np.testing.assert_allclose(out[0].numpy(), expected[steps - 1], rtol=1e-4, atol=1e-5)
            assert out[1].numpy().tolist() == expected[steps - 1].argmax(-1, keepdims=True).tolist()
            assert out[2].shape() == [batch, 4, prefix + ids.shape[1] + steps - 1, 8]


@needs_ort
def test_ttft_and_tpot_pieces_time_the_greedy_loop(exported):
    """ttft: one request for one token over the prompt. tpot: the n steps after the prompt's
    uncached token, over a prefix cache of context - n/2 tokens; runs restart from the same state."""
    from amoeba_profile.core.timing import TimingProtocol, sample, warm_up

    engine, _, _ = exported
    ttft, tpot = engine.ttft(1, 16), engine.tpot(1, 32, 8)
    assert tpot.prefix == 28 and [p.shape()[2] for p in tpot.pasts] == [29] * 6  # prefix + the uncached token
    assert tpot.ids.shape() == [1, 1] and tpot.ids.data_type() == "tensor(int64)"
    calls = []
    generate = engine.generate
    engine.generate = lambda ids, pasts, n: (
        calls.append((ids.shape(), pasts[0].shape()[2], n)) or generate(ids, pasts, n)
    )
    protocol = TimingProtocol(warmup_min=1, warmup_max=2, samples_per_round=3, min_round_s=0.0)
    try:
        for piece, request in ((ttft, ([1, 16], 0, 1)), (tpot, ([1, 1], 29, 8))):
            calls.clear()
            runs, steps = warm_up(piece, protocol)
            times = sample(piece, protocol, steps)
            assert len(times) == 3 and all(t > 0 for t in times)
            assert calls == [request] * (runs + 3 * steps)  # every run restarts from the same state
        calls.clear()
        assert tpot.sample_ms(3) > 0 and calls == [([1, 1], 29, 8)] * 3
    finally:
        del engine.generate
    assert ttft.max_steps > 1 and tpot.max_steps > 1


@needs_ort
def test_float16_export_runs(tiny_arch, tmp_path):
    """The CUDA default dtype exports too (checked on the CPU provider, which runs float16 graphs)."""
    from amoeba_profile.measure.artifacts import ArtifactCache

    backend = get_backend("onnxruntime", dtype="float16")
    spec = EngineSpec(tiny_arch, ((4, 2, 64),), 1, 32, 34)
    engine = backend.load(spec, ArtifactCache(tmp_path).ensure(backend, spec).path)
    out = engine.generate(engine.random_ids(1, 8), engine.random_pasts(1, 0), 3)
    assert out[0].data_type() == "tensor(float16)" and np.isfinite(out[0].numpy()).all()
    assert out[2].data_type() == "tensor(float16)" and out[2].shape() == [1, 2, 10, 8]
    engine.close()


@needs_ort
def test_an_export_prints_nothing_nobody_can_act_on(tiny_arch, tmp_path, capfd):
    """Without torchvision, every export logged 4 skipped operators and torch.export's LeafSpec
    FutureWarning: ~6 lines per engine through a build's progress bar."""
    import logging
    import warnings

    from amoeba_profile.backends.ort.adapter import _EXPORTER_LOGGER, export_onnx

    class Seen(logging.Handler):  # beside the exporter's own handlers, on its logger
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    seen, logger = Seen(), logging.getLogger(_EXPORTER_LOGGER)
    logger.addHandler(seen)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_onnx(EngineSpec(tiny_arch, ((8, 4, 128),), 1, 16, 32), "float32", tmp_path / "model.onnx")
    finally:
        logger.removeHandler(seen)
    assert (tmp_path / "model.onnx").is_file()
    assert not [line for line in seen.lines if "torchvision" in line], seen.lines
    assert not [w for w in caught if "LeafSpec" in str(w.message) or "axis name" in str(w.message)], [
        str(w.message) for w in caught
    ]
    assert "torchvision" not in capfd.readouterr().err


@needs_ort
def test_out_of_memory_is_recognized_from_a_real_allocation_failure():
    import onnxruntime
    from onnx import TensorProto, helper

    node = helper.make_node(
        "ConstantOfShape", ["shape"], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
    )
    graph = helper.make_graph(
        [node],
        "alloc",
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    session = onnxruntime.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    backend = get_backend("onnxruntime")
    with pytest.raises(Exception) as too_big:
        session.run(None, {"shape": np.array([1 << 50], np.int64)})  # 4 PiB
    assert backend.is_out_of_memory(too_big.value)
    with pytest.raises(Exception) as wrong_input:
        session.run(None, {"shape": np.array([[1]], np.int64)})
    assert not backend.is_out_of_memory(wrong_input.value)


@needs_ort
def test_config_defaults_and_refusals(monkeypatch):
    from amoeba_profile.device import threads
    from amoeba_profile.device.load import Contention

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "idle_cores", lambda load: (1, Contention(1.0, 2, 1, 0.5)))
    backend = get_backend("onnxruntime")
    assert backend.config_dict() == {
        "device": "cpu",
        "provider": "CPUExecutionProvider",
        "dtype": "float32",
        "threads": 1,
        "graph_opt": "all",
    }
    again = type(backend)(**backend.config_dict())
    assert again.config == backend.config and again.clock_name == "perf_counter"
    assert set(backend.versions()) == {"onnxruntime", "onnx", "onnxscript", "torch", "transformers"}
    assert (
        get_backend("onnxruntime", threads=1, dtype="fp16", graph_opt="basic").session_options().intra_op_num_threads
        == 1
    )
    with pytest.raises(UsageError, match="float32 or float16"):
        get_backend("onnxruntime", dtype="bfloat16")
    with pytest.raises(UsageError, match="not in this build"):
        get_backend("onnxruntime", device="cuda", provider="TensorrtExecutionProvider")
    with pytest.raises(UsageError, match="does not run on"):
        get_backend("onnxruntime", provider="CUDAExecutionProvider")
    with pytest.raises(UsageError, match="graph_opt"):
        get_backend("onnxruntime", graph_opt="max")


def test_missing_onnxruntime_is_a_reason_with_an_install_hint(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a)
    )
    available = OrtBackend.availability()
    assert not available.ok and available.reason == "onnxruntime not installed"
    assert ".[onnxruntime]" in available.install_hint
    with pytest.raises(BackendUnavailable, match="onnxruntime not installed"):
        get_backend("onnxruntime")


def test_tensorrt_profile_spans_the_spec(tiny_arch):
    """TensorRT gets one optimization profile from one token over an empty cache to the spec's limits."""
    config = OrtConfig("cuda:1", "TensorrtExecutionProvider", "float16", 1, "all")
    (name, trt), cuda = session_providers(config, EngineSpec(tiny_arch, ((8, 4, 128), (4, 2, 64)), 2, 40, 42))
    assert name == "TensorrtExecutionProvider" and cuda == ("CUDAExecutionProvider", {"device_id": 1})
    assert trt["trt_fp16_enable"] and trt["device_id"] == 1
    assert trt["trt_profile_min_shapes"].startswith("input_ids:1x1,past_k_0:1x4x0x8,past_v_0:1x4x0x8,past_k_1:1x2x0x8")
    assert trt["trt_profile_max_shapes"] == (
        "input_ids:2x40,past_k_0:2x4x42x8,past_v_0:2x4x42x8,past_k_1:2x2x42x8,past_v_1:2x2x42x8"
    )


@needs_ort
def test_build_lut_end_to_end(tmp_path):
    """build-lut --backend onnxruntime fits a difference table from exported whole models."""
    from conftest import TINY_CONFIG

    from amoeba_profile.table.lut import load_one

    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "lut"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "amoeba_profile.cli.main",
            "build-lut",
            "--backend",
            "onnxruntime",
            "--model",
            str(config),
            "--out",
            str(out),
            "--quick",
            "--depths",
            "1,2,4",
            "--widths",
            "1",
            "--prompt-len",
            "16",
            "--contexts",
            "16",
            "--decode-steps",
            "4",
            "--artifacts",
            str(tmp_path / "artifacts"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method: difference (whole-engine flow" in proc.stderr
    lut = load_one(out)
    assert lut.meta.backend == "onnxruntime" and lut.meta.method == "difference"
    assert lut.meta.backend_config["provider"] == "CPUExecutionProvider" and lut.meta.clock == "perf_counter"
    assert lut.meta.versions["onnxruntime"] and lut.meta.fit
    models = lut.frame[lut.frame.component == "model"]
    assert set(models.num_layers) == {0, 1, 2, 4} and (models.status == "ok").all()
    assert (models.compile_s > 0).any()  # four engines exported
    layers = lut.ok[lut.ok.component == "layer"]
    assert {(r.heads, r.kv_heads, r.ffn, r.phase) for r in layers.itertuples()} == {
        (8, 4, 128, "prefill"),
        (8, 4, 128, "decode"),
    }
    assert len(list((tmp_path / "artifacts" / "onnxruntime").glob("*/model.onnx"))) == 4
