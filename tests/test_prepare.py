"""Every build option is checked before a journal exists: a mistake must not block the corrected command."""

import pytest

from amoeba_profile.core.errors import UsageError
from amoeba_profile.device import resolve_device
from amoeba_profile.measure.prepare import prepare_build


def test_spec_sheet_device_names_predict(tiny_arch):
    with pytest.raises(UsageError, match=r"'rtx-a5000' is a spec-sheet entry.*add --predict"):
        prepare_build(tiny_arch, device="rtx-a5000")
    with pytest.raises(UsageError, match=r"unknown device 'gpu'.*auto, cpu or cuda\[:N\]"):
        prepare_build(tiny_arch, device="gpu")


def test_a_flow_off_its_devices_and_an_unknown_flow_are_refused(tiny_arch):
    with pytest.raises(UsageError, match=r"'tensorrt-llm' runs on \['cuda'\], not 'cpu'"):
        prepare_build(tiny_arch, backend="tensorrt-llm", device="cpu")
    with pytest.raises(UsageError, match="unknown backend 'vllm'"):
        prepare_build(tiny_arch, backend="vllm", device="cpu")


def test_plan_method_dtype_and_threads_are_checked(tiny_arch):
    with pytest.raises(UsageError, match="unknown method"):
        prepare_build(tiny_arch, device="cpu", method="guess")
    with pytest.raises(UsageError, match="depths"):
        prepare_build(tiny_arch, device="cpu", method="difference", depths=(1, 9, 12))
    with pytest.raises(UsageError, match="unknown dtype"):
        prepare_build(tiny_arch, device="cpu", dtype="float8")
    with pytest.raises(UsageError, match="threads"):
        prepare_build(tiny_arch, device="cpu", threads=0)


def test_auto_device_and_reasons(tiny_arch):
    import torch

    build = prepare_build(tiny_arch, widths=(1.0, 0.5), prompt_lens=(16,), contexts=(16, 32))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert build.backend.device == expected and build.device_reason.startswith("auto: torch sees")
    assert build.plan.method in ("components", "calibrated", "difference") and build.method_reason
    assert build.plan.contexts == (16, 32) and build.plan.widths == (1.0, 0.5)
    assert resolve_device("cpu") == ("cpu", "requested")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="torch sees 0 CUDA device"):
            resolve_device("cuda:0")


def test_depths_are_refused_where_no_difference_fit_uses_them(tiny_arch):
    with pytest.raises(
        UsageError,
        match=r"^--depths sets the model depths the difference method fits; this build "
        r"uses the components method \(--method components\)",
    ):
        prepare_build(tiny_arch, device="cpu", method="components", depths=(1, 2, 4))
    assert prepare_build(tiny_arch, device="cpu", method="difference", depths=(1, 2, 4)).plan.fit_depths() == (1, 2, 4)


def test_threads_above_the_cores_are_capped_warned_and_recorded(tiny_arch, tmp_path):
    from amoeba_profile.device.load import CpuLoad

    cores = CpuLoad().cores()
    build = prepare_build(
        tiny_arch, device="cpu", threads=cores + 62, out_dir=tmp_path, prompt_lens=(16,), contexts=(16,)
    )
    assert build.backend.config_dict()["threads"] == cores  # what the sidecar records is what runs
    assert build.threads_reason == f"threads: {cores} (capped from --threads {cores + 62})"
    assert build.warnings == (
        f"--threads {cores + 62} is more than the {cores} cores this process may run on; "
        f"measuring with {cores} threads (recorded as such)",
    )
    exact = prepare_build(tiny_arch, device="cpu", threads=cores, out_dir=tmp_path, prompt_lens=(16,), contexts=(16,))
    assert exact.warnings == () and exact.backend.config_dict()["threads"] == cores
