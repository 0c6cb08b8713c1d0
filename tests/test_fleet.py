"""Fleet profiling: the plan (YAML -> builds, no Ray), the refusal of foreign results, and real
builds on a local Ray cluster whose worker nodes pose as device kinds through custom resources.

The Ray tests start one head node (no CPUs, so nothing of ours runs there) for the module and add
their own worker nodes; each node is a separate raylet with its own worker processes, so removing
one kills its measurements as a dead machine would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_PROTOCOL, TINY_CONFIG

from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.schema import meta_fields
from amoeba_profile.device import cpu_slug
from amoeba_profile.fleet.driver import refusal
from amoeba_profile.fleet.plan import flags_builds, load_fleet_plan, plan_builds
from amoeba_profile.fleet.worker import UnitResult
from amoeba_profile.measure.build import run_build
from amoeba_profile.measure.prepare import prepare_build
from amoeba_profile.table.lut import load_table, sidecar_path

GRID = {"widths": ["1", "1/2"], "prompt_lens": [16], "contexts": [16]}


def _configs(root: Path) -> None:
    """Two tiny 2-layer models (hidden 64 and 128): two tables, even from one machine's slug."""
    for name, hidden in (("tiny64", 64), ("tiny128", 128)):
        (root / name).mkdir()
        config = {**TINY_CONFIG, "hidden_size": hidden, "num_hidden_layers": 2, "intermediate_size": 2 * hidden}
        (root / name / "config.json").write_text(json.dumps(config))


# ---- the plan, without Ray ------------------------------------------------------------------------


def test_a_yaml_plan_lists_one_build_per_device_flow_and_model(tmp_path):
    _configs(tmp_path)
    plan = tmp_path / "fleet.yaml"
    plan.write_text("""
flows: [pytorch]
models: [tiny64, tinyllama-1.1b]
grid: {widths: ["1", "3/4"], prompt_lens: [16], contexts: [16, 32], whole: ["2x1"]}
devices:
  rtx-a5000: {device: cuda, dtype: float16, models: [tiny64], flows: [pytorch, onnxruntime]}
  orin-nx-16gb: {threads: 4, grid: {contexts: [64]}, method: difference}
""")
    builds = load_fleet_plan(plan)
    assert [(b.label, b.backend, b.arch.name) for b in builds] == [
        ("rtx-a5000", "pytorch", "tiny64"),
        ("rtx-a5000", "onnxruntime", "tiny64"),
        ("orin-nx-16gb", "pytorch", "tiny64"),
        ("orin-nx-16gb", "pytorch", "tinyllama-1.1b"),
    ]
    a5000, orin = builds[0], builds[2]
    assert (a5000.device, a5000.dtype, a5000.threads, a5000.method) == ("cuda", "float16", None, None)
    assert (orin.device, orin.dtype, orin.threads, orin.method) == ("auto", None, 4, "difference")
    assert a5000.plan_options["widths"] == (1.0, 0.75) and a5000.plan_options["contexts"] == (16, 32)
    assert orin.plan_options["contexts"] == (64,) and orin.plan_options["prompt_lens"] == (16,)  # merged per key
    [whole] = a5000.plan_options["whole"]
    assert (whole.num_layers, whole.layers[0].heads) == (2, TINY_CONFIG["num_attention_heads"])
    assert a5000.arch.hidden_size == 64 and a5000.name == "rtx-a5000: tiny64 on pytorch"


def test_flags_build_every_device_flow_and_model(tmp_path):
    builds = flags_builds(["a", "b"], ["pytorch"], ["tinyllama-1.1b"])
    assert [(b.label, b.backend, b.arch.name, b.plan_options) for b in builds] == [
        ("a", "pytorch", "tinyllama-1.1b", {}),
        ("b", "pytorch", "tinyllama-1.1b", {}),
    ]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"devices": [], "flows": ["pytorch"], "models": ["tinyllama-1.1b"]}, "at least one device"),
        (
            {"devices": ["a"], "flows": ["pytorch"], "models": ["tinyllama-1.1b"], "grids": {}},
            "unknown field `grids`; known fields: ['devices', 'flows', 'grid'",
        ),
        (
            {"devices": {"a": {"dtyp": "f16"}}, "flows": ["pytorch"], "models": ["tinyllama-1.1b"]},
            "device 'a': Object contains unknown field `dtyp`",
        ),
        ({"devices": ["a b"], "flows": ["pytorch"], "models": ["tinyllama-1.1b"]}, "device label"),
        ({"devices": ["a"], "models": ["tinyllama-1.1b"]}, "'flows' must name at least one"),
        ({"devices": ["a"], "flows": ["pytorch"], "models": ["tinyllama-1.1b", "tinyllama-1.1b"]}, "listed twice"),
        (
            {"devices": ["a"], "flows": ["pytorch"], "models": ["tinyllama-1.1b"], "grid": {"contexts": [0]}},
            "grid.contexts",
        ),
        ({"devices": ["a"], "flows": ["pytorch"], "models": ["tinyllama-1.1b"], "grid": {"widths": ["2"]}}, "(0, 1]"),
        ({"devices": ["a"], "flows": ["pytorch"], "models": ["no-such-model"]}, "unknown model"),
        ([1, 2], "Expected `object`, got `array`; known fields: ['devices'"),
        # types and bounds (PlanFile, PlanDevice, PlanGrid) name the key and the value
        (
            {"devices": {"a": {"threads": "two"}}, "flows": ["pytorch"], "models": ["tinyllama-1.1b"]},
            "device 'a': field 'threads'='two': Expected `int | null`, got `str`",
        ),
        (
            {"devices": ["a"], "flows": ["pytorch"], "models": ["tinyllama-1.1b"], "grid": {"batch": [1, 2]}},
            "plan.yaml: field 'grid.batch'=[1, 2]: Expected `int`, got `array`",
        ),
        (
            {"devices": {"a": {"grid": {"contexts": [16, 1.5]}}}, "flows": ["pytorch"], "models": ["tinyllama-1.1b"]},
            "device 'a': field 'grid.contexts[1]'=1.5: Expected `int`, got `float`",
        ),
        (
            {"devices": {4090: {}}, "flows": ["pytorch"], "models": ["tinyllama-1.1b"]},
            "a key of 'devices': Expected `str`",
        ),
    ],
)
def test_a_bad_plan_is_refused_naming_what_is_wrong(tmp_path, data, message):
    with pytest.raises(UsageError, match="plan.yaml") as caught:
        plan_builds(data, tmp_path, "plan.yaml")
    assert message in str(caught.value)


def test_a_plan_that_is_not_yaml_is_refused(tmp_path):
    plan = tmp_path / "fleet.yaml"
    plan.write_text("devices: [a\nflows: ]")
    with pytest.raises(UsageError, match="not a readable YAML"):
        load_fleet_plan(plan)


def test_results_from_another_device_or_other_versions_are_refused():
    device = {"slug": "rtx-a5000", "cpu_count": 16, "gpu_mem_mb": 24564}
    versions = {"torch": "2.13.0"}
    entries = [Entry("mlp", "decode", 1, 1, 0, ffn=128), Entry("mlp", "prefill", 1, 16, 0, ffn=128)]
    records = [{"key": e.key, "round": 1, "status": "ok"} for e in entries]

    def answer(**changes) -> UnitResult:
        fields = {
            "records": records,
            "built": True,
            "device": device,
            "versions": versions,
            "node": "n1",
            "state": {},
            **changes,
        }
        return UnitResult(**fields)

    assert refusal(device, versions, entries, 1, answer()) is None
    why = refusal(device, versions, entries, 1, answer(device={**device, "cpu_count": 8}))
    assert why == "its device fingerprint differs from the table's (cpu_count: 8 instead of 16)"
    assert "torch: '2.12.0' instead of '2.13.0'" in refusal(
        device, versions, entries, 1, answer(versions={"torch": "2.12.0"})
    )
    assert "not those of the entries" in refusal(device, versions, entries, 0, answer())
    assert "not those of the entries" in refusal(device, versions, entries, 1, answer(records=records[:1]))


@pytest.mark.parametrize("node_sets_it", [False, True])
def test_a_task_drops_the_thread_pin_ray_adds_but_keeps_the_nodes_own(tmp_path, monkeypatch, node_sets_it):
    from amoeba_profile.fleet.worker import as_on_the_node

    started = tmp_path / "environ"
    started.write_bytes(b"PATH=/usr/bin\0" + (b"OMP_NUM_THREADS=4\0" if node_sets_it else b"HOME=/root\0"))
    monkeypatch.setenv("OMP_NUM_THREADS", "4" if node_sets_it else "1")  # what the task runs under
    as_on_the_node(started)
    assert os.environ.get("OMP_NUM_THREADS") == ("4" if node_sets_it else None)
    as_on_the_node(tmp_path / "unreadable")  # no such file (not Linux): nothing changes
    assert os.environ.get("OMP_NUM_THREADS") == ("4" if node_sets_it else None)


def test_a_node_says_each_kind_of_notice_once_per_table_not_once_per_task(tmp_path, tiny_arch, monkeypatch, capsys):
    """Every unit-round is a task that checks the machine again; on a busy node the same warning,
    differing only in its figures, came once per task."""
    from amoeba_profile.backends import get_backend
    from conftest import SimulatedLoad

    from amoeba_profile.device import fingerprint
    from amoeba_profile.device.quiet import BusyPolicy
    from amoeba_profile.fleet import worker as fleet_worker
    from amoeba_profile.fleet.worker import UnitJob, measure_task
    from amoeba_profile.measure.build import BackendRecord
    from amoeba_profile.measure.plan import BuildPlan
    from amoeba_profile.measure.scheduler import group_units

    busy = iter([1.5, 1.9, 1.7, 2.0])  # other processes' cores, a new figure for every task
    monkeypatch.setattr(fleet_worker, "as_on_the_node", lambda: None)  # keep the suite's thread pin
    monkeypatch.setattr(fleet_worker, "_node_id", lambda: "node-1")
    monkeypatch.setattr(fleet_worker, "_SAID", set())
    # the default binds each load's own value when the lambda is made, not when it is called
    monkeypatch.setattr(fleet_worker, "CpuLoad", lambda: SimulatedLoad(others=lambda t, v=next(busy): v))  # noqa: B008
    backend = get_backend("pytorch")
    plan = BuildPlan(tiny_arch, (1.0,), (16,), (16,))
    unit = next(iter(group_units(plan.entries()).values()))
    for round_index, target in ((0, "a.csv"), (1, "a.csv"), (0, "b.csv")):
        job = UnitJob(
            plan,
            BackendRecord.of(backend),
            fingerprint("cpu"),
            FAST_PROTOCOL,
            tuple(unit),
            round_index,
            BusyPolicy("warn"),
            str(tmp_path / target),
        )
        assert len(measure_task(job).records) == len(unit)
    lines = [line for line in capsys.readouterr().err.splitlines() if "busy machine" in line]
    # Once for table a (its second task is quiet about it), once for table b.
    assert len(lines) == 2 and "1.5 of 2 cores" in lines[0] and "1.7 of 2 cores" in lines[1]


def test_fleet_build_counts_its_nodes_in_words(tmp_path, monkeypatch, capsys):
    """The CLI's summary line, with the cluster replaced by what run_fleet returns."""
    from amoeba_profile.cli import main as cli
    from amoeba_profile.fleet import driver as fleet
    from amoeba_profile.measure.build import BuildResult

    [build] = flags_builds(["a"], ["pytorch"], ["tinyllama-1.1b"])
    outcomes = [
        fleet.FleetOutcome(
            build,
            "written",
            "",
            BuildResult(tmp_path / f"t{n}.csv", 20, 0, 0, [], 3.0),
            tuple(f"node-{i}" for i in range(n)),
            None,
        )
        for n in (1, 2)
    ]
    monkeypatch.setattr(fleet, "connect", lambda address: "a test cluster")
    monkeypatch.setattr(fleet, "disconnect", lambda: None)
    monkeypatch.setattr(fleet, "discover", lambda: [])
    monkeypatch.setattr(fleet, "run_fleet", lambda *args, **kwargs: outcomes)
    monkeypatch.setattr(
        sys,
        "argv",
        ["amoeba-profile", "fleet", "build", "--devices", "a", "--models", "tinyllama-1.1b", "--out", str(tmp_path)],
    )
    with pytest.raises(SystemExit) as done:
        cli.main()
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.count(", 1 node)") == 1 and out.count(", 2 nodes)") == 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "amoeba_profile.cli.main", *args], capture_output=True, text=True, timeout=300
    )


def test_fleet_resources_prints_this_machines_resource_and_the_join_line():
    proc = _cli("fleet", "resources", "--device", "cpu", "--head", "workstation:6379")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert json.loads(first) == {f"device:{cpu_slug()}": 1}
    assert second == f"ray start --address=workstation:6379 --resources='{first}'"


def test_fleet_build_help_points_to_where_the_plan_format_is_described():
    proc = _cli("fleet", "build", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "(format: README.md, section 'Fleet: every device at once')" in " ".join(proc.stdout.split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Fleet: every device at once", 1)[1].split("\n## ", 1)[0]
    assert "```yaml" in section and "devices" in section and "flows" in section


def test_fleet_build_refuses_a_missing_or_bad_plan_before_touching_ray(tmp_path):
    proc = _cli("fleet", "build")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: name what to build: --plan fleet.yaml, or --devices, --flows and --models"
    )
    plan = tmp_path / "fleet.yaml"
    plan.write_text("devices: [a]\nflows: [pytorch]\nmodels: [tinyllama-1.1b]\ngrid: {contexts: [0]}\n")
    proc = _cli("fleet", "build", "--plan", str(plan))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"{plan}: field 'grid.contexts[0]'=0: Expected `int` >= 1" in proc.stderr


# ---- real builds on a local Ray cluster ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Nodes are marked dead soon after their raylet dies, so a lost device is seen in seconds.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 100 << 20,
            "include_dashboard": False,
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 2,
            },
        },
    )
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _node(cluster, label: str):
    return cluster.add_node(num_cpus=1, resources={f"device:{label}": 1}, object_store_memory=100 << 20)


def _entry_keys(build) -> set[str]:
    """The keys of an uninterrupted build of ``build`` on this machine: its plan's entries."""
    prepared = prepare_build(build.arch, backend=build.backend, method=build.method, **build.plan_options)
    return {e.key for e in prepared.plan.entries()}


def _killer(cluster, node, label: str, rejoin: bool):
    """A progress callback that kills ``node`` (SIGKILL, as a crash) once the first unit of a
    ``label`` build is journaled and others are still to come; with ``rejoin`` another node of the
    same device joins at once. The nodes that joined are listed on the callback."""

    def progress(name: str, done: int, total: int, text: str) -> None:
        if name.startswith(label) and 0 < done < total and not progress.killed:
            progress.killed = True
            cluster.remove_node(node, allow_graceful=False)
            if rejoin:
                progress.joined.append(_node(cluster, label))

    progress.killed, progress.joined = False, []
    return progress


@pytest.mark.slow
def test_two_devices_build_their_tables_and_a_killed_node_loses_no_row(cluster, tmp_path):
    from amoeba_profile.fleet.driver import discover, run_fleet

    _configs(tmp_path)
    first_a, b = _node(cluster, "kind-a"), _node(cluster, "kind-b")
    builds = plan_builds(
        {
            "flows": ["pytorch"],
            "grid": GRID,
            "method": "components",  # the rows below are checked for a components table
            "devices": {"kind-a": {"models": ["tiny64"]}, "kind-b": {"models": ["tiny128"]}},
        },
        tmp_path,
        "test plan",
    )
    found = {node.node: node for node in discover()}
    assert {found[first_a.node_id].labels, found[b.node_id].labels} == {("kind-a",), ("kind-b",)}
    progress = _killer(cluster, first_a, "kind-a", rejoin=True)
    outcomes = run_fleet(builds, tmp_path / "lut", FAST_PROTOCOL, progress=progress, poll_s=0.2, device_wait_s=120)
    try:
        assert [o.status for o in outcomes] == ["written", "written"], [o.message for o in outcomes]
        for outcome in outcomes:
            lut = load_table(outcome.result.path)
            keys = set(lut.frame.component + "|" + lut.frame.phase)  # nonempty, both kinds of row
            assert {"attn|prefill", "mlp|decode", "base|decode"} <= keys
            assert set(_row_keys(lut)) == _entry_keys(outcome.build)
            assert lut.frame["rounds"].isin([FAST_PROTOCOL.rounds, FAST_PROTOCOL.rounds + 1]).all()
            assert lut.meta.fleet == {"resource": f"device:{outcome.build.label}", "nodes": list(outcome.nodes)}
            assert lut.meta.arch["hidden_size"] == outcome.build.arch.hidden_size
            assert outcome.journal is None and not list(tmp_path.rglob("*.journal.jsonl"))
        [a_outcome, b_outcome] = outcomes
        # kind-a's first unit was measured on the node that was killed; the rest on the one that rejoined
        assert progress.killed and set(a_outcome.nodes) == {first_a.node_id, progress.joined[0].node_id}
        assert b_outcome.nodes == (b.node_id,)
        # The same build run locally writes the same table apart from the fleet's provenance.
        local = prepare_build(
            b_outcome.build.arch, backend="pytorch", method=b_outcome.build.method, **b_outcome.build.plan_options
        )
        mine = load_table(run_build(local.plan, local.backend, tmp_path / "local", FAST_PROTOCOL).path)
        fleet = load_table(b_outcome.result.path)
        fleet_fields, mine_fields = set(meta_fields(fleet.meta)), set(meta_fields(mine.meta))
        assert fleet_fields - mine_fields == {"fleet"} and mine_fields <= fleet_fields
        same = (
            "device_slug",
            "device",
            "backend",
            "backend_config",
            "versions",
            "dtype",
            "arch",
            "method",
            "grid",
            "protocol",
            "clock",
            "source",
            "monitor",
            "tool_version",
            "schema_version",
            "rows",
        )
        assert {k: meta_fields(fleet.meta).get(k) for k in same} == {k: meta_fields(mine.meta).get(k) for k in same}
        assert _row_keys(fleet) == _row_keys(mine) and list(fleet.frame.columns) == list(mine.frame.columns)
    finally:
        for node in [b, *progress.joined]:
            cluster.remove_node(node)


def _one_device_build(cluster, tmp_path, label: str):
    """A node advertising ``label`` and the one tiny pytorch build planned for it."""
    _configs(tmp_path)
    node = _node(cluster, label)
    [build] = plan_builds(
        {"flows": ["pytorch"], "models": ["tiny64"], "grid": GRID, "method": "components", "devices": [label]},
        tmp_path,
        "test plan",
    )
    return node, build


def _row_keys(lut) -> list[str]:
    """The measured rows' entry keys (a calibrated table's derived layer rows are no plan entry)."""
    from amoeba_profile.table.lut import entry_key_of_row

    return [entry_key_of_row(row) for row in lut.frame.to_dict("records") if row["method"] != "calibrated"]


@pytest.mark.slow
def test_a_device_that_never_comes_back_leaves_a_journal_build_lut_resumes(cluster, tmp_path):
    from amoeba_profile.fleet.driver import run_fleet

    node, build = _one_device_build(cluster, tmp_path, "kind-c")
    progress = _killer(cluster, node, "kind-c", rejoin=False)
    notes: list[str] = []
    [outcome] = run_fleet(
        [build],
        tmp_path / "lut",
        FAST_PROTOCOL,
        progress=progress,
        notice=notes.append,
        poll_s=0.2,
        device_wait_s=2,
        resume_hint="amoeba-profile fleet build --plan fleet.yaml",
    )
    assert outcome.status == "lost" and outcome.result is None
    assert outcome.message.endswith("; resume with: amoeba-profile fleet build --plan fleet.yaml")
    assert "no live node advertised device:kind-c for 2 s" in outcome.message and "\n" not in outcome.message
    assert any("waiting up to 2 s for one to join" in note for note in notes)
    kept = [json.loads(line) for line in outcome.journal.read_text().splitlines()[1:]]
    assert kept and f"{len(kept)} results kept in {outcome.journal}" in outcome.message
    assert not outcome.journal.with_name(outcome.journal.name.removesuffix(".journal.jsonl")).exists()
    # build-lut on that device resumes the fleet's journal: the same format, the same identity
    local = prepare_build(
        build.arch, backend="pytorch", out_dir=tmp_path / "lut", method=build.method, **build.plan_options
    )
    result = run_build(local.plan, local.backend, tmp_path / "lut", FAST_PROTOCOL)
    assert result.measured + result.from_journal == len(local.plan.entries()) and not outcome.journal.exists()
    lut = load_table(result.path)
    assert set(_row_keys(lut)) == _entry_keys(build)
    rows = dict(zip(_row_keys(lut), lut.frame.samples_ms.map(json.loads)))
    for record in (r for r in kept if r["status"] == "ok"):  # the fleet's samples are in the table
        assert {round(s, 5) for s in record["samples_ms"]} <= set(rows[record["key"]])


@pytest.mark.slow
def test_results_from_a_node_whose_fingerprint_differs_from_the_table_are_refused(cluster, tmp_path):
    from amoeba_profile.fleet.driver import run_fleet

    node, build = _one_device_build(cluster, tmp_path, "kind-d")
    # A table measured on a machine of the same slug with other cores; the fleet would extend it.
    local = prepare_build(
        build.arch, backend="pytorch", out_dir=tmp_path / "lut", method=build.method, **build.plan_options
    )
    path = run_build(local.plan, local.backend, tmp_path / "lut", FAST_PROTOCOL).path
    meta = json.loads(sidecar_path(path).read_text())
    meta["device"]["cpu_count"] += 64
    sidecar_path(path).write_text(json.dumps(meta))
    before = path.read_bytes()
    wider = plan_builds(
        {
            "flows": ["pytorch"],
            "models": ["tiny64"],
            "devices": ["kind-d"],
            "grid": {**GRID, "contexts": [16, 32]},
            "method": "components",  # as the table it extends
        },
        tmp_path,
        "test plan",
    )
    notes: list[str] = []
    try:
        [outcome] = run_fleet(wider, tmp_path / "lut", FAST_PROTOCOL, notice=notes.append, poll_s=0.2)
    finally:
        cluster.remove_node(node)
    assert outcome.status == "failed"
    expected = f"cpu_count: {meta['device']['cpu_count'] - 64} instead of {meta['device']['cpu_count']}"
    assert (
        expected in outcome.message
        and "no node with device:kind-d measures as the table was measured" in outcome.message
    )
    assert any("refused, never mixed in" in note and expected in note for note in notes)
    assert path.read_bytes() == before
