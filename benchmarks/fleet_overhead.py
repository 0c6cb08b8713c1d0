"""What does the fleet cost, and what does it gain? Two builds, three ways, wall times printed.

Two small models (``--hidden``, ``--layers``) are built as two "devices" would build them:
1. locally, one after another (``run_build`` twice in this process: the baseline);
2. on a local Ray cluster with one worker node, one device label building both models, so Ray
   runs the builds one unit at a time (the fleet's own overhead: task submission, result transfer,
   journaling on the driver, worker start-up);
3. on the same cluster with two worker nodes, one per label, measuring at once (the gain).
Both "devices" are this machine; each node gets its own measurement-lock folder so that the two
measure at once as two machines would (on one machine they share cores: with one thread per
build, a 2-core host has room for both). Cluster start-up is timed apart.

    OMP_NUM_THREADS=1 python benchmarks/fleet_overhead.py [--hidden 256] [--layers 4] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per build, both builds fit 2 cores

from amoeba_profile.core.timing import TimingProtocol
from amoeba_profile.fleet.driver import run_fleet
from amoeba_profile.fleet.plan import FleetBuild, plan_builds
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.prepare import prepare_build

GRID = {"widths": ["1", "3/4", "1/2"], "prompt_lens": [32], "contexts": [32, 64]}


def configs(root: Path, hidden: int, layers: int) -> None:
    for name, width in (("bench-a", hidden), ("bench-b", hidden // 2)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(
            json.dumps(
                {
                    "model_type": "llama",
                    "hidden_size": width,
                    "num_hidden_layers": layers,
                    "num_attention_heads": 8,
                    "num_key_value_heads": 4,
                    "intermediate_size": 3 * width,
                    "vocab_size": 1024,
                    "max_position_embeddings": 512,
                }
            )
        )


def builds(root: Path, devices: dict[str, list[str]]) -> list[FleetBuild]:
    """The two models' builds, by device label; one thread each."""
    return plan_builds(
        {
            "flows": ["pytorch"],
            "grid": GRID,
            "devices": {label: {"models": models, "threads": 1} for label, models in devices.items()},
        },
        root,
        "benchmark plan",
    )


def local(root: Path, protocol: TimingProtocol) -> float:
    start = time.perf_counter()
    for build in builds(root, {"here": ["bench-a", "bench-b"]}):
        prepared = prepare_build(build.arch, backend=build.backend, threads=build.threads, **build.plan_options)
        run_build(prepared.plan, prepared.backend, root / "local", protocol)
    return time.perf_counter() - start


def add_node(cluster, labels: list[str]):
    """A worker node advertising ``labels``, with a measurement-lock folder of its own (inherited by
    its raylet and workers from this process's environment at start)."""
    os.environ["AMOEBA_LOCK_DIR"] = tempfile.mkdtemp(prefix="fleet-bench-locks-")
    return cluster.add_node(
        num_cpus=1, resources={f"device:{label}": 1 for label in labels}, object_store_memory=100 << 20
    )


def fleet(root: Path, protocol: TimingProtocol, devices: dict[str, list[str]], out: str) -> float:
    start = time.perf_counter()
    outcomes = run_fleet(builds(root, devices), root / out, protocol, poll_s=0.1)
    wall = time.perf_counter() - start
    failed = [o.message for o in outcomes if o.status != "written"]
    if failed:
        raise SystemExit("; ".join(failed))
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--full", action="store_true", help="the default timing protocol instead of --quick's")
    args = parser.parse_args()
    protocol = TimingProtocol() if args.full else TimingProtocol.quick()

    import ray
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as folder:
        root = Path(folder)
        configs(root, args.hidden, args.layers)
        t_local = local(root, protocol)
        started = time.perf_counter()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 << 20},
        )
        ray.init(address=cluster.address)
        shared = add_node(cluster, ["one"])
        t_start = time.perf_counter() - started
        try:
            t_serial = fleet(root, protocol, {"one": ["bench-a", "bench-b"]}, "serial")
            cluster.remove_node(shared)
            add_node(cluster, ["two-a"])
            add_node(cluster, ["two-b"])
            # Worker processes start (and import torch) on first use in both runs alike.
            t_parallel = fleet(root, protocol, {"two-a": ["bench-a"], "two-b": ["bench-b"]}, "parallel")
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(
        f"two builds ({args.hidden}/{args.hidden // 2} hidden, {args.layers} layers, "
        f"{'full' if args.full else 'quick'} protocol), wall seconds:"
    )
    print(f"  local, one after another:            {t_local:7.1f}")
    print(f"  fleet, one device, both builds:      {t_serial:7.1f}  (overhead {t_serial - t_local:+.1f} s)")
    print(f"  fleet, two devices, at once:         {t_parallel:7.1f}  (speed-up x{t_local / t_parallel:.2f})")
    print(f"  cluster start (head + 1 node):       {t_start:7.1f}  (not in the fleet times)")


if __name__ == "__main__":
    main()
