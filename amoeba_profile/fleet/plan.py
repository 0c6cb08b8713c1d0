"""What a fleet builds: one table per (device, flow, model), from a small YAML file or from flags.

A device here is a group of Ray nodes: the nodes that advertise the custom resource
``device:<label>`` (``fleet.node_resources`` computes it from the device's slug). The plan names
those labels; each build's options are ``build-lut``'s, so a fleet table is the table
``build-lut`` would write with the same options on that device. Nothing here imports Ray: a plan
is checked, and its builds listed, before any cluster is touched.

    flows: [pytorch]                 # every device builds these flows ...
    models: [tinyllama-1.1b]         # ... of these models (a built-in name or a config.json path)
    method: difference               # optional, as build-lut --method
    grid:                            # build-lut's grid options
      widths: ["1", "7/8", "3/4", "5/8"]
      prompt_lens: [128]
      contexts: [128, 256, 512]
      whole: ["22x1", "16x3/4"]
    devices:
      rtx-a5000: {device: cuda, dtype: float16}
      orin-nx-16gb: {flows: [pytorch], grid: {contexts: [128, 256]}}

A device entry may override ``flows``, ``models``, ``method`` and ``grid`` (merged key by key), and
set ``device`` (the torch device on its nodes, default auto), ``dtype``, ``threads`` and
``backend_options``. ``devices`` may also be a plain list of labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from amoeba_profile.core.arch import BUILTIN_ARCHS, ModelArch, resolve_arch
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.inputs import positive_int, read_bounded
from amoeba_profile.core.subnet import parse_ratio, parse_whole
from amoeba_profile.device import check_device_name

T = TypeVar("T")
MAX_PLAN_BYTES = 1 << 20
_TOP_KEYS = {"flows", "models", "method", "grid", "devices"}
_DEVICE_KEYS = {"flows", "models", "method", "grid", "device", "dtype", "threads", "backend_options"}
_GRID_INT_LISTS = ("prompt_lens", "contexts", "depths")
_GRID_INTS = ("batch", "decode_steps")
_GRID_KEYS = {"widths", "whole", *_GRID_INT_LISTS, *_GRID_INTS}


@dataclass(frozen=True)
class FleetBuild:
    """One table of a fleet: measured on a node advertising ``device:<label>``, with build-lut's options.

    ``plan_options`` are ``BuildPlan`` fields (grid, whole subnets, depths, decode steps); the
    method, dtype and threads stay as given (None: the default the measuring node chooses)."""

    label: str
    backend: str
    model: str
    arch: ModelArch
    device: str = "auto"
    dtype: str | None = None
    threads: int | None = None
    method: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    plan_options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """For people: ``rtx-a5000: tinyllama-1.1b on pytorch``."""
        return f"{self.label}: {self.arch.name} on {self.backend}"


def _plan_loader(yaml):
    """A SafeLoader that refuses aliases (``*name``, merge keys ``<<: *name``): a few hundred bytes
    of nested aliases expand to gigabytes, which the file's size limit does not bound. A plan is
    short enough to write out; an anchor alone (``&name``) is harmless and stays allowed."""

    class PlanLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a fleet plan; write the value out", mark
                )
            return super().compose_node(parent, index)

    return PlanLoader


def load_fleet_plan(path: Path | str) -> list[FleetBuild]:
    """The builds of a YAML plan file; model config paths are relative to the file's folder."""
    import yaml

    path = Path(path)
    text = read_bounded(path, MAX_PLAN_BYTES, "fleet plan", error=UsageError)
    try:
        data = yaml.load(text, Loader=_plan_loader(yaml))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not a readable YAML file ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply to be a fleet plan") from None
    return plan_builds(data, path.parent, str(path))


def flags_builds(devices: list[str], flows: list[str], models: list[str]) -> list[FleetBuild]:
    """The builds of ``fleet build --devices a,b --flows pytorch --models m``: every device builds
    every flow of every model with build-lut's default grid."""
    return plan_builds({"devices": devices, "flows": flows, "models": models}, Path.cwd(), "the command line")


def plan_builds(data: Any, base: Path, source: str) -> list[FleetBuild]:
    """Every (device, flow, model) build of a parsed plan, checked; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a fleet plan is a mapping with 'devices', 'flows' and 'models'")
    _no_unknown(data, _TOP_KEYS, source)
    devices = data.get("devices")
    if isinstance(devices, list):
        devices = {label: {} for label in devices}
    if not isinstance(devices, dict) or not devices:
        raise UsageError(f"{source}: 'devices' must list at least one device label")
    builds: list[FleetBuild] = []
    archs: dict[str, ModelArch] = {}
    for label, overrides in devices.items():
        where = f"{source}: device {label!r}"
        _check_label(label, where)
        overrides = overrides or {}
        if not isinstance(overrides, dict):
            raise UsageError(f"{where}: its options must be a mapping, got {overrides!r}")
        _no_unknown(overrides, _DEVICE_KEYS, where)
        grid = {
            **_mapping(data.get("grid"), f"{source}: 'grid'"),
            **_mapping(overrides.get("grid"), f"{where}: 'grid'"),
        }
        _no_unknown(grid, _GRID_KEYS, f"{where}: 'grid'")
        backend_options = _mapping(overrides.get("backend_options"), f"{where}: 'backend_options'")
        threads = overrides.get("threads")
        method = overrides.get("method", data.get("method"))
        device = _within(where, check_device_name, str(overrides.get("device", "auto")))
        for flow in _names(overrides.get("flows", data.get("flows")), "flows", where):
            _check_flow(flow, method, device, overrides.get("dtype"), where)
            for model in _names(overrides.get("models", data.get("models")), "models", where):
                if model not in archs:
                    archs[model] = _within(where, resolve_arch, _model_path(model, base))
                arch = archs[model]
                builds.append(
                    FleetBuild(
                        label=label,
                        backend=flow,
                        model=model,
                        arch=arch,
                        device=str(overrides.get("device", "auto")),
                        dtype=overrides.get("dtype"),
                        method=method,
                        threads=positive_int(threads, f"{where}: 'threads'") if threads is not None else None,
                        backend_options=dict(backend_options),
                        plan_options=_within(where, _plan_options, arch, grid, where),
                    )
                )
    seen: set[tuple[str, str, str]] = set()
    for build in builds:
        key = (build.label, build.backend, build.arch.name)
        if key in seen:
            raise UsageError(f"{source}: {build.name} is listed twice")
        seen.add(key)
    return builds


def _check_flow(flow: str, method: Any, device: str, dtype: Any, where: str) -> None:
    """Refuse, before any cluster is joined, a flow with no measuring adapter, or a method, device
    kind or dtype it does not support (its ``capabilities``); whether a node has its libraries is
    the node's to say."""
    from amoeba_profile.backends import REGISTRY, backend_class
    from amoeba_profile.core.dtypes import canonical_dtype
    from amoeba_profile.measure.methods import device_kind
    from amoeba_profile.measure.plan import METHODS

    if flow not in REGISTRY:
        raise UsageError(f"{where}: unknown flow {flow!r}: a fleet measures with one of {sorted(REGISTRY)}")
    capabilities = backend_class(flow).capabilities()
    if method is not None and (method not in METHODS or method not in capabilities.methods):
        raise UsageError(f"{where}: method {method!r} is not one of {flow}'s {list(capabilities.methods)}")
    if device != "auto" and device_kind(device) not in capabilities.devices:
        raise UsageError(f"{where}: {flow} runs on {list(capabilities.devices)}, not {device!r}")
    if dtype is not None and (not isinstance(dtype, str) or canonical_dtype(dtype) not in capabilities.dtypes):
        raise UsageError(f"{where}: dtype {dtype!r} is not one of {flow}'s {list(capabilities.dtypes)}")


def _within(where: str, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, its refusal prefixed with where in the plan it comes from."""
    try:
        return function(*args)
    except UsageError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(where) else f"{where}: {message}") from None


def _check_label(label: Any, where: str) -> None:
    # The label becomes the resource name device:<label> that `ray start --resources` takes as JSON.
    if not isinstance(label, str) or not label or not all(c.isalnum() or c in "-_." for c in label):
        raise UsageError(
            f"{where}: a device label is letters, digits, '-', '_' and '.' (a device slug such as rtx-a5000)"
        )


def _no_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise UsageError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping, got {value!r}")
    return value


def _names(value: Any, what: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise UsageError(f"{where}: '{what}' must name at least one, got {value!r}")
    return value


def _model_path(model: str, base: Path) -> str:
    """A model that is not a built-in name is a config.json (or its folder) relative to the plan's folder."""
    return str(base / model) if model not in BUILTIN_ARCHS and (base / model).exists() else model


def _plan_options(arch: ModelArch, grid: dict[str, Any], where: str) -> dict[str, Any]:
    """``BuildPlan`` fields from a plan's grid, checked as build-lut checks its flags."""
    options: dict[str, Any] = {}
    if "widths" in grid:
        widths = grid["widths"] if isinstance(grid["widths"], list) else [grid["widths"]]
        options["widths"] = tuple(parse_ratio(str(w)) for w in widths)
    for key in _GRID_INT_LISTS:
        if key in grid:
            values = grid[key] if isinstance(grid[key], list) else [grid[key]]
            if not values:
                raise UsageError(f"{where}: 'grid.{key}' must not be empty")
            options[key] = tuple(positive_int(v, f"{where}: 'grid.{key}'") for v in values)
    for key in _GRID_INTS:
        if key in grid:
            options[key] = positive_int(grid[key], f"{where}: 'grid.{key}'")
    if "whole" in grid:
        whole = grid["whole"] if isinstance(grid["whole"], list) else [grid["whole"]]
        options["whole"] = parse_whole(arch, ",".join(str(w) for w in whole))
    return options
