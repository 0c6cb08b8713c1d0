"""Latency lookup tables: tidy CSV rows plus a JSON sidecar with provenance.

A table lives at ``<out>/<device-slug>/<backend>/<model>-<dtype>.csv`` with
``<model>-<dtype>.meta.json`` beside it. Files appear atomically (write, fsync, rename), the
sidecar carries the CSV's SHA-256, and loading validates every row and names file and row on
error; ``reseal`` accepts a CSV changed on purpose, once it validates. Tables are never pickled.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import msgspec
import pandas as pd

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.dtypes import BYTES_PER_ELEMENT
from amoeba_profile.core.entry import Entry, entry_key, samples_may_be_negative
from amoeba_profile.core.errors import AmoebaError, LutError
from amoeba_profile.core.files import fsync_dir, table_lock, write_file_atomically
from amoeba_profile.core.inputs import MIB, read_bounded
from amoeba_profile.core.schema import (
    COLUMNS,
    KEY_COLUMNS,
    OPTIONAL_COLUMNS,
    STAT_COLUMNS,
    TEXT_COLUMNS,
    Grid,
    Row,
    TableMeta,
    meta_fields,
    parse,
    table_meta,
)
from amoeba_profile.core.timing import Measurement, TimingProtocol

SCHEMA_VERSION = 2
# A latency above ~3 hours per forward is a corrupt or hand-edited cell, not a measurement.
MAX_LATENCY_MS = 1e7
MAX_TABLE_BYTES = 256 * MIB
MAX_SIDECAR_BYTES = 16 * MIB
# Schema 1 named the components method after how a block was timed; both are ``components`` now.
_V1_METHODS = {"isolated": "components", "stacked": "components"}


def table_path(out_dir: Path, device_slug: str, backend: str, model: str, dtype: str) -> Path:
    return Path(out_dir) / device_slug / backend / f"{model}-{dtype}.csv"


def sidecar_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.name.removesuffix(".csv") + ".meta.json")


def entry_key_of_row(row: dict[str, Any]) -> str:
    return entry_key(
        row["component"],
        row["phase"],
        int(row["batch"]),
        int(row["tokens"]),
        int(row["context"]),
        int(row["heads"]),
        int(row["kv_heads"]),
        int(row["ffn"]),
        row["subnet_id"] or "",
    )


def measured_row(
    entry: Entry,
    measurement: Measurement | None,
    status: str,
    *,
    method: str,
    repeat: int,
    wall_s: float,
    rounds: int = 0,
    flags: str = "",
    note: str = "",
    state: dict[str, float] | None = None,
) -> Row:
    """One tidy row, checked as a loaded one is (a status, method or count no table may hold fails
    here, not when the table is next read); stats are NaN unless status is ``ok``; ``state`` fills
    the device-state and diagnostic columns."""
    stats: dict[str, Any] = {c: math.nan for c in STAT_COLUMNS} | {"n": 0}
    if measurement is not None:
        stats = {
            "n": int(measurement.n),
            **{
                f"{stat}_ms": float(getattr(measurement, f"{stat}_ms"))
                for stat in ("median", "p10", "p90", "mean", "std")
            },
            "cv": float(measurement.cv),
        }
    fields = {
        "component": entry.component,
        "phase": entry.phase,
        **{name: int(getattr(entry, name)) for name in ("batch", "tokens", "context", "heads", "kv_heads", "ffn")},
        "num_layers": int(entry.num_layers),
        "subnet_id": entry.subnet_id,
        "method": method,
        "source": "measured",
        "status": status,
        "repeat": int(repeat),
        "rounds": int(rounds),
        "flags": flags,
        "wall_s": round(float(wall_s), 3),
        "note": note,
        "subnet_json": entry.subnet.to_json() if entry.subnet is not None else "",
        "samples_ms": json.dumps([round(x, 5) for x in measurement.samples_ms]) if measurement is not None else "[]",
        **stats,
        **{c: float((state or {}).get(c, math.nan)) for c in OPTIONAL_COLUMNS},
    }
    return parse(Row, fields, f"row of {entry.label}", LutError)


def short_of(frame: pd.DataFrame, protocol: TimingProtocol) -> pd.Series:
    """The rows measured with fewer rounds or fewer samples than ``protocol`` asks: a ``--quick``
    build's rows (2 rounds x 4 samples) under the default protocol (3 x 7). Only measured timings
    count; failed rows (oom, unsupported), computed ones (roofline) and a difference fit's derived
    rows (``rounds`` 0: their ``n`` counts models, not samples) are never short."""
    measured = frame["status"].isin(("ok", "error")) & (frame["source"] == "measured") & (frame["rounds"] > 0)
    asked_n = protocol.rounds * protocol.samples_per_round
    return measured & ((frame["rounds"] < protocol.rounds) | (frame["n"] < asked_n))


def rows_frame(rows: Iterable[Row]) -> pd.DataFrame:
    """A table's frame: the rows, in CSV column order, sorted by key."""
    frame = pd.DataFrame([msgspec.structs.asdict(row) for row in rows], columns=COLUMNS)
    return _sorted(frame)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    for column in ("subnet_id", "flags", "note", "subnet_json"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)


def frame_rows(frame: pd.DataFrame) -> list[Row]:
    """A frame's rows as ``Row``s (a loaded table's frame was checked row by row as it loaded)."""
    return [Row(**record) for record in frame[COLUMNS].to_dict("records")]


@dataclass
class Lut:
    """A loaded, validated table: rows (DataFrame) + sidecar (``TableMeta``; given as the sidecar's
    fields, a dict, it is checked and typed as loading does)."""

    frame: pd.DataFrame
    meta: TableMeta
    path: Path | None = None
    ok: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.meta, dict):
            self.meta = check_meta(self._sidecar, self.meta)
        self.ok = self.frame[self.frame["status"] == "ok"]

    @property
    def grid(self) -> Grid:
        """What the table's builds measured; an empty grid for a sidecar without one."""
        return self.meta.grid if self.meta.grid is not None else Grid()

    @property
    def is_roofline(self) -> bool:
        return bool((self.frame["source"] == "roofline").any())

    @property
    def file(self) -> Path:
        """The CSV the table was loaded from; a table built in memory has none."""
        if self.path is None:
            raise LutError("the table was built in memory, not loaded from a file")
        return self.path

    @property
    def arch(self) -> ModelArch:
        """The architecture the table was built for (checked when the table was loaded)."""
        if self.meta.arch is None:
            raise LutError(f"{self._sidecar}: no 'arch'; not a table written by amoeba-profile")
        return ModelArch.from_dict(self.meta.arch)

    @property
    def dtype(self) -> str:
        return self._required("dtype", self.meta.dtype)

    @property
    def device_slug(self) -> str:
        return self._required("device_slug", self.meta.device_slug)

    @property
    def backend(self) -> str:
        """The flow the table was measured (or computed) for."""
        return self._required("backend", self.meta.backend)

    def _required(self, name: str, value: str | None) -> str:
        if value is None:
            raise LutError(f"{self._sidecar}: no '{name}'; not a table written by amoeba-profile")
        return value

    @property
    def _sidecar(self) -> str:
        return str(sidecar_path(self.path)) if self.path is not None else "table sidecar"


def pending_sidecar_path(csv_path: Path) -> Path:
    return sidecar_path(csv_path).with_name(sidecar_path(csv_path).name + ".pending")


def _finish_interrupted_write(path: Path) -> None:
    """Roll a write killed mid-way forward (or back) before starting the next one.

    A pending sidecar that matches the CSV is the provenance of a committed write whose last rename
    never ran: it is promoted, so the next write's own pending sidecar never replaces the only
    sidecar the current CSV has. One that matches nothing is from a write killed before its commit
    and is dropped, as are the temp files a SIGKILL left. Callers hold the table's lock, so no
    other writer's temp file is touched."""
    pending = pending_sidecar_path(path)
    meta = _read_sidecar(pending) if pending.is_file() else None
    if (
        meta is not None
        and path.is_file()
        and meta.get("content_sha256")
        == hashlib.sha256(read_bounded(path, MAX_TABLE_BYTES, "latency table", error=LutError)).hexdigest()
    ):
        os.replace(pending, sidecar_path(path))
    else:
        pending.unlink(missing_ok=True)
    for name in (path.name, sidecar_path(path).name, pending.name):
        for orphan in path.parent.glob(f".{glob.escape(name)}.*.tmp"):
            orphan.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _refuse_read_only(path: Path) -> None:
    """A table whose CSV has no write permission bit is kept as it is, even by root (whom
    permission bits do not stop, and a rename over the file would not be stopped either)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not mode & 0o222:
        raise LutError(
            f"{path}: the table is read-only (mode {stat.filemode(mode)}); make it writable (chmod u+w) to change it"
        )


def write_table(path: Path, frame: pd.DataFrame, meta: TableMeta | dict[str, Any]) -> None:
    """Write CSV and sidecar with one commit point: the rename of the CSV.

    The new sidecar is first put beside the old one as ``.meta.json.pending``; then the CSV is
    renamed into place; then the pending sidecar replaces the old one. A crash before the CSV rename
    leaves the old table whole (the stale pending sidecar matches nothing); a crash after it leaves
    the new CSV whose provenance is the pending sidecar, which ``load_table`` accepts and the next
    write replaces. A reader therefore sees the old table or the new one, never a mix.
    """
    path = Path(path)
    _refuse_read_only(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _finish_interrupted_write(path)
    data = _sorted(frame.reindex(columns=COLUMNS)).to_csv(index=False, float_format="%.6g").encode()
    fields = meta_fields(meta) if isinstance(meta, TableMeta) else meta_fields(check_meta(sidecar_path(path), meta))
    fields.update(schema_version=SCHEMA_VERSION, rows=len(frame), content_sha256=hashlib.sha256(data).hexdigest())
    pending = pending_sidecar_path(path)
    write_file_atomically(pending, _sidecar_bytes(fields))
    write_file_atomically(path, data)
    os.replace(pending, sidecar_path(path))
    fsync_dir(path.parent)


def _bad(path: Path | None, index: int, message: str) -> LutError:
    # CSV line = header line + 1-based row number.
    return LutError(f"{path or 'table'}: row {index + 1} (line {index + 2}): {message}")


def _validate(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Every row as a ``schema.Row`` (types, enumerations, bounds), then what spans fields and rows:
    the stats' order and range, and unique entry keys."""
    for column in OPTIONAL_COLUMNS:  # optional: device-state and diagnostic columns may be absent
        if column not in frame.columns:
            frame[column] = math.nan
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise LutError(f"{path}: missing columns {missing}; not a table written by amoeba-profile")
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].fillna("").astype(str)
    rows = [
        parse(Row, record, f"{path}: row {i + 1} (line {i + 2})", LutError)
        for i, record in enumerate(frame[COLUMNS].to_dict("records"))
    ]
    frame = pd.DataFrame([msgspec.structs.asdict(row) for row in rows], columns=COLUMNS)
    ok = frame["status"] == "ok"
    stats = frame.loc[ok, ["median_ms", "p10_ms", "p90_ms"]]
    signed = pd.Series(
        [samples_may_be_negative(c, p) for c, p in zip(frame["component"], frame["phase"])], index=frame.index
    )[ok]
    # A difference fit's base may be held at exactly 0 ms (``fit``: the least-squares optimum under base >= 0).
    zero_base = (
        (frame.loc[ok, "component"] == "base") & (frame.loc[ok, "method"] == "difference") & stats.eq(0).all(axis=1)
    )
    bad = ~(
        (stats["median_ms"].gt(0) & (stats["p10_ms"].gt(0) | signed) | zero_base)
        & stats.le(MAX_LATENCY_MS).all(axis=1)
        & (stats["p10_ms"] <= stats["median_ms"] * (1 + 1e-6))
        & (stats["median_ms"] <= stats["p90_ms"] * (1 + 1e-6))
    )
    if bad.any():
        i = int(bad[bad].index[0])
        raise _bad(
            path,
            i,
            f"latency stats median={frame.at[i, 'median_ms']} p10={frame.at[i, 'p10_ms']} "
            f"p90={frame.at[i, 'p90_ms']} are not finite, <= {MAX_LATENCY_MS:g} ms and "
            "p10 <= median <= p90 with a positive median (and p10, except on serving-loop decode rows; "
            "a difference fit's base may be 0)",
        )
    keys = frame.apply(lambda r: entry_key_of_row(r), axis=1)
    dup = keys.duplicated()
    if dup.any():
        i = int(dup.idxmax())
        raise _bad(path, i, f"duplicate entry {keys[i]}")
    return frame


def _read_sidecar(meta_path: Path) -> dict[str, Any] | None:
    if not meta_path.exists():
        return None
    try:
        data = read_bounded(meta_path, MAX_SIDECAR_BYTES, "table sidecar", error=LutError)
    except LutError:
        if not meta_path.exists():  # a writer renamed it away between the check and the open
            return None
        raise
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise LutError(f"{meta_path}: sidecar is not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict):
        raise LutError(f"{meta_path}: sidecar is not a JSON object")
    return meta


def _sidecar_bytes(fields: dict[str, Any]) -> bytes:
    return (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode()


def check_meta(meta_path: Path | str, fields: dict[str, Any]) -> TableMeta:
    """The sidecar's fields, typed and checked (``schema.TableMeta``), naming the file and the field,
    so that no reader fails later with a bare TypeError; then what one type cannot say: a known
    dtype and an architecture that parses. Fields are optional; present ones must be right."""
    meta = table_meta(fields, str(meta_path), LutError)
    if meta.dtype is not None and meta.dtype not in BYTES_PER_ELEMENT:
        raise LutError(f"{meta_path}: field 'dtype'={meta.dtype!r} is not one of {sorted(BYTES_PER_ELEMENT)}")
    if meta.arch is not None:
        try:
            ModelArch.from_dict(meta.arch)
        except AmoebaError as exc:
            raise LutError(f"{meta_path}: field 'arch': {exc}") from None
    return meta


def _read_consistent(path: Path, tries: int = 5) -> tuple[bytes, dict[str, Any], Path]:
    """CSV bytes and the sidecar (committed, or pending after a crash) whose SHA-256 they match.

    A writer renames the CSV and then the sidecar; a reader between the two renames retries."""
    for attempt in range(tries):
        data = read_bounded(path, MAX_TABLE_BYTES, "latency table", error=LutError)
        digest = hashlib.sha256(data).hexdigest()
        for meta_path in (sidecar_path(path), pending_sidecar_path(path)):
            meta = _read_sidecar(meta_path)
            if meta is not None and meta.get("content_sha256") == digest:
                return data, meta, meta_path
        if attempt < tries - 1:
            time.sleep(0.02 * (attempt + 1))
    if not sidecar_path(path).is_file() and not pending_sidecar_path(path).is_file():
        raise LutError(f"{path}: sidecar {sidecar_path(path).name} is missing; a table without provenance is refused")
    raise LutError(
        f"{path}: content does not match the sidecar's SHA-256 (edited or truncated); rebuild or restore "
        f"it, or, if you changed it on purpose (e.g. re-saved it with pandas), check and re-seal it: "
        f"amoeba-profile reseal --lut {path}"
    )


def load_table(path: Path | str) -> Lut:
    path = Path(path)
    if not path.is_file():
        raise LutError(f"{path}: no such table; build one with 'amoeba-profile build-lut'")
    data, meta, meta_path = _read_consistent(path)
    return _parse(path, data, meta, meta_path)


def _parse(path: Path, data: bytes, fields: dict[str, Any], meta_path: Path) -> Lut:
    """The validated table in ``data`` (the CSV's bytes) under the sidecar's ``fields``."""
    version = fields.get("schema_version")
    if version not in (1, SCHEMA_VERSION):
        raise LutError(f"{meta_path}: schema_version {version!r}, this tool reads 1 and {SCHEMA_VERSION}")
    try:
        frame = pd.read_csv(
            io.BytesIO(data),
            dtype={"subnet_id": str, "flags": str, "note": str, "subnet_json": str, "samples_ms": str},
            keep_default_na=False,
            na_values=[""],
        )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise LutError(f"{path}: not a readable CSV table ({str(exc).splitlines()[0]})") from None
    meta = check_meta(meta_path, fields)
    if version == 1:
        frame["method"] = frame["method"].replace(_V1_METHODS)
        meta.method = meta.method or "components"
    return Lut(_validate(path, frame)[COLUMNS], meta, path)


# Which components a table of each method holds beside its ``model`` rows (``whole``), all with the
# table's method: components measures blocks alone, difference fits layers, a roofline computes any.
# table method -> the components its non-model rows may be, and the method each such row records
_METHOD_COMPONENTS = {
    "components": {"attn": "components", "mlp": "components", "base": "components"},
    "calibrated": {"attn": "components", "mlp": "components", "base": "components", "layer": "calibrated"},
    "difference": {"layer": "difference", "base": "difference"},
    "computed": {"attn": "computed", "mlp": "computed", "base": "computed", "layer": "computed"},
}


def _samples_problem(row: dict[str, Any], measured: bool) -> str | None:
    """What is wrong with a row's ``samples_ms`` and the stats made of them, or None."""
    try:
        samples = json.loads(row["samples_ms"])
    except (TypeError, ValueError, RecursionError):
        return f"samples_ms={str(row['samples_ms'])[:40]!r} is not a JSON list of numbers"
    if not isinstance(samples, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in samples
    ):
        return f"samples_ms={str(row['samples_ms'])[:40]!r} is not a JSON list of finite numbers"
    if row["status"] != "ok":
        return None
    if not measured:  # a fitted or computed row has no samples; n counts the models it was fitted from
        return "n=0: a fitted row counts at least one model" if row["method"] == "difference" and row["n"] < 1 else None
    if not samples or row["n"] != len(samples):
        return f"n={row['n']} but samples_ms holds {len(samples)} samples; a measured row has n >= 1 samples"
    if not samples_may_be_negative(row["component"], row["phase"]) and min(samples) <= 0:
        return f"samples_ms holds {min(samples)!r}, not a positive number of milliseconds"
    from_samples = Measurement.from_samples(samples)
    for column in ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms"):
        stored, computed = row[column], getattr(from_samples, column)
        if not math.isclose(stored, computed, rel_tol=1e-3, abs_tol=1e-4):  # samples keep 5 decimals
            return f"{column}={stored!r} is not the {column.removesuffix('_ms')} of its samples_ms ({computed:.6g})"
    return None


def _shape_problem(row: dict[str, Any], arch: ModelArch) -> str | None:
    """What makes a row's (heads, kv_heads, ffn) a shape outside ``arch``'s design space, or None.
    The rule is the one every subnet obeys (``Subnet``): whole GQA groups, widths within the model."""
    from amoeba_profile.core.errors import UnsupportedShape
    from amoeba_profile.core.subnet import LayerShape, Subnet

    component = row["component"]
    uses = {"attn": ("heads", "kv_heads"), "mlp": ("ffn",), "layer": ("heads", "kv_heads", "ffn")}.get(component, ())
    unused = [c for c in ("heads", "kv_heads", "ffn") if c not in uses and row[c] != 0]
    if unused:
        return f"{unused[0]}={row[unused[0]]} on a {component} row, which has none"
    if not uses:
        return None
    heads = row["heads"] if "heads" in uses else arch.num_heads
    kv_heads = row["kv_heads"] if "kv_heads" in uses else arch.num_kv_heads
    ffn = row["ffn"] if "ffn" in uses else arch.ffn_size
    try:
        Subnet(arch, (LayerShape(0, heads, kv_heads, ffn),))
    except UnsupportedShape as exc:
        return f"not a shape of {arch.name} ({str(exc).removeprefix('layer 0: ')})"
    return None


def _model_problem(row: dict[str, Any], arch: ModelArch) -> str | None:
    """What is wrong with a ``model`` row's subnet (it must parse, be of ``arch`` and match its key)."""
    from amoeba_profile.core.errors import AmoebaError
    from amoeba_profile.core.subnet import Subnet

    if not row["subnet_json"]:
        return (
            None
            if row["subnet_id"] == "" and row["num_layers"] == 0
            else "a model row without subnet_json must be the 0-layer model (no subnet_id, num_layers 0)"
        )
    try:
        subnet = Subnet.from_json(row["subnet_json"])
    except (AmoebaError, RecursionError) as exc:
        return f"subnet_json does not describe a subnet ({' '.join(str(exc).split())[:120]})"
    if subnet.arch != arch:
        return f"subnet_json is a subnet of {subnet.arch.name}, not of the table's {arch.name}"
    if (subnet.id, subnet.num_layers) != (row["subnet_id"], row["num_layers"]):
        return (
            f"subnet_json is subnet {subnet.id} of {subnet.num_layers} layers, the row says {row['subnet_id']} "
            f"of {row['num_layers']}"
        )
    return None


def _grid_shapes(lut: Lut) -> dict[str, set[tuple[int, ...]]]:
    """The (heads, kv_heads) of attn rows, (ffn,) of mlp rows and (heads, kv_heads, ffn) of layer
    rows that the table's grid makes, as a build makes them (``subnet.grid_shapes``); empty for a sidecar
    whose grid lists no widths, prompt lengths and contexts."""
    from amoeba_profile.core.errors import UsageError
    from amoeba_profile.core.subnet import grid_shapes

    grid = lut.grid
    if not (grid.widths and grid.prompt_lens and grid.contexts):
        return {}
    try:
        attn, ffn, layers = grid_shapes(
            lut.arch,
            tuple(grid.widths),
            grid.ffn_multiple,
            tuple((heads, kv_heads) for heads, kv_heads in grid.extra_attn),
            tuple(grid.extra_ffn),
        )
    except (UsageError, TypeError, ValueError) as exc:
        raise LutError(f"{lut._sidecar}: field 'grid' is not a grid a build makes ({exc})") from None
    return {"attn": set(attn), "mlp": {(f,) for f in ffn}, "layer": set(layers)}


def check_rows(lut: Lut) -> None:
    """Refuse a table whose rows, each valid for the loader (``_validate``), still cannot be what a
    build wrote: a shape outside the model, a component its method does not make, a prompt length
    or context off its own grid, stats that are not those of the row's samples, a model row whose
    subnet does not parse. ``reseal`` runs it before sealing a CSV changed by hand; a table written
    by a build is sealed as written, so loading needs only ``_validate``."""
    path, arch, method, grid = lut.path, lut.arch, lut.meta.method, lut.grid
    off_grid = {"prefill": ("tokens", set(grid.prompt_lens)), "decode": ("context", set(grid.contexts))}
    shapes = _grid_shapes(lut)
    for index, row in enumerate(lut.frame.to_dict("records")):
        component = row["component"]
        if component == "model":
            problem = None if row["method"] == "whole" else f"method={row['method']!r} on a model row, not 'whole'"
            problem = problem or _model_problem(row, arch)
        elif method in _METHOD_COMPONENTS and _METHOD_COMPONENTS[method].get(component) != row["method"]:
            problem = (
                f"a {component} row of method {row['method']!r}; a table of method {method!r} holds model "
                f"rows and {', '.join(sorted(_METHOD_COMPONENTS[method]))} rows of its method"
            )
        else:
            problem = _shape_problem(row, arch)
            shape = tuple(
                row[c]
                for c in {"attn": ("heads", "kv_heads"), "mlp": ("ffn",), "layer": ("heads", "kv_heads", "ffn")}.get(
                    component, ()
                )
            )
            if problem is None and shapes and shape and shape not in shapes[component]:
                problem = f"{component} shape {shape} is not one of the table's grid {sorted(shapes[component])}"
            column, values = off_grid[row["phase"]]
            if (
                problem is None
                and values
                and not (component == "mlp" and row["phase"] == "decode")
                and row[column] not in values
            ):
                problem = f"{column}={row[column]} is not in the table's grid {sorted(values)}"
        if problem is None and row["status"] == "ok":
            negative = [c for c in ("mean_ms", "std_ms", "cv") if row[c] < 0]
            if negative and not samples_may_be_negative(component, row["phase"]):
                problem = f"{negative[0]}={row[negative[0]]} is negative"
        problem = problem or _samples_problem(
            row, row["source"] == "measured" and row["method"] not in ("difference", "calibrated")
        )
        if problem is not None:
            raise _bad(path, index, problem)


def reseal(path: Path | str) -> dict[str, Any]:
    """Accept a table's CSV as it now is - edited or re-saved outside amoeba-profile - after checking
    every row against the schema, as loading does, and against the table's own model, method and
    grid (``check_rows``). A write interrupted between its renames is finished first, so the CSV
    gets the sidecar written with it, not the one before. The sidecar's SHA-256 becomes the CSV's,
    and the sidecar records the re-seal (when, old and new SHA-256) so the table's provenance says
    its rows were not all written by a build. Returns that record."""
    path = Path(path)
    if not path.is_file():
        raise LutError(f"{path}: no such table")
    with table_lock(path):  # not while a build or validate rewrites the table
        pending = pending_sidecar_path(path)
        if pending.is_file() and not sidecar_path(path).is_file():
            os.replace(pending, sidecar_path(path))  # a first write cut short: the CSV's only provenance
        _finish_interrupted_write(path)
        meta_path = sidecar_path(path)
        meta = _read_sidecar(meta_path)
        if meta is None:
            raise LutError(
                f"{path}: sidecar {sidecar_path(path).name} is missing; a table without provenance cannot be re-sealed"
            )
        data = read_bounded(path, MAX_TABLE_BYTES, "latency table", error=LutError)
        lut = _parse(path, data, meta, meta_path)
        check_rows(lut)
        record = {
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "old_sha256": lut.meta.content_sha256,
            "new_sha256": hashlib.sha256(data).hexdigest(),
        }
        lut.meta.content_sha256, lut.meta.rows = record["new_sha256"], len(lut.frame)
        lut.meta.resealed = [*(lut.meta.resealed or []), record]
        write_file_atomically(sidecar_path(path), _sidecar_bytes(meta_fields(lut.meta)))
    return record


def find_tables(path: Path | str) -> list[Path]:
    """The table files at ``path``: the file itself, or every table under a folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.csv") if sidecar_path(p).is_file() or pending_sidecar_path(p).is_file())
    raise LutError(f"{path}: no such file or folder")


def load_one(path: Path | str) -> Lut:
    """The single table at ``path``; a folder holding several is an error listing them."""
    tables = find_tables(path)
    if not tables:
        raise LutError(f"{path}: holds no tables; build one with 'amoeba-profile build-lut'")
    if len(tables) > 1:
        listing = ", ".join(str(t) for t in tables[:6])
        raise LutError(f"{path}: holds {len(tables)} tables; pass one file: {listing}")
    return load_table(tables[0])
