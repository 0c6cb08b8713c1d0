"""How many threads a measuring process uses when the user gives none: the one policy every CPU flow
(torch's OpenMP, ggml, ONNX Runtime) follows, because they all meet at a barrier after every op."""

from __future__ import annotations

import os

from amoeba_profile.device.load import CpuLoad, idle_cores
from amoeba_profile.device.lock import measuring_pids


def default_threads(device: str, cap: int, cap_name: str, load: CpuLoad | None = None) -> tuple[int, str]:
    """Intra-op threads when none are given, and why.

    torch's default, one thread per physical core, suits an idle machine only. Its OpenMP kernels
    meet at a barrier after every parallel loop, so a thread that shares its core with another
    process stalls all the others: on the 2-core host, with one other busy process, a build took
    728 s instead of 24 s and its rows were 10-60x off and bimodal; with 1 thread it was normal.
    So on CPU the default is the cores other processes leave idle (``load.idle_cores``, sampled
    for 0.5 s now, before the build), at least 1 and at most ``cap`` (the flow's own default, named ``cap_name``). Processes holding a
    measurement lock are not counted: this build waits for them (``device/lock.py``) before it
    measures. ``OMP_NUM_THREADS``, when set, is the user's choice and stands, as it does on CUDA,
    where the host only feeds the GPU.
    """
    if device.startswith("cuda"):
        return cap, f"{cap_name} (the CPU only feeds the GPU)"
    if os.environ.get("OMP_NUM_THREADS"):
        return cap, f"{cap_name} under OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    free, sample = idle_cores(load or CpuLoad(pids=(os.getpid(), *measuring_pids())))
    threads = min(free, cap)
    return threads, (
        f"{free} of {sample.cores} cores idle (other processes used {sample.others_cores:.1f}), {cap_name} {cap}"
    )
