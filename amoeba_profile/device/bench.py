"""Micro-benchmarks: what the device really does at LLM shapes, beside its spec-sheet peak.

- memory bandwidth: a large tensor copy (read + write bytes / time);
- GEMV (decode shape: one token x hidden -> ffn) as achieved weight-streaming bandwidth and FLOP/s;
- GEMM (prefill shape: prompt tokens x hidden -> ffn) as FLOP/s per dtype;
- dispatch overhead: the cost of one tiny op (CPU dispatch, or kernel launch + sync on CUDA).
Timed with the same Clock and protocol as tables.
"""

from __future__ import annotations

from typing import Any, Callable

from amoeba_profile.core.timing import Measurement, TimingProtocol, sample, warm_up
from amoeba_profile.device.clock import Clock, ClockedPiece
from amoeba_profile.device.specs import DeviceSpec

Progress = Callable[[int, int, str], None]  # (done, total, what runs next)
_PROTOCOL = TimingProtocol(warmup_min=2, warmup_max=10, rounds=1, samples_per_round=7, min_round_s=0.2)


def _median_ms(fn, clock: Clock, protocol: TimingProtocol) -> float:
    piece = ClockedPiece(clock, fn)
    _, steps = warm_up(piece, protocol)
    return Measurement.from_samples(sample(piece, protocol, steps)).median_ms


def _fraction(value: float | None, peak: float | None) -> float | None:
    return None if value is None or not peak else round(value / peak, 3)


def run_microbenchmarks(
    device: str = "cpu",
    dtypes: tuple[str, ...] | None = None,
    spec: DeviceSpec | None = None,
    hidden: int = 4096,
    ffn: int = 11008,
    prompt_len: int = 512,
    copy_mb: int = 1024,
    protocol: TimingProtocol = _PROTOCOL,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Figures in GB/s, TFLOP/s and microseconds; ``*_fraction`` = measured / spec-sheet peak.
    ``progress`` hears of each benchmark as it starts (they take tens of seconds in all)."""
    import torch

    clock = Clock(device)
    dtypes = dtypes or (("float16", "bfloat16", "float32") if device.startswith("cuda") else ("float32", "bfloat16"))
    steps = [f"memory bandwidth ({copy_mb} MB copy)", "dispatch overhead"] + [
        f"{name} GEMV and GEMM ({hidden} x {ffn}, {prompt_len} tokens)" for name in dtypes
    ]

    def step(done: int) -> None:
        if progress:
            progress(done, len(steps), steps[done] if done < len(steps) else "done")

    peak_bw = spec.mem_bw_gbps if spec else None
    out: dict[str, Any] = {
        "device": device,
        "spec": spec.slug if spec else None,
        "clock": clock.name,
        "shapes": {"hidden": hidden, "ffn": ffn, "prompt_len": prompt_len, "copy_mb": copy_mb},
    }

    step(0)
    bw = _copy_bandwidth_gbps(device, copy_mb, clock, protocol)
    out["memory_bw_gbps"] = round(bw, 2)
    out["memory_bw_fraction"] = _fraction(bw, peak_bw)

    step(1)
    tiny = torch.ones(1, device=device)
    calls = 100
    per_call_ms = _median_ms(lambda: [tiny.add_(0) for _ in range(calls)], clock, protocol) / calls
    out["dispatch_overhead_us"] = round(per_call_ms * 1e3, 2)

    out["matmul"] = {}
    for index, name in enumerate(dtypes):
        step(2 + index)
        gemv_ms, gemm_ms = _matmul_ms(getattr(torch, name), device, hidden, ffn, prompt_len, clock, protocol)
        weight_bytes = hidden * ffn * getattr(torch, name).itemsize
        gemv_bw = weight_bytes / (gemv_ms * 1e-3) / 1e9
        gemm_tflops = 2 * prompt_len * hidden * ffn / (gemm_ms * 1e-3) / 1e12
        peak = spec.peak_tflops(name) if spec else None
        out["matmul"][name] = {
            "gemv_ms": round(gemv_ms, 4),
            "gemv_bw_gbps": round(gemv_bw, 2),
            "gemv_bw_fraction": _fraction(gemv_bw, peak_bw),
            "gemv_tflops": round(2 * hidden * ffn / (gemv_ms * 1e-3) / 1e12, 4),
            "gemm_ms": round(gemm_ms, 3),
            "gemm_tflops": round(gemm_tflops, 3),
            "gemm_fraction": _fraction(gemm_tflops, peak),
        }
    step(len(steps))
    return out


def _copy_bandwidth_gbps(device: str, copy_mb: int, clock: Clock, protocol: TimingProtocol) -> float:
    """Read + write bytes of a large fp32 copy per second (buffers freed on return)."""
    import torch

    src = torch.ones(copy_mb << 18, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), clock, protocol)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _matmul_ms(
    dtype, device: str, hidden: int, ffn: int, prompt_len: int, clock: Clock, protocol: TimingProtocol
) -> tuple[float, float]:
    """(GEMV ms for one token, GEMM ms for ``prompt_len`` tokens) through an ffn x hidden weight."""
    import torch

    weight = torch.ones(ffn, hidden, dtype=dtype, device=device) * 0.01
    one = torch.ones(1, hidden, dtype=dtype, device=device)
    many = torch.ones(prompt_len, hidden, dtype=dtype, device=device)
    gemv = _median_ms(lambda: torch.nn.functional.linear(one, weight), clock, protocol)
    gemm = _median_ms(lambda: torch.nn.functional.linear(many, weight), clock, protocol)
    return gemv, gemm
