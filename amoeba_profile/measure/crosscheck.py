"""Cross-checks: a finished table's full-model prediction against the flow's own benchmark tool.

A table predicts a model by composing rows measured through this project's workpieces (prefill at
the prompt length; decode steps interpolated over the measured contexts and summed over the
generation). A cross-check times the same full model at one workload with the tool users of that
flow benchmark with - a code path that shares none of those workpieces - and reports how far the
two agree, per metric, as ``100 * (predicted - tool) / tool``:

| flow | tool | ``Backend.crosscheck_tool`` in |
|---|---|---|
| pytorch | optimum-benchmark-style ``generate()`` timing: ``min_new_tokens = max_new_tokens``, ``time.perf_counter`` around each call, ttft from a 1-token generate, tpot = (e2e(N) - ttft) / (N - 1) | ``backends/pytorch/eager.py`` |
| llama.cpp | ``llama-bench`` (pp test for ttft, tg test of N - 1 tokens at depth P for tpot); ``llama-batched-bench`` at batch > 1 | ``backends/llama_cpp/adapter.py`` |
| tensorrt-llm | ``trtllm-bench latency`` (its report's TTFT and TPOT medians) | ``backends/tensorrt_llm/adapter.py`` |
| mlc-llm | ``python -m mlc_llm.bench`` (its CSV's TTFT and TPOT medians) | ``backends/mlc_llm/adapter.py`` |

The tool's definitions differ in details (each ``ToolResult.definitions`` names them: llama-bench
samples no token, the serving tools time their own request handling), so agreement within a few
percent is the expectation, not zero. The backend is rebuilt from the table's sidecar (same device,
config and library versions, ``validate.table_backend``) and the tool runs under the device's
measurement lock. Each cross-check is appended to the sidecar's ``crosschecks`` list, written
under the table lock with the table writer (``lut.write_table``), with the CSV's SHA-256 at the time
so a later rebuild of the table does not inherit it silently.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from amoeba_profile.backends import ToolResult
from amoeba_profile.core.errors import LutError, UsageError
from amoeba_profile.core.files import Notice, table_lock
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.workload import Workload
from amoeba_profile.device.quiet import BusyPolicy, quiet_machine
from amoeba_profile.measure.artifacts import default_root
from amoeba_profile.measure.validate import table_backend
from amoeba_profile.selection.predict import Predictor
from amoeba_profile.table.lut import Lut, load_table, write_table

MAX_RAW_CHARS = 200_000  # a tool's raw output kept in the sidecar; longer output is cut with a note
DEFAULT_GEN_LEN = 128


@dataclass(frozen=True)
class Crosscheck:
    """One comparison of a table's prediction for the full model with the flow's own tool."""

    table: Path
    table_sha256: str
    backend: str
    device_slug: str
    subnet: Subnet
    workload: Workload
    stat: str
    predicted_ms: dict[str, float]
    tool: ToolResult
    versions: dict[str, Any]
    at: str

    @property
    def measured_ms(self) -> dict[str, float]:
        return {"ttft_ms": self.tool.ttft_ms, "tpot_ms": self.tool.tpot_ms}

    @property
    def agreement_pct(self) -> dict[str, float]:
        """Per metric, 100 * (predicted - tool) / tool: positive where the table predicts slower."""
        return {m: 100 * (self.predicted_ms[m] - v) / v for m, v in self.measured_ms.items()}

    def to_dict(self) -> dict[str, Any]:
        raw = (
            self.tool.raw
            if len(self.tool.raw) <= MAX_RAW_CHARS
            else (self.tool.raw[:MAX_RAW_CHARS] + f"\n[cut: {len(self.tool.raw)} characters in all]")
        )
        return {
            "at": self.at,
            "table_sha256": self.table_sha256,
            "backend": self.backend,
            "device_slug": self.device_slug,
            "subnet": self.subnet.label,
            "subnet_id": self.subnet.id,
            "workload": {
                "batch": self.workload.batch,
                "prompt_len": self.workload.prompt_len,
                "gen_len": self.workload.gen_len,
            },
            "stat": self.stat,
            "predicted_ms": self.predicted_ms,
            "tool_ms": self.measured_ms,
            "agreement_pct": self.agreement_pct,
            "versions": self.versions,
            "tool": {**self.tool.to_dict(), "raw": raw},
        }


def default_workload(lut: Lut) -> Workload:
    """A request the table covers without extrapolating: its batch, its longest prompt length that is
    no shorter than its shortest decode context, and as many new tokens (at most 128) as its decode
    contexts reach from there."""
    grid = lut.grid
    prompts, contexts = sorted(grid.prompt_lens), sorted(grid.contexts)
    if not prompts or not contexts:
        raise LutError(
            f"{lut.path}: the sidecar's grid names no prompt lengths or contexts; pass --prompt-len and --gen-len"
        )
    usable = [p for p in prompts if p >= contexts[0]] or prompts
    prompt = max(usable)
    gen = max(2, min(DEFAULT_GEN_LEN, contexts[-1] - prompt + 2))
    return Workload(grid.batch, prompt, gen)


def run_crosscheck(
    path: Path | str,
    prompt_len: int | None = None,
    gen_len: int | None = None,
    repetitions: int = 5,
    stat: str = "median",
    busy: BusyPolicy | None = None,
    notice: Notice | None = None,
    work_root: Path | None = None,
) -> Crosscheck:
    """Predict the full model of the table at ``path`` and time it with the flow's own tool.

    The workload defaults to ``default_workload``; ``work_root`` holds the tool's model files while it
    runs (default: the artifact cache's root, as large as the artifacts a build writes)."""
    path = Path(path)
    lut = load_table(path)
    if repetitions < 1:
        raise UsageError(f"--repetitions must be >= 1, got {repetitions}")
    if prompt_len is None or gen_len is None:
        base = default_workload(lut)
        prompt_len = base.prompt_len if prompt_len is None else prompt_len
        gen_len = base.gen_len if gen_len is None else gen_len
    workload = Workload(lut.grid.batch, prompt_len, gen_len)
    if workload.gen_len < 2:
        raise UsageError("a cross-check compares tpot too: --gen-len must be >= 2")
    arch = lut.arch
    subnet = Subnet.uniform(arch, arch.num_layers, 1.0)
    prediction = Predictor(lut).predict(subnet, workload, stat)  # OutOfRange before any tool runs
    backend = table_backend(path, lut)
    root = Path(work_root) if work_root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    with quiet_machine(
        backend.device,
        lut.device_slug,
        backend.host_cores(),
        f"crosscheck {path}",
        busy,
        notice or (lambda message: None),
    ):
        with tempfile.TemporaryDirectory(prefix="crosscheck-", dir=root) as work_dir:
            tool = backend.crosscheck_tool(arch, workload, Path(work_dir), repetitions)
    for name, value in (("ttft_ms", tool.ttft_ms), ("tpot_ms", tool.tpot_ms)):
        if not (math.isfinite(value) and value > 0):
            raise LutError(f"{tool.tool} reported {name} = {value!r}; no agreement can be computed")
    return Crosscheck(
        path,
        lut.meta.content_sha256 or "",
        backend.name,
        lut.device_slug,
        subnet,
        workload,
        stat,
        {"ttft_ms": prediction.ttft_ms, "tpot_ms": prediction.tpot_ms, "e2e_ms": prediction.e2e_ms},
        tool,
        backend.versions(),
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def store(check: Crosscheck, notice: Notice | None = None) -> None:
    """Append ``check`` to its table's sidecar under ``crosschecks``, under the table lock. A table
    rewritten since the check ran (another SHA-256) is refused: the check belongs to other rows."""
    with table_lock(check.table, notice=notice):
        lut = load_table(check.table)
        if lut.meta.content_sha256 != check.table_sha256:
            raise LutError(f"{check.table}: the table changed while the cross-check ran; run it again")
        lut.meta.crosschecks = [*(lut.meta.crosschecks or []), check.to_dict()]
        write_table(check.table, lut.frame, lut.meta)  # the rows as loaded: the CSV comes out byte for byte
