"""The public API: the names the README documents, importable from the package, without torch."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import synthetic_lut

import amoeba_profile as ap
from amoeba_profile.table.lut import table_path, write_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_api_section() -> str:
    text = README.read_text()
    return text[text.index("## Python API") : text.index("## Backends")]


def test_every_documented_name_is_exported():
    section = _readme_api_section()
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    documented = {name for cell in first_cells for name in re.findall(r"`([A-Za-z_]+)`", cell)}
    used = set(re.findall(r"\bap\.([A-Za-z_]+)", section))
    assert used and used <= set(ap.__all__)
    assert (
        {
            "resolve_arch",
            "prepare_build",
            "run_build",
            "load_table",
            "Predictor",
            "select",
            "Workload",
            "AmoebaError",
            "reseal",
        }
        <= documented
        <= set(ap.__all__)
    )
    for name in ap.__all__:
        assert getattr(ap, name) is not None, name
    assert callable(ap.select) and ap.select.__module__ == "amoeba_profile.selection.picker"


def test_import_loads_no_torch():
    code = "import sys, amoeba_profile; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_readme_snippet_on_a_tiny_table(tmp_path, tiny_arch):
    """The README's snippet, with a written tiny table in place of the measured TinyLlama one."""
    lut = synthetic_lut(
        tiny_arch,
        lambda h, p, c: 0.3 * h if p == "prefill" else 0.05 * h + 0.001 * c,
        lambda f, p: 0.01 * f if p == "prefill" else 0.004 * f,
        lambda p, c: 2.0,
        meta={"dtype": "float32"},
    )
    path = table_path(tmp_path, "cpu-test", "pytorch", "tiny", "float32")
    write_table(path, lut.frame, lut.meta)

    build = ap.prepare_build(tiny_arch, device="cpu", widths=(1.0, 0.5), prompt_lens=(16,), contexts=(16, 64))
    assert isinstance(build, ap.PreparedBuild) and build.plan.arch == tiny_arch and build.backend.device == "cpu"
    predictor = ap.Predictor(ap.load_table(path))
    prediction = predictor.predict(ap.Subnet.uniform(tiny_arch, 3, 0.5), ap.Workload(prompt_len=16, gen_len=20))
    assert prediction.metric("tpot") == prediction.tpot_ms > 0 and prediction.source_of("tpot") == "interpolated"
    space = ap.DesignSpace(tiny_arch, (2, 3, 4), (1.0, 0.5)).subnets()
    selection = ap.select(predictor, space, ap.Workload(prompt_len=16, gen_len=20), "tpot", budget_ms=100)
    assert selection.metric == "tpot_ms" and selection.pick.subnet.num_layers == 4
    assert selection.pick.latency_ms <= 100 and selection.pick.source == "interpolated"
    with pytest.raises(ap.UsageError, match="unknown metric"):
        ap.select(predictor, space, ap.Workload(prompt_len=16, gen_len=20), "speed", budget_ms=100)
