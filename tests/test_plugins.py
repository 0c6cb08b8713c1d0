"""A flow is a plugin: an installed distribution that registers its adapter under the entry-point
group ``amoeba_profile.backends`` is listed and builds tables, with no edit to this repository."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from amoeba_profile.backends import ENTRY_POINT_GROUP, REGISTRY, get_backend
from amoeba_profile.backends.flows import list_flows
from conftest import FAST_PROTOCOL

from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.plan import BuildPlan
from amoeba_profile.table.lut import load_table

TEMPLATE = Path(__file__).with_name("fake_engine.py")


def _install(site: Path) -> None:
    """What ``pip install examples/flow-plugin`` leaves in site-packages: the module and a
    dist-info whose entry_points.txt names the adapter."""
    shutil.copy(TEMPLATE, site / "plugin_flow.py")
    info = site / "plugin_flow-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-flow\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nplugin-flow = plugin_flow:FakeEngineBackend\n")


def test_an_installed_plugin_is_listed_and_builds_a_table(tmp_path, monkeypatch, tiny_arch):
    site = tmp_path / "site"
    site.mkdir()
    _install(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(REGISTRY, "_loaded", None)  # read the entry points again, as a new process does
    assert REGISTRY["plugin-flow"] == "plugin_flow:FakeEngineBackend"
    assert "pytorch" in REGISTRY  # the project's own flows come through the same group
    assert "plugin-flow" in {flow.name for flow in list_flows()}
    backend = get_backend("plugin-flow")
    plan = BuildPlan(
        tiny_arch, widths=(1.0, 0.5), prompt_lens=(16,), contexts=(16, 32), method="difference", decode_steps=4
    )
    table = load_table(run_build(plan, backend, tmp_path / "lut", FAST_PROTOCOL).path)
    assert table.meta.backend == "fake-engine" and len(table.ok[table.ok.component == "layer"]) > 0
    sys.modules.pop("plugin_flow", None)


def test_the_template_plugin_package_declares_the_entry_point():
    text = (Path(__file__).parents[1] / "examples" / "flow-plugin" / "pyproject.toml").read_text()
    assert f'[project.entry-points."{ENTRY_POINT_GROUP}"]' in text and "fake_engine:FakeEngineBackend" in text
    assert (Path(__file__).parents[1] / "examples" / "flow-plugin" / "fake_engine.py").resolve() == TEMPLATE.resolve()
