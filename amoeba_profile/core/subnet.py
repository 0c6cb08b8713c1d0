"""Subnets: which decoder layers are kept and how wide each one is.

A subnet is first-class per layer (FLAP-style pruning gives every layer its own widths); the
uniform (num_layers, width_ratio) grid of AmoebaLLM is one way of producing them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import UnsupportedShape, UsageError

# AmoebaLLM's reference grid for a 32-layer model: 20..32 layers x these width ratios.
AMOEBA_WIDTHS: tuple[float, ...] = (1.0, 7 / 8, 3 / 4, 5 / 8)
AMOEBA_MIN_DEPTH_FRACTION = 20 / 32


@dataclass(frozen=True)
class LayerShape:
    """One kept decoder layer: its index in the base model and its widths."""

    index: int
    heads: int
    kv_heads: int
    ffn: int


def _drop_keep_ends(num_layers: int, keep: int) -> list[int]:
    # Layer-pruning studies (and AmoebaLLM's own DP strategies) find the first and the last
    # layers the least expendable and late-middle layers the most: drop backwards from the
    # second-to-last layer.
    return list(range(keep - 1)) + [num_layers - 1] if keep < num_layers else list(range(num_layers))


def _drop_uniform(num_layers: int, keep: int) -> list[int]:
    # Evenly spaced survivors, first and last always kept.
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


DROP_RULES: dict[str, Callable[[int, int], list[int]]] = {
    "keep-ends": _drop_keep_ends,
    "uniform": _drop_uniform,
}
DEFAULT_DROP_RULE = "keep-ends"


def kept_layers(arch: ModelArch, num_layers: int, rule: str = DEFAULT_DROP_RULE) -> list[int]:
    """Indices of the layers kept when the base model is cut to ``num_layers``."""
    if rule not in DROP_RULES:
        raise UsageError(f"unknown drop rule {rule!r}: use one of {sorted(DROP_RULES)}")
    if not 1 <= num_layers <= arch.num_layers:
        raise UnsupportedShape(f"{arch.name} has {arch.num_layers} layers; cannot keep {num_layers}")
    return DROP_RULES[rule](arch.num_layers, num_layers)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def width_shape(arch: ModelArch, width_ratio: float, ffn_multiple: int = 1) -> tuple[int, int, int]:
    """(heads, kv_heads, ffn) kept at ``width_ratio`` of the full width.

    Attention is pruned by whole key/value groups so GQA stays consistent: kv groups kept =
    round(kv_heads * ratio) (ties keep more), heads = groups * group size. FFN channels =
    round(ffn * ratio) to a multiple of ``ffn_multiple``.
    """
    if not 0 < width_ratio <= 1:
        raise UsageError(f"width ratio must be in (0, 1], got {width_ratio}")
    kv = max(1, min(arch.num_kv_heads, _round_half_up(arch.num_kv_heads * width_ratio)))
    ffn = max(ffn_multiple, _round_half_up(arch.ffn_size * width_ratio / ffn_multiple) * ffn_multiple)
    return kv * arch.group_size, kv, min(ffn, arch.ffn_size)


def grid_shapes(
    arch: ModelArch,
    widths: Sequence[float],
    ffn_multiple: int = 1,
    extra_attn: Sequence[tuple[int, int]] = (),
    extra_ffn: Sequence[int] = (),
) -> tuple[list[tuple[int, int]], list[int], list[tuple[int, int, int]]]:
    """What a grid of width ratios measures: (heads, kv_heads) attention shapes, FFN sizes, and the
    layer shapes on two axes through the full width (each width's heads at full FFN, each width's
    FFN at full heads). Builds plan with it and ``reseal`` checks rows against it."""
    attn = sorted(
        {width_shape(arch, w, ffn_multiple)[:2] for w in widths} | {(heads, kv_heads) for heads, kv_heads in extra_attn}
    )
    ffn = sorted({width_shape(arch, w, ffn_multiple)[2] for w in widths} | set(extra_ffn))
    layers = sorted(
        {(arch.num_heads, arch.num_kv_heads, arch.ffn_size)}
        | {(h, kv, arch.ffn_size) for h, kv in attn}
        | {(arch.num_heads, arch.num_kv_heads, f) for f in ffn}
    )
    return attn, ffn, layers


@dataclass(frozen=True)
class Subnet:
    """A shape cut from ``arch``: one LayerShape per kept layer, in base-model order."""

    arch: ModelArch
    layers: tuple[LayerShape, ...]
    width_ratio: float | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise UnsupportedShape("a subnet needs at least one layer")
        previous = -1
        for layer in self.layers:
            if not previous < layer.index < self.arch.num_layers:
                raise UnsupportedShape(
                    f"layer indices must increase within 0..{self.arch.num_layers - 1}; got {layer.index} after {previous}"
                )
            previous = layer.index
            if not 1 <= layer.kv_heads <= self.arch.num_kv_heads:
                raise UnsupportedShape(
                    f"layer {layer.index}: kv_heads={layer.kv_heads} outside 1..{self.arch.num_kv_heads}"
                )
            if layer.heads != layer.kv_heads * self.arch.group_size:
                raise UnsupportedShape(
                    f"layer {layer.index}: heads={layer.heads} must be kv_heads x {self.arch.group_size} "
                    "(whole GQA groups are pruned together)"
                )
            if not 1 <= layer.ffn <= self.arch.ffn_size:
                raise UnsupportedShape(f"layer {layer.index}: ffn={layer.ffn} outside 1..{self.arch.ffn_size}")

    @classmethod
    def uniform(
        cls,
        arch: ModelArch,
        num_layers: int,
        width_ratio: float = 1.0,
        drop_rule: str = DEFAULT_DROP_RULE,
        ffn_multiple: int = 1,
    ) -> "Subnet":
        heads, kv, ffn = width_shape(arch, width_ratio, ffn_multiple)
        layers = tuple(LayerShape(i, heads, kv, ffn) for i in kept_layers(arch, num_layers, drop_rule))
        return cls(arch, layers, width_ratio)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kept_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    @property
    def is_uniform(self) -> bool:
        return len({(l.heads, l.kv_heads, l.ffn) for l in self.layers}) == 1

    @property
    def id(self) -> str:
        """Stable content hash: same base arch and same layer shapes give the same id."""
        canonical = json.dumps(
            {"arch": self.arch.to_dict(), "layers": [[l.index, l.heads, l.kv_heads, l.ffn] for l in self.layers]},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """Short human name: ``L18-w0.750`` for uniform shapes, ``L18-custom-<id>`` otherwise."""
        if self.width_ratio is not None:
            return f"L{self.num_layers}-w{self.width_ratio:.3f}"
        return f"L{self.num_layers}-custom-{self.id[:6]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "arch": self.arch.to_dict(),
            "num_layers": self.num_layers,
            "width_ratio": self.width_ratio,
            "kept_layers": self.kept_indices,
            "layers": [{"index": l.index, "heads": l.heads, "kv_heads": l.kv_heads, "ffn": l.ffn} for l in self.layers],
        }

    def layer_runs(self) -> list[tuple[list[int], int, int, int]]:
        """(layer indices, heads, kv_heads, ffn) for each run of consecutive kept layers of one
        shape: a uniform subnet is one run. The compact form of a per-layer shape."""
        runs: list[tuple[list[int], int, int, int]] = []
        for l in self.layers:
            if runs and runs[-1][1:] == (l.heads, l.kv_heads, l.ffn):
                runs[-1][0].append(l.index)
            else:
                runs.append(([l.index], l.heads, l.kv_heads, l.ffn))
        return runs

    def to_compact_dict(self) -> dict[str, Any]:
        """``to_dict`` without the architecture and with layers as runs: for listing many subnets
        of one model (``from_dict`` needs the full form)."""
        return {
            "id": self.id,
            "label": self.label,
            "num_layers": self.num_layers,
            "width_ratio": self.width_ratio,
            "kept_layers": self.kept_indices,
            "layer_runs": [
                {"layers": indices, "heads": heads, "kv_heads": kv, "ffn": ffn}
                for indices, heads, kv, ffn in self.layer_runs()
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], arch: ModelArch | None = None) -> "Subnet":
        """Inverse of to_dict; ``arch`` stands in when the dict carries none."""
        try:
            base = ModelArch.from_dict(data["arch"]) if "arch" in data else arch
            if base is None:
                raise UsageError("subnet JSON has no 'arch' and no base architecture was given")
            layers = tuple(
                LayerShape(int(l["index"]), int(l["heads"]), int(l["kv_heads"]), int(l["ffn"])) for l in data["layers"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"malformed subnet JSON: missing or bad field {exc}") from None
        subnet = cls(base, layers, data.get("width_ratio"))
        if "id" in data and data["id"] != subnet.id:
            raise UsageError(f"subnet JSON id {data['id']} does not match its layers (computed {subnet.id})")
        return subnet

    @classmethod
    def from_json(cls, text: str, arch: ModelArch | None = None) -> "Subnet":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"subnet JSON does not parse: {exc}") from None
        return cls.from_dict(data, arch)


def default_depths(arch: ModelArch) -> list[int]:
    """AmoebaLLM's 20..32 of 32 layers, scaled by ratio for other depths."""
    low = max(1, _round_half_up(arch.num_layers * AMOEBA_MIN_DEPTH_FRACTION))
    return list(range(low, arch.num_layers + 1))


def parse_ratio(text: str) -> float:
    """'7/8', '0.875' or '1' -> float, with a clear error."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"bad width ratio {text!r}: write a fraction like 7/8 or a decimal like 0.875") from None
    if not 0 < value <= 1:
        raise UsageError(f"width ratio {text!r} must be in (0, 1]")
    return value


def parse_whole(arch: ModelArch, text: str | None) -> tuple[Subnet, ...]:
    """'22x1,18x3/4' -> uniform subnets measured whole (model rows for validation); build-lut's
    ``--whole`` and a fleet plan's ``whole`` read the same text."""
    if not text:
        return ()
    subnets = []
    for item in text.split(","):
        depth, _, width = item.strip().partition("x")
        if not depth.isdigit() or not width:
            raise UsageError(f"--whole items look like 18x3/4 (layers x width), got {item!r}")
        if not 1 <= int(depth) <= arch.num_layers:
            raise UsageError(
                f"--whole {item.strip()}: {arch.name} has {arch.num_layers} layers; keep 1..{arch.num_layers}"
            )
        subnets.append(Subnet.uniform(arch, int(depth), parse_ratio(width)))
    return tuple(subnets)


@dataclass(frozen=True)
class DesignSpace:
    """The uniform (num_layers x width_ratio) grid a picker enumerates."""

    arch: ModelArch
    depths: tuple[int, ...]
    widths: tuple[float, ...]
    drop_rule: str = DEFAULT_DROP_RULE
    ffn_multiple: int = 1

    @classmethod
    def amoeba(cls, arch: ModelArch, widths: Sequence[float] = AMOEBA_WIDTHS, **kw: Any) -> "DesignSpace":
        return cls(arch, tuple(default_depths(arch)), tuple(widths), **kw)

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """Distinct (heads, kv_heads, ffn) that the grid's widths produce."""
        return sorted({width_shape(self.arch, w, self.ffn_multiple) for w in self.widths})

    def subnets(self) -> Iterable[Subnet]:
        for depth in self.depths:
            for width in self.widths:
                yield Subnet.uniform(self.arch, depth, width, self.drop_rule, self.ffn_multiple)
