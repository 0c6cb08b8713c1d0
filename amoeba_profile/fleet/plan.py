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

The shape is declared once, as ``PlanFile``, ``PlanDevice`` and ``PlanGrid``, and ``schema.parse``
names the key and value that break it; what no type says (a label's characters, a flow's
capabilities, build-lut's width and whole-subnet parsers, a build listed twice) is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from amoeba_profile.core import schema
from amoeba_profile.core.arch import BUILTIN_ARCHS, ModelArch, resolve_arch
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.inputs import read_bounded
from amoeba_profile.core.schema import PositiveInt
from amoeba_profile.core.subnet import parse_ratio, parse_whole
from amoeba_profile.device import check_device_name

T = TypeVar("T")
MAX_PLAN_BYTES = 1 << 20

# One value may stand for a list (`flows: pytorch`, `contexts: 128`); a list holds at least one.
Name = Annotated[str, msgspec.Meta(min_length=1)]
Names = Name | Annotated[list[Name], msgspec.Meta(min_length=1)]
PositiveInts = PositiveInt | Annotated[list[PositiveInt], msgspec.Meta(min_length=1)]
Ratios = str | float | Annotated[list[str | float], msgspec.Meta(min_length=1)]  # "7/8" or 0.875
_LISTED = ("widths", "whole", "prompt_lens", "contexts", "depths")


class PlanGrid(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """build-lut's grid options; a key left out is UNSET (null is refused), so that a device's grid
    overrides the plan's key by key."""

    widths: Ratios | UnsetType = UNSET
    whole: str | list[str] | UnsetType = UNSET  # "22x1" items, as --whole
    prompt_lens: PositiveInts | UnsetType = UNSET
    contexts: PositiveInts | UnsetType = UNSET
    depths: PositiveInts | UnsetType = UNSET
    batch: PositiveInt | UnsetType = UNSET
    decode_steps: PositiveInt | UnsetType = UNSET


class PlanDevice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A device's entry: ``flows``, ``models`` and ``method`` left out (UNSET) are the plan's; a null
    method, dtype or threads is the measuring node's default."""

    flows: Names | UnsetType = UNSET
    models: Names | UnsetType = UNSET
    method: str | None | UnsetType = UNSET
    grid: PlanGrid | None = None
    device: str = "auto"
    dtype: str | None = None
    threads: PositiveInt | None = None
    backend_options: dict[str, Any] | None = None


class PlanFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A plan: its devices and what each builds unless its entry says otherwise. An entry is parsed
    apart, as a ``PlanDevice``, so that an error names its device (msgspec's path names no key)."""

    devices: dict[str, Any] | list[str] = []
    flows: Names | None = None
    models: Names | None = None
    method: str | None = None
    grid: PlanGrid | None = None


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
    plan = schema.parse(PlanFile, data, source, UsageError)
    devices = plan.devices if isinstance(plan.devices, dict) else dict.fromkeys(plan.devices)
    if not devices:
        raise UsageError(f"{source}: 'devices' must list at least one device label")
    builds: list[FleetBuild] = []
    archs: dict[str, ModelArch] = {}
    for label, entry in devices.items():
        where = f"{source}: device {label!r}"
        _check_label(label, where)
        own = schema.parse(PlanDevice, entry or {}, where, UsageError)  # null or empty: the plan's
        method = _own(own.method, plan.method)
        grid = {**schema.to_builtins(plan.grid or PlanGrid()), **schema.to_builtins(own.grid or PlanGrid())}
        device = _within(where, check_device_name, own.device)
        for flow in _names(_own(own.flows, plan.flows), "flows", where):
            _check_flow(flow, method, device, own.dtype, where)
            for model in _names(_own(own.models, plan.models), "models", where):
                if model not in archs:
                    archs[model] = _within(where, resolve_arch, _model_path(model, base))
                arch = archs[model]
                builds.append(
                    FleetBuild(
                        label=label,
                        backend=flow,
                        model=model,
                        arch=arch,
                        device=own.device,
                        dtype=own.dtype,
                        method=method,
                        threads=own.threads,
                        backend_options=dict(own.backend_options or {}),
                        plan_options=_within(where, _plan_options, arch, grid),
                    )
                )
    seen: set[tuple[str, str, str]] = set()
    for build in builds:
        key = (build.label, build.backend, build.arch.name)
        if key in seen:
            raise UsageError(f"{source}: {build.name} is listed twice")
        seen.add(key)
    return builds


def _check_flow(flow: str, method: str | None, device: str, dtype: str | None, where: str) -> None:
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
    if dtype is not None and canonical_dtype(dtype) not in capabilities.dtypes:
        raise UsageError(f"{where}: dtype {dtype!r} is not one of {flow}'s {list(capabilities.dtypes)}")


def _within(where: str, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, its refusal prefixed with where in the plan it comes from."""
    try:
        return function(*args)
    except UsageError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(where) else f"{where}: {message}") from None


def _check_label(label: str, where: str) -> None:
    # The label becomes the resource name device:<label> that `ray start --resources` takes as JSON.
    if not label or not all(c.isalnum() or c in "-_." for c in label):
        raise UsageError(
            f"{where}: a device label is letters, digits, '-', '_' and '.' (a device slug such as rtx-a5000)"
        )


def _own(value: T | UnsetType, plan_value: T) -> T:
    """A device's own setting, or the plan's where its entry leaves the key out."""
    return plan_value if value is UNSET else value


def _names(value: str | list[str] | None, what: str, where: str) -> list[str]:
    """A device's flows or models: its own, else the plan's; neither naming any is refused."""
    if value is None:
        raise UsageError(f"{where}: '{what}' must name at least one, in the plan or in the device's entry")
    return _listed(value)


def _listed(value: T | list[T]) -> list[T]:
    """A plan's single value as the one-item list it stands for."""
    return value if isinstance(value, list) else [value]


def _model_path(model: str, base: Path) -> str:
    """A model that is not a built-in name is a config.json (or its folder) relative to the plan's folder."""
    return str(base / model) if model not in BUILTIN_ARCHS and (base / model).exists() else model


def _plan_options(arch: ModelArch, grid: dict[str, Any]) -> dict[str, Any]:
    """``BuildPlan`` fields from a plan's merged grid (types and bounds already checked by ``PlanGrid``);
    widths and whole subnets are read as build-lut reads its flags."""
    options = {key: tuple(_listed(value)) if key in _LISTED else value for key, value in grid.items()}
    if "widths" in options:
        options["widths"] = tuple(parse_ratio(str(w)) for w in options["widths"])
    if "whole" in options:
        options["whole"] = parse_whole(arch, ",".join(options["whole"]))
    return options
