"""AmoebaLLM selection-strategy files: exact kept layers and per-layer widths for every shape.

AmoebaLLM saves ``np.save(path, {"strategy": ..., "width_mask": ..., "bias": ...})``, a NumPy file
holding a pickled dict. Pickles execute code, so the file is read with a restricted unpickler that
admits only dicts, lists, tuples, numbers, strings and ndarrays - never ``allow_pickle=True`` on a
user file.

- ``strategy``: removed-layer count -> 0/1 array over the base layers (1 = kept); 0 may be absent.
- ``width_mask``: module name -> {remaining ratio: bool array over output channels}, or None for
  o_proj / down_proj. Attention masks repeat per head: heads kept = mask.sum() / head_dim.
- ``bias``: FLAP's bias compensation - no effect on latency, ignored.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .arch import ModelArch
from .errors import UnsupportedShape, UsageError
from .subnet import LayerShape, Subnet

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_RATIO_TOL = 1e-3


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream, source: str):
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UsageError(f"{self.source}: refused to load {module}.{name} - strategy files may hold only dicts, lists, "
                         "numbers, strings and arrays")


def load_pickled(path: Path | str) -> Any:
    """The object in an .npy (object array) or plain pickle file, through the restricted unpickler."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read strategy file ({exc.strerror})") from None
    stream = io.BytesIO(raw)
    try:
        if raw.startswith(b"\x93NUMPY"):
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(stream)
            if dtype.hasobject:
                value = _RestrictedUnpickler(stream, str(path)).load()
                return value.item() if isinstance(value, np.ndarray) and value.shape == () else value
            return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        return _RestrictedUnpickler(stream, str(path)).load()
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise UsageError(f"{path}: not a readable strategy file ({type(exc).__name__}: {exc})") from None


def _match_ratio(masks: dict, ratio: float, module: str, source: str):
    for key, mask in masks.items():
        if math.isclose(float(key), ratio, abs_tol=_RATIO_TOL):
            return mask
    available = ", ".join(f"{float(k):g}" for k in sorted(masks, key=float))
    raise UsageError(f"{source}: no width ratio {ratio:g} for {module}; available: {available}")


@dataclass(frozen=True)
class Strategy:
    """A parsed AmoebaLLM strategy for one base architecture."""

    arch: ModelArch
    kept_by_removed: dict[int, np.ndarray]
    width_mask: dict[int, dict[str, dict[float, np.ndarray]]]  # layer -> proj -> ratio -> mask
    source: str

    @classmethod
    def load(cls, path: Path | str, arch: ModelArch) -> "Strategy":
        data = load_pickled(path)
        source = str(path)
        if not isinstance(data, dict) or "strategy" not in data:
            raise UsageError(f"{source}: expected a dict with a 'strategy' key (AmoebaLLM's np.save format)")
        kept = {}
        for removed, mask in data["strategy"].items():
            mask = np.asarray(mask).astype(int).ravel()
            if mask.size != arch.num_layers:
                raise UsageError(f"{source}: strategy[{removed}] covers {mask.size} layers, {arch.name} has {arch.num_layers}")
            if mask.sum() != arch.num_layers - int(removed):
                raise UsageError(f"{source}: strategy[{removed}] keeps {mask.sum()} layers, expected {arch.num_layers - int(removed)}")
            kept[int(removed)] = mask
        kept.setdefault(0, np.ones(arch.num_layers, dtype=int))
        widths: dict[int, dict[str, dict[float, np.ndarray]]] = {}
        for module, masks in (data.get("width_mask") or {}).items():
            match = _LAYER.search(module)
            if masks is None or match is None:
                continue  # o_proj / down_proj follow their inputs
            proj = module.rsplit(".", 1)[-1]
            if proj not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                continue
            widths.setdefault(int(match.group(1)), {})[proj] = {float(r): np.asarray(m).astype(bool) for r, m in masks.items()}
        return cls(arch, kept, widths, source)

    @property
    def depths(self) -> list[int]:
        return sorted(self.arch.num_layers - r for r in self.kept_by_removed)

    @property
    def ratios(self) -> list[float]:
        found = {r for layer in self.width_mask.values() for masks in layer.values() for r in masks}
        return sorted(found | {1.0})

    def layer_shape(self, index: int, ratio: float) -> LayerShape:
        arch = self.arch
        masks = self.width_mask.get(index, {})
        if math.isclose(ratio, 1.0) or not masks:
            return LayerShape(index, arch.num_heads, arch.num_kv_heads, arch.ffn_size)
        where = f"layers.{index}"
        q = _match_ratio(masks["q_proj"], ratio, f"{where}.q_proj", self.source) if "q_proj" in masks else None
        k = _match_ratio(masks["k_proj"], ratio, f"{where}.k_proj", self.source) if "k_proj" in masks else None
        gate = _match_ratio(masks["gate_proj"], ratio, f"{where}.gate_proj", self.source) if "gate_proj" in masks else None
        heads = int(q.sum()) // arch.head_dim if q is not None else arch.num_heads
        kv = int(k.sum()) // arch.head_dim if k is not None else heads // arch.group_size
        ffn = int(gate.sum()) if gate is not None else arch.ffn_size
        if q is not None and q.sum() % arch.head_dim:
            raise UnsupportedShape(f"{self.source}: {where}.q_proj keeps {int(q.sum())} channels, not whole heads of {arch.head_dim}")
        return LayerShape(index, heads, kv, ffn)

    def subnet(self, num_layers: int, ratio: float) -> Subnet:
        removed = self.arch.num_layers - num_layers
        if removed not in self.kept_by_removed:
            raise UsageError(f"{self.source}: no layer strategy for {num_layers} layers; available depths {self.depths}")
        kept = np.flatnonzero(self.kept_by_removed[removed])
        return Subnet(self.arch, tuple(self.layer_shape(int(i), ratio) for i in kept), ratio)

    def subnets(self, depths: Iterable[int] | None = None, ratios: Iterable[float] | None = None) -> list[Subnet]:
        return [self.subnet(d, r) for d in (depths or self.depths) for r in (ratios or self.ratios)]

    def grid_extent(self) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """(narrowest and widest (heads, kv_heads), narrowest and widest FFN) over every layer of every
        shape: a build measures them (``BuildPlan.extra_attn`` / ``extra_ffn``) so the predictor
        interpolates the strategy's per-layer widths (cost is linear in heads and channels) instead
        of refusing them."""
        layers = [layer for subnet in self.subnets() for layer in subnet.layers]
        attn = sorted({(l.heads, l.kv_heads) for l in layers})
        ffn = sorted({l.ffn for l in layers})
        return (attn[0], attn[-1]), (ffn[0], ffn[-1])
