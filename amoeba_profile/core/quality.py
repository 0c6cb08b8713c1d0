"""Where a shape's quality score comes from: a measured table, or a documented proxy.

A quality CSV has a ``score`` column (higher is better, e.g. mean accuracy) and identifies shapes
by ``num_layers`` + ``width_ratio``, by ``subnet_id``, or by ``name`` carrying an AmoebaLLM
evaluation suffix such as ``llama2-7b_l24w0.875``.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from amoeba_profile.core.arch import ModelArch, layer_params
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.inputs import MIB, finite_float, integer, read_bounded
from amoeba_profile.core.subnet import Subnet, parse_ratio

PROXY_NAME = "proxy: retained decoder parameters (fraction of base)"
_SUFFIX = re.compile(r"_l(\d+)w([0-9./]+)")
_CSV_BYTES = 16 * MIB


def retained_params(subnet: Subnet) -> float:
    arch = subnet.arch
    full = arch.num_layers * layer_params(arch, arch.num_heads, arch.num_kv_heads, arch.ffn_size)
    return sum(layer_params(arch, l.heads, l.kv_heads, l.ffn) for l in subnet.layers) / full


class ProxyQuality:
    name = PROXY_NAME

    def score(self, subnet: Subnet) -> float:
        return retained_params(subnet)

    def check_covers(self, subnets: Iterable[Subnet]) -> None:
        """The proxy scores every shape."""

    def check_model(self, arch: ModelArch) -> str | None:
        """The proxy is every model's."""
        return None


@dataclass
class TableQuality:
    """Scores read from a CSV; every shape asked about must be present exactly once."""

    path: Path
    by_shape: dict[tuple[int, float], float] = field(default_factory=dict)
    by_id: dict[str, float] = field(default_factory=dict)
    lines: dict[tuple[int, float], int] = field(default_factory=dict)  # CSV line of each (layers, width) row
    # The model part of AmoebaLLM evaluation names (``llama2-7b`` of ``llama2-7b_l24w0.875``) -> first line
    model_names: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"table: {self.path}"

    def _lookup(self, subnet: Subnet) -> float | None:
        if subnet.id in self.by_id:
            return self.by_id[subnet.id]
        if subnet.width_ratio is not None:
            for (layers, width), score in self.by_shape.items():
                if layers == subnet.num_layers and math.isclose(width, subnet.width_ratio, abs_tol=1e-3):
                    return score
        return None

    def score(self, subnet: Subnet) -> float:
        value = self._lookup(subnet)
        if value is None:
            raise UsageError(
                f"{self.path}: no score for {subnet.label} (layers={subnet.num_layers}, "
                f"width={subnet.width_ratio}, id={subnet.id})"
            )
        return value

    def check_model(self, arch: ModelArch) -> str | None:
        """Scores of another model are refused or named before they rank this one's shapes.

        A row deeper than ``arch`` cannot be one of its shapes: refused. An evaluation name whose
        model part is not ``arch``'s name (compared lowercase without punctuation, either containing
        the other, so ``Llama-2-7b-hf`` matches ``llama2-7b``) returns a one-line warning: the
        scores are matched by depth and width only, so another model's would be used silently."""
        deeper = sorted((line, layers) for (layers, _), line in self.lines.items() if layers > arch.num_layers)
        if deeper:
            line, layers = deeper[0]
            raise UsageError(
                f"{self.path}: line {line}: {layers} layers, but {arch.name} has {arch.num_layers}: "
                f"these are scores of another model; pass {arch.name}'s quality CSV"
            )
        mine = _squash(arch.name)
        foreign = sorted(
            (line, name)
            for name, line in self.model_names.items()
            if _squash(name) and mine not in _squash(name) and _squash(name) not in mine
        )
        if not foreign:
            return None
        line, name = foreign[0]
        return (
            f"{self.path}: line {line} scores a shape of {name!r}, this table is {arch.name!r}; its scores are "
            "matched by depth and width only - check it is this model's quality CSV"
        )

    def check_covers(self, subnets: Iterable[Subnet]) -> None:
        missing = [s.label for s in subnets if self._lookup(s) is None]
        if missing:
            shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise UsageError(
                f"{self.path}: quality table lacks {len(missing)} shapes of the design space ({shown}); "
                "add rows or narrow --widths"
            )


def read_small_csv(path: Path | str, what: str) -> pd.DataFrame:
    """A user's CSV (quality scores, layer importance), read only if it is a regular file of at most 16 MiB."""
    path = Path(path)
    data = read_bounded(path, _CSV_BYTES, what)
    try:
        return pd.read_csv(io.BytesIO(data))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable {what} ({' '.join(str(exc).split())[:200]})") from None


def csv_integer(value: Any, what: str, minimum: int) -> int:
    """A CSV cell as an int: 24 and 24.0 (pandas turns an int column with a gap into floats) pass,
    1.5 and 'x' are refused rather than truncated."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return integer(value, what, minimum=minimum)


def load_quality(path: Path | str) -> TableQuality:
    path = Path(path)
    frame = read_small_csv(path, "quality CSV")
    if "score" not in frame.columns:
        raise UsageError(f"{path}: missing column 'score'")
    quality = TableQuality(path)
    seen: dict[str | tuple[int, float], int] = {}
    for i, row in frame.iterrows():
        line = i + 2
        score = pd.to_numeric(row["score"], errors="coerce")
        if pd.isna(score):
            raise UsageError(f"{path}: line {line}: score {row['score']!r} is not a number")
        finite_float(score, f"{path}: line {line}: score")
        key: str | tuple[int, float]
        if "subnet_id" in frame.columns and isinstance(row.get("subnet_id"), str) and row["subnet_id"]:
            key = row["subnet_id"]
        else:
            key = _shape_key(row, frame.columns, path, line)
        if key in seen:
            raise UsageError(f"{path}: line {line} repeats the shape of line {seen[key]} ({key})")
        seen[key] = line
        if isinstance(key, str):
            quality.by_id[key] = float(score)
        else:
            quality.by_shape[key] = float(score)
            quality.lines[key] = line
            match = _SUFFIX.search(str(row["name"])) if "name" in frame.columns else None
            if match:
                quality.model_names.setdefault(str(row["name"])[: match.start()], line)
    return quality


def _squash(name: str) -> str:
    """A model name compared loosely: lowercase letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _shape_key(row, columns, path: Path, line: int) -> tuple[int, float]:
    """(num_layers, width) of a row; widths take the CLI's syntax (7/8 or 0.875), through ``parse_ratio``."""
    where = f"{path}: line {line}:"
    if "num_layers" in columns and "width_ratio" in columns:
        layers = csv_integer(row["num_layers"], f"{where} num_layers", minimum=1)
        return layers, round(_ratio(row["width_ratio"], where), 6)
    if "name" in columns:
        match = _SUFFIX.search(str(row["name"]))
        if match:
            return int(match.group(1)), round(_ratio(match.group(2), where), 6)
        raise UsageError(f"{path}: line {line}: name {row['name']!r} has no AmoebaLLM suffix like _l24w0.875")
    raise UsageError(f"{path}: needs columns num_layers + width_ratio, subnet_id, or name (with _l<N>w<ratio>)")


def _ratio(value: Any, where: str) -> float:
    try:
        return parse_ratio(str(value))
    except UsageError as exc:
        raise UsageError(f"{where} {exc}") from None
