"""The project's data, typed once: table rows (the CSV's columns), the table's sidecar and its grid,
journal records and the device state recorded around each measurement.

Each is a msgspec ``Struct`` whose field types and bounds are the validation: a file is checked by
converting what it holds into its struct (``parse``), and a problem is reported with the file's
own field name and value. msgspec, not pydantic v2 or attrs: it validates as strictly (a bool is
no int, a float no int unless exact), costs ~15 ms to import, declare a struct and validate one
against pydantic 2.14's ~60 ms (measured on this project's 2-core VM; ``select`` is a quick
command), and attrs would leave the checking to hand-written code, which is what this module
replaces. Checks that span fields (``p10 <= median``, a row's samples against its stats, an
entry key of this run) stay with the code that knows their context (``table.lut``,
``measure.journal``); every single-field rule is here.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Callable, Literal, TypeVar, get_args, get_type_hints

import msgspec

from amoeba_profile.core.entry import entry_key
from amoeba_profile.core.errors import AmoebaError

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
WidthRatio = Annotated[float, msgspec.Meta(gt=0, le=1)]

Component = Literal["attn", "mlp", "base", "model", "layer"]
Phase = Literal["prefill", "decode"]
# ok; oom: the device ran out of memory; unsupported: the flow cannot run the shape (skipped by
# design); error: too noisy for a positive median, a fit below the noise, or no result at all.
Status = Literal["ok", "oom", "unsupported", "error"]
Source = Literal["measured", "roofline"]
RowMethod = Literal["components", "calibrated", "difference", "whole", "computed"]  # how a row was obtained
TableMethod = Literal["components", "calibrated", "difference", "computed"]
DropRule = Literal["keep-ends", "first", "last", "importance"]

COMPONENTS: tuple[str, ...] = get_args(Component)
PHASES: tuple[str, ...] = get_args(Phase)
STATUSES: tuple[str, ...] = get_args(Status)
SOURCES: tuple[str, ...] = get_args(Source)
ROW_METHODS: tuple[str, ...] = get_args(RowMethod)

NAN = math.nan


class Row(msgspec.Struct, kw_only=True):
    """One table row, fields in CSV column order. Stats are milliseconds and NaN unless ``ok``. A
    measured row's stats are those of ``samples_ms`` (every sample of every round, JSON); a fitted
    row (``difference``, ``calibrated``) has no samples: ``n`` counts the models it was fitted
    from, ``std_ms`` holds the coefficient's standard error and ``mean_ms`` is NaN."""

    # key: the entry a row measures (``entry.entry_key``)
    component: Component
    phase: Phase
    batch: NonNegativeInt
    tokens: NonNegativeInt
    context: NonNegativeInt
    heads: NonNegativeInt
    kv_heads: NonNegativeInt
    ffn: NonNegativeInt
    num_layers: NonNegativeInt
    subnet_id: str
    # provenance
    method: RowMethod
    source: Source
    status: Status
    repeat: NonNegativeInt
    rounds: NonNegativeInt
    # stats
    n: NonNegativeInt
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    cv: float
    # device state over the row's rounds (optional columns: NaN where unknown or absent)
    energy_mj: float = NAN
    temperature_c: float = NAN
    clock_mhz: float = NAN
    power_w: float = NAN
    # diagnostics (optional): a model row's residual in the fit; the fraction of a sample the
    # accelerator was busy (host-bound below ~0.5); engine compile time; share of the needed CPU
    # cores other processes took
    residual_pct: float = NAN
    device_busy: float = NAN
    compile_s: float = NAN
    host_contention: float = NAN
    # rest
    flags: str = ""  # ';'-separated: high_cv, throttled, host_bound, recompiled, contended
    wall_s: float = 0.0
    samples_ms: str = "[]"
    subnet_json: str = ""
    note: str = ""

    @property
    def key(self) -> str:
        """The entry this row measures (``entry.entry_key``): a table holds one row per key."""
        return entry_key(
            self.component,
            self.phase,
            int(self.batch),
            int(self.tokens),
            int(self.context),
            int(self.heads),
            int(self.kv_heads),
            int(self.ffn),
            self.subnet_id or "",
        )


COLUMNS: list[str] = list(Row.__struct_fields__)
KEY_COLUMNS = COLUMNS[: COLUMNS.index("subnet_id") + 1]
STAT_COLUMNS = COLUMNS[COLUMNS.index("n") : COLUMNS.index("cv") + 1]
STATE_COLUMNS = ["energy_mj", "temperature_c", "clock_mhz", "power_w"]
DIAGNOSTIC_COLUMNS = ["residual_pct", "device_busy", "compile_s", "host_contention"]
OPTIONAL_COLUMNS = STATE_COLUMNS + DIAGNOSTIC_COLUMNS  # a table written before they existed lacks them
TEXT_COLUMNS = ["subnet_id", "flags", "note", "subnet_json", "samples_ms"]
INT_COLUMNS = [name for name, kind in Row.__annotations__.items() if kind == "NonNegativeInt"]


class Grid(msgspec.Struct, kw_only=True):
    """What a build measured (``measure.plan.BuildPlan.grid``): width ratios, prompt lengths and
    decode contexts, the difference fit's depths and the shapes added beside the grid. A field an
    older sidecar lacks reads as its default, None where no default was ever implied (written as
    null); fields this version does not know are carried."""

    widths: list[WidthRatio] = []
    prompt_lens: list[PositiveInt] = []
    contexts: list[PositiveInt] = []
    batch: PositiveInt = 1
    drop_rule: str = "keep-ends"
    ffn_multiple: PositiveInt = 1
    method: str | None = None
    depths: list[PositiveInt] = []
    decode_steps: PositiveInt | None = None
    measure_grid: bool = True
    extra_attn: list[list[PositiveInt]] = []
    extra_ffn: list[PositiveInt] = []
    unknown_fields: dict[str, Any] = {}


# The grid's lists of values a later build widens (``extra_attn``, of pairs, is merged apart).
GRID_LISTS = [name for name, kind in Grid.__annotations__.items() if kind in ("list[WidthRatio]", "list[PositiveInt]")]


class TableMeta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The sidecar's fields and their types. Every field is optional (tables of earlier versions
    lack some); a present one must have its type. Fields this version does not know are kept in
    ``unknown_fields`` as they were (``table_meta``, ``meta_fields``), so a rewrite loses nothing."""

    schema_version: int | None = None
    tool_version: str | None = None
    device_slug: str | None = None
    device: dict[str, Any] | None = None
    backend: str | None = None
    backend_config: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    backend_env: dict[str, Any] | None = None
    dtype: str | None = None
    arch: dict[str, Any] | None = None
    method: str | None = None
    method_reason: str | None = None
    grid: Grid | None = None
    protocol: dict[str, Any] | None = None
    clock: str | None = None
    source: str | None = None
    source_config: dict[str, Any] | None = None
    monitor: str | None = None
    state_at_start: dict[str, Any] | None = None
    state_at_end: dict[str, Any] | None = None
    fit: list[dict[str, Any]] | None = None
    fit_subnet_ids: list[str] | None = None
    later_builds: list[dict[str, Any]] | None = None
    crosschecks: list[dict[str, Any]] | None = None
    resealed: list[dict[str, Any]] | None = None
    fleet: dict[str, Any] | None = None
    created_at: str | None = None
    updated_at: str | None = None
    # a computed (roofline) table: the flow's kernel model, its efficiencies, the calibration it
    # was fitted to (None: spec-sheet values) and what it says about itself
    flow: dict[str, Any] | None = None
    efficiency: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    host_overlaps_device: bool | None = None
    note: str | None = None
    rows: int | None = None
    content_sha256: str | None = None
    unknown_fields: dict[str, Any] = {}


def _split(kind: type[msgspec.Struct], fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    known = set(kind.__struct_fields__) - {"unknown_fields"}
    return {k: v for k, v in fields.items() if k in known}, {k: v for k, v in fields.items() if k not in known}


def table_meta(fields: dict[str, Any], where: str, error: Callable[[str], AmoebaError]) -> TableMeta:
    """A sidecar's fields as a ``TableMeta``; fields it (or its grid) does not declare are carried."""
    known, unknown = _split(TableMeta, fields)
    grid_unknown: dict[str, Any] = {}
    if isinstance(known.get("grid"), dict):
        known["grid"], grid_unknown = _split(Grid, known["grid"])
    meta = parse(TableMeta, known, where, error)
    meta.unknown_fields = unknown
    if meta.grid is not None:
        meta.grid.unknown_fields = grid_unknown
    return meta


def grid_fields(grid: Grid) -> dict[str, Any]:
    """The grid's JSON object (as a sidecar and a journal's options hold it), carried fields included."""
    out = to_builtins(grid)
    return {**out.pop("unknown_fields"), **out}


def meta_fields(meta: TableMeta) -> dict[str, Any]:
    """The sidecar's JSON object: the declared fields that are set, and the carried unknown ones."""
    out = to_builtins(meta)
    if meta.grid is not None:
        out["grid"] = grid_fields(meta.grid)
    return {**out.pop("unknown_fields", {}), **out}


class EntryState(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """The device and host state around one (entry, round), as the build records it in the
    journal (``device.monitor.entry_state`` plus what the build adds). NaN is allowed: a monitor
    may report it, and the row keeps it."""

    energy_mj_per_step: float | None = None
    temperature_c: float | None = None
    clock_mhz: float | None = None
    power_w: float | None = None
    device_busy: float | None = None
    compile_s: float | None = None
    recompiles: float | None = None
    others_cpu_s: float | None = None
    window_s: float | None = None
    cores: float | None = None
    cores_needed: float | None = None
    throttled: bool | None = None
    clock_event_reasons: list[str] | None = None


class JournalHeader(msgspec.Struct, kw_only=True, tag_field="kind", tag="header", forbid_unknown_fields=True):
    """A journal's first line: ``identity`` hashes everything that makes results comparable."""

    identity: str
    options: dict[str, Any] = {}


class JournalResult(msgspec.Struct, kw_only=True, tag_field="kind", tag="result", forbid_unknown_fields=True):
    """One (entry, round) result. An ``ok`` one carries its samples (ms, finite) and the device
    state; a failed one (``oom``, ``unsupported``) only a note."""

    key: str
    round: NonNegativeInt
    status: Literal["ok", "oom", "unsupported"]
    note: str | None = None
    repeat: PositiveInt | None = None
    steps: PositiveInt | None = None
    wall_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    samples_ms: list[float] | None = None
    state: EntryState | None = None

    def __post_init__(self) -> None:
        ok_fields = ("repeat", "steps", "wall_s", "samples_ms", "state")
        present = [name for name in (*ok_fields, "note") if getattr(self, name) is not None]
        wanted = list(ok_fields) if self.status == "ok" else ["note"]
        if present != wanted:
            unknown = sorted(set(present) - set(wanted))
            missing = sorted(set(wanted) - set(present))
            raise ValueError(f"a {self.status} result has fields {unknown} unknown, {missing} missing")
        if self.wall_s is not None and not math.isfinite(self.wall_s):
            raise ValueError(f"wall_s={self.wall_s!r} is not a finite non-negative number")
        if self.samples_ms is not None and not self.samples_ms:
            raise ValueError("samples_ms is not a non-empty list")


S = TypeVar("S", bound=msgspec.Struct)
_PATH = re.compile(r" - at (`key` in )?`\$((?:\.\w+|\[\d+\])*)`$")


def parse(kind: type[S], value: Any, where: str, error: Callable[[str], AmoebaError]) -> S:
    """``value`` (decoded JSON, or a CSV record) as a ``kind``, or ``error`` naming ``where``, the
    field and its value: ``{where}: field 'grid.widths[0]'=1.5: Expected `float` <= 1.0``. CSV records
    convert leniently (a cell that is text where a number belongs is parsed), JSON strictly."""
    try:
        return msgspec.convert(value, kind, strict=False if kind is Row else True)
    except msgspec.ValidationError as exc:
        raise error(f"{where}: {describe(exc, value, kind)}") from None


def describe(exc: msgspec.ValidationError, value: Any, kind: type[msgspec.Struct]) -> str:
    """One line for a validation error: the field's path and value, then the rule it breaks (a
    table column's in words: ``heads=2.5 is not a non-negative integer``); for a mapping's key
    (msgspec names no key), the mapping's path."""
    message = str(exc)
    match = _PATH.search(message)
    if match is None or not match.group(2):
        reason = message[: match.start()] if match is not None else message
        return reason + _known(reason, kind, "")
    path = match.group(2).lstrip(".")
    reason = message[: match.start()]
    reason += _known(reason, kind, path)
    if match.group(1):
        return f"a key of '{path}': {reason}"
    found: Any = value
    for part in re.findall(r"\w+|\[\d+\]", path):
        try:
            found = found[int(part[1:-1])] if part.startswith("[") else found[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return f"field '{path}': {reason}"
    plain = _PLAIN.get(kind.__annotations__.get(path, ""))
    return f"{path}={found!r} is {plain}" if plain else f"field '{path}'={found!r}: {reason}"


def _known(reason: str, kind: type[msgspec.Struct], path: str) -> str:
    """For an unknown field, or a value that is no object where one belongs, what would have been
    accepted: the fields of the struct at ``path`` inside ``kind`` (``grid`` -> the grid's)."""
    if not reason.startswith(("Object contains unknown field", "Expected `object")):
        return ""
    here: Any = kind
    for name in re.findall(r"\w+", path):
        hints = get_type_hints(here, include_extras=True) if isinstance(here, type) else {}
        structs = [t for t in _members(hints.get(name)) if isinstance(t, type) and issubclass(t, msgspec.Struct)]
        if not structs:
            break
        here = structs[0]
    return f"; known fields: {sorted(set(here.__struct_fields__) - {'unknown_fields'})}"


def _members(hint: Any) -> list[Any]:
    """A type and what it unions or contains: ``list[Grid] | None`` -> Grid among them."""
    if hint is None:
        return []
    return [hint, *(member for arg in get_args(hint) for member in _members(arg))]


# A row column's rule in words (msgspec's message for an enumeration names only the bad value).
_PLAIN = {
    "NonNegativeInt": "not a non-negative integer",
    "Component": f"not one of {list(COMPONENTS)}",
    "Phase": f"not one of {list(PHASES)}",
    "Status": f"not one of {list(STATUSES)}",
    "Source": f"not one of {list(SOURCES)}",
    "RowMethod": f"not one of {list(ROW_METHODS)}",
}


def to_builtins(value: msgspec.Struct) -> dict[str, Any]:
    """A struct as the JSON-ready dict its file holds (defaults of ``omit_defaults`` structs left out)."""
    out = msgspec.to_builtins(value, enc_hook=_plain_value)
    assert isinstance(out, dict)
    return out


def _plain_value(value: Any) -> Any:
    """A subclass of str, int or float (torch's ``TorchVersion``, numpy's float64) as its base
    type, as ``json.dumps`` writes it; anything else is no JSON value."""
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    raise TypeError(f"{type(value).__name__} is no JSON value")
