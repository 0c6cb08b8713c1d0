"""The flow registry: every flow the project knows, one capability definition per flow, and the listing."""

import json

import pytest
from amoeba_profile.backends import REGISTRY, Availability, backend_class
from amoeba_profile.backends.flows import MEASURING, UNAVAILABLE, flow_capabilities, list_flows, roofline_profiles
from fake_engine import FakeEngineBackend

from amoeba_profile.cli.report import backends_rows
from amoeba_profile.core.errors import UsageError


class MissingLibraryBackend(FakeEngineBackend):
    """A registered adapter whose library is absent."""

    @classmethod
    def availability(cls) -> Availability:
        return Availability(False, "fakelib is not installed", "pip install fakelib")


class RunOnOrin(FakeEngineBackend):
    """An adapter with a recorded run on an Orin NX."""

    verified_on = ("orin-nx-16gb",)


class NeverRun(FakeEngineBackend):
    """An adapter never run on hardware."""

    experimental_reason = "written from the library's docs"


def test_every_known_flow_is_listed_with_its_kind():
    flows = {f.name: f for f in list_flows()}
    assert list(flows)[: len(REGISTRY)] == list(REGISTRY)  # every registered plugin, in registry order
    # the project's own flows are plugins of the same entry-point group as a third party's
    assert {"pytorch", "llama.cpp", "pytorch-compiled", "onnxruntime", "tensorrt-llm", "mlc-llm"} <= set(REGISTRY)
    assert flows["pytorch"].status == MEASURING and flows["pytorch"].roofline_profile
    assert flows["llama.cpp"].status in (MEASURING, UNAVAILABLE) and flows["llama.cpp"].capabilities.per_layer_heads
    trt = flows["tensorrt-llm"]  # an adapter: measuring where TensorRT-LLM and a GPU are, else unavailable
    assert trt.status in (MEASURING, UNAVAILABLE) and trt.roofline_profile
    assert trt.install_hint.startswith("pip install tensorrt-llm") and trt.capabilities.methods == ("difference",)
    mlc = flows["mlc-llm"]  # a registered adapter; measuring only where mlc_llm and a CUDA GPU are
    assert (
        mlc.status in (MEASURING, UNAVAILABLE) and mlc.roofline_profile and mlc.capabilities.methods == ("difference",)
    )
    if mlc.status == UNAVAILABLE:
        assert "mlc_llm" in mlc.reason and "pip install" in mlc.install_hint and "mlc-llm-nightly" in mlc.install_hint


def test_capabilities_have_one_definition_per_flow():
    # a roofline profile is the flow's own declaration, from its folder, keyed by its registered name
    assert set(roofline_profiles()) == {"pytorch", "tensorrt-llm", "mlc-llm"}
    assert flow_capabilities("pytorch") == backend_class("pytorch").capabilities()
    assert flow_capabilities("tensorrt-llm") == backend_class("tensorrt-llm").capabilities()
    trt, mlc = flow_capabilities("tensorrt-llm"), flow_capabilities("mlc-llm")
    assert (trt.per_layer_heads, trt.per_layer_ffn) == (False, True)
    assert (mlc.per_layer_heads, mlc.per_layer_ffn) == (False, False)
    for flow in list_flows():
        assert flow.capabilities == flow_capabilities(flow.name)
    with pytest.raises(UsageError, match="unknown flow 'vllm'"):
        flow_capabilities("vllm")


def test_maturity_is_the_adapters_own_declaration(monkeypatch):
    """The label comes from the adapter class, not from a list: an adapter that names a device it ran
    on is verified there; one that names none is experimental, with its reason."""
    monkeypatch.setitem(REGISTRY, "ran", "test_flows:RunOnOrin")
    monkeypatch.setitem(REGISTRY, "never-ran", "test_flows:NeverRun")
    rows = {r["name"]: r for r in backends_rows()}
    assert (rows["ran"]["maturity"], rows["ran"]["verified"], rows["ran"]["maturity_note"]) == (
        "verified on orin-nx-16gb",
        True,
        "",
    )
    assert (rows["never-ran"]["maturity"], rows["never-ran"]["maturity_note"]) == (
        "experimental: not yet run on hardware",
        "written from the library's docs",
    )
    flows = {f.name: f for f in list_flows()}
    assert not flows["tensorrt-llm"].maturity.verified and not flows["mlc-llm"].maturity.verified
    assert flows["pytorch"].maturity.label == "verified on cpu, cuda"


def test_registered_adapter_without_its_library_is_unavailable(monkeypatch):
    monkeypatch.setitem(REGISTRY, "missing-lib", "test_flows:MissingLibraryBackend")
    row = next(r for r in backends_rows() if r["name"] == "missing-lib")
    assert (row["status"], row["available"]) == (UNAVAILABLE, False)
    assert (row["reason"], row["install_hint"]) == ("fakelib is not installed", "pip install fakelib")
    assert row["roofline_profile"] is False
    json.dumps(row)  # one flat, serializable schema
