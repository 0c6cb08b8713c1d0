"""AmoebaLLM selection-strategy files: exact kept layers and per-layer widths for every shape.

AmoebaLLM saves ``np.save(path, {"strategy": ..., "width_mask": ..., "bias": ...})``, a NumPy file
holding a pickled dict. Pickles execute code, so the file is read with a restricted unpickler that
admits only dicts, lists, tuples, numbers, strings and ndarrays - never ``allow_pickle=True`` on a
user file. A pickle can also exhaust memory without running code, so the loader is bounded too:
- the file must be a regular file of at most ``MAX_FILE_BYTES`` (``/dev/zero`` is refused unread);
- at most ``MAX_OPCODES`` pickle opcodes, which bounds the objects a file can create;
- arrays are only restored from their pickled state (``_reconstruct`` of an empty placeholder, then
  ``__setstate__``), and the state is checked before NumPy sees it: a plain dtype, and exactly the
  data its shape needs (a shape of 10^9 with no data would allocate gigabytes, or crash NumPy);
- the loaded structure, counted as a tree (a shared reference counts every time it occurs), holds
  at most ``MAX_ELEMENTS`` items and ``MAX_DEPTH`` levels, and no cycle: memo references let a few
  hundred bytes describe lists nested ten deep and ten wide, which ``np.asarray`` would expand into
  10^10 elements.
The pure-Python unpickler (``pickle._Unpickler``) runs the file because its opcode table can be
wrapped (counting, checking BUILD); the C unpickler cannot be, and it sizes its memo table from an
index in the file.

- ``strategy``: removed-layer count -> 0/1 array over the base layers (1 = kept); 0 may be absent.
- ``width_mask``: module name -> {remaining ratio: bool array over output channels}, or None for
  o_proj / down_proj. Attention masks repeat per head: heads kept = mask.sum() / head_dim.
- ``bias``: FLAP's bias compensation - no effect on latency, ignored.
"""

from __future__ import annotations

import io
import math
import numbers
import pickle
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.errors import UnsupportedShape, UsageError
from amoeba_profile.core.inputs import MIB, read_bounded
from amoeba_profile.core.subnet import LayerShape, Subnet

MAX_FILE_BYTES = 256 * MIB  # a llama2-70b strategy with a dozen ratios is ~60 MB
MAX_OPCODES = 2_000_000  # ~20 per array: a llama2-70b strategy needs ~250k
MAX_ELEMENTS = 1 << 27  # items + array elements, shared references counted each time
MAX_DEPTH = 32  # AmoebaLLM's dict nests 4 deep
_DTYPE_SPEC = re.compile(r"[<>|=]?[biufcO]\d{0,2}")
_PLAIN_KINDS = "biufcO"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_RATIO_TOL = 1e-3


class _Refused(Exception):
    """A pickle that breaks a bound or uses a global outside the allowed set; becomes a UsageError."""


def _plain_dtype(dtype: np.dtype) -> np.dtype:
    """Booleans, integers, floats, complex and objects, at most 16 bytes, no fields or sub-arrays."""
    if (
        not isinstance(dtype, np.dtype)
        or dtype.kind not in _PLAIN_KINDS
        or dtype.itemsize > 16
        or dtype.fields is not None
        or dtype.subdtype is not None
    ):
        raise _Refused(f"dtype {dtype!r} is not a plain number or object type")
    return dtype


def _dtype(spec: Any, *_flags: Any) -> np.dtype:
    """``numpy.dtype`` from its pickled arguments, for plain type strings only ('b1', '<f8', 'O8').

    Always a copy: BUILD then sets its byte order, and must not change NumPy's shared instance."""
    if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec):
        raise _Refused(f"dtype {spec!r} is not a plain number or object type")
    return _plain_dtype(np.dtype(spec, align=False, copy=True))


def _array_type(*_args: Any, **_kwargs: Any) -> None:
    """Stands for ``numpy.ndarray`` in a pickle: arrays are restored from their state, never called."""
    raise _Refused("numpy.ndarray may only name the type of a pickled array, not be called")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """NumPy pickles an array as an empty placeholder (shape (0,)) whose state then fills it."""
    if subtype is not _array_type or shape != (0,):
        raise _Refused(f"_reconstruct({shape!r}) is not the empty placeholder NumPy writes")
    return np.ndarray((0,), dtype=np.uint8)


def _scalar(dtype: Any, data: Any = None) -> Any:
    """A NumPy scalar from its dtype and exactly ``itemsize`` bytes (an object scalar is its object)."""
    dtype = _plain_dtype(dtype)
    if dtype.hasobject:
        return data
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _Refused(f"a {dtype} scalar needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _array_state(state: Any) -> None:
    """Check an ndarray's pickled state before ``__setstate__``: NumPy sizes the array from the
    shape before it compares it with the data (a large shape with a short object list crashes it)."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise _Refused("array state is not NumPy's (1, shape, dtype, fortran, data)")
    _, shape, dtype, _, data = state
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise _Refused(f"array shape {shape!r} is not a tuple of sizes")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise _Refused(f"an array of {count} elements is over the limit of {MAX_ELEMENTS}")
    dtype = _plain_dtype(dtype)
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != count:
            raise _Refused(f"an object array of shape {shape} needs a list of {count} items")
    elif not isinstance(data, bytes) or len(data) != count * dtype.itemsize:
        raise _Refused(f"an array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes of data")


def _dtype_state(state: Any) -> None:
    """A dtype's pickled state may set the byte order only: no fields, sub-arrays, sizes or metadata."""
    if not (
        isinstance(state, tuple)
        and len(state) in (8, 9)
        and state[0] == 3
        and state[1] in "<>|="
        and state[2:5] == (None, None, None)
        and state[5:7] == (-1, -1)
        and (len(state) == 8 or state[8] is None)
    ):
        raise _Refused(f"dtype state {state!r} describes more than a plain type")


class _BoundedUnpickler(pickle._Unpickler):  # noqa: SLF001 - the only unpickler whose opcodes can be wrapped
    stack: list[Any]  # the pure-Python unpickler's value stack, set by load(); typeshed does not declare it

    def __init__(self, stream: io.BytesIO):
        super().__init__(stream)
        self.opcodes = 0

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise _Refused(
                f"refused to load {module}.{name} - strategy files may hold only dicts, lists, numbers, "
                "strings and arrays"
            )
        return _SAFE_GLOBALS[module, name]

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) is np.ndarray:
            _array_state(state)
        elif isinstance(target, np.dtype):
            _dtype_state(state)
        else:
            raise _Refused(f"refused to set the state of a {type(target).__name__}")
        target.__setstate__(state)
        if isinstance(target, np.dtype):
            _plain_dtype(target)


def _counted(op):
    def run(self: _BoundedUnpickler) -> None:
        self.opcodes += 1
        if self.opcodes > MAX_OPCODES:
            raise _Refused(f"more than {MAX_OPCODES} pickle opcodes")
        op(self)

    return run


# The pure-Python unpickler's opcode table is the only place each opcode can be counted (and bounded).
_BoundedUnpickler.dispatch = {code: _counted(op) for code, op in pickle._Unpickler.dispatch.items()}
_BoundedUnpickler.dispatch[pickle.BUILD[0]] = _counted(_BoundedUnpickler.load_build)

_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): _array_type,
    ("numpy", "dtype"): _dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
}


def _children(value: Any) -> list[Any] | None:
    """The items a container holds (None for a leaf)."""
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        return list(value.flat)
    return None


def _leaf_size(value: Any) -> int:
    return int(value.size) if isinstance(value, np.ndarray) else 1


def _check_tree(value: Any) -> None:
    """Refuse a structure whose tree is over ``MAX_ELEMENTS`` items or ``MAX_DEPTH`` levels, or has a cycle.

    A depth-first walk with sizes memoized per object: linear in the distinct objects, whatever
    their tree expands to; an object met again while it is on the current path is a cycle."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(value, 0, False)]
    while stack:
        node, depth, finished = stack.pop()
        children = _children(node)
        if children is None:
            continue
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] if _children(c) is not None else _leaf_size(c) for c in children)
            if sizes[key] > MAX_ELEMENTS:
                raise _Refused(
                    f"the structure expands to more than {MAX_ELEMENTS} elements (shared references counted each time)"
                )
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _Refused("the structure contains itself (a reference cycle)")
        if depth > MAX_DEPTH:
            raise _Refused(f"the structure nests more than {MAX_DEPTH} levels deep")
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children)


def _unpickle(stream: io.BytesIO) -> Any:
    value = _BoundedUnpickler(stream).load()
    _check_tree(value)
    return value


def load_pickled(path: Path | str) -> Any:
    """The object in an .npy (object array) or plain pickle file, through the bounded, restricted unpickler."""
    path = Path(path)
    raw = read_bounded(path, MAX_FILE_BYTES, "strategy file")
    stream = io.BytesIO(raw)
    try:
        if raw.startswith(b"\x93NUMPY"):
            version = np.lib.format.read_magic(stream)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(stream)
            if dtype.hasobject:
                value = _unpickle(stream)
                return value.item() if isinstance(value, np.ndarray) and value.shape == () else value
            needed = math.prod(shape) * dtype.itemsize
            if needed != len(raw) - stream.tell():
                raise _Refused(
                    f"its header promises {needed} bytes of array data, the file holds {len(raw) - stream.tell()}"
                )
            return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        return _unpickle(stream)
    except _Refused as exc:
        raise UsageError(f"{path}: {exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: the structure nests too deeply") from None
    except KeyError as exc:
        # The unpickler looks each opcode byte up in its dispatch table: an int key is a byte that
        # is no opcode, i.e. the file is not a pickle at all (text, a zip or gzip archive, ...).
        if exc.args and isinstance(exc.args[0], int):
            raise UsageError(
                f"{path}: not a NumPy .npy or pickle file (byte 0x{exc.args[0]:02x} at offset "
                f"{max(stream.tell() - 1, 0)} is no pickle opcode); a strategy file is AmoebaLLM's "
                "np.save'd dict"
            ) from None
        raise UsageError(f"{path}: not a readable strategy file (missing key {exc})") from None
    except (EOFError, struct.error):  # a length or number field cut short
        raise UsageError(
            f"{path}: the file ends before its data does (truncated or empty); a strategy file is "
            "AmoebaLLM's np.save'd dict"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        message = " ".join(str(exc).split())[:200]
        raise UsageError(f"{path}: not a readable strategy file ({type(exc).__name__}: {message})") from None


def _mask(value: Any, what: str, source: str) -> np.ndarray:
    """A 0/1 mask as a flat numeric array (the file is already bounded, so this cannot expand)."""
    not_mask = UsageError(f"{source}: {what} is not a 0/1 array")
    try:
        mask = np.asarray(value)
    except (TypeError, ValueError):  # ragged nesting
        raise not_mask from None
    if mask.dtype.kind not in "biuf":
        raise not_mask
    return mask


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
        if not isinstance(data, dict) or not isinstance(data.get("strategy"), dict):
            raise UsageError(f"{source}: expected a dict with a 'strategy' dict (AmoebaLLM's np.save format)")
        kept = {}
        for removed, mask in data["strategy"].items():
            if not isinstance(removed, numbers.Integral) or not 0 <= int(removed) < arch.num_layers:
                raise UsageError(
                    f"{source}: strategy key {removed!r} is not a removed-layer count 0..{arch.num_layers - 1}"
                )
            mask = _mask(mask, f"strategy[{removed}]", source).astype(int).ravel()
            if mask.size != arch.num_layers:
                raise UsageError(
                    f"{source}: strategy[{removed}] covers {mask.size} layers, {arch.name} has {arch.num_layers}"
                )
            if mask.sum() != arch.num_layers - int(removed):
                raise UsageError(
                    f"{source}: strategy[{removed}] keeps {mask.sum()} layers, expected {arch.num_layers - int(removed)}"
                )
            kept[int(removed)] = mask
        kept.setdefault(0, np.ones(arch.num_layers, dtype=int))
        widths: dict[int, dict[str, dict[float, np.ndarray]]] = {}
        width_mask = data.get("width_mask") or {}
        if not isinstance(width_mask, dict):
            raise UsageError(f"{source}: 'width_mask' must be a dict of module name -> {{ratio: mask}}")
        for module, masks in width_mask.items():
            match = _LAYER.search(module) if isinstance(module, str) else None
            if masks is None or match is None:
                continue  # o_proj / down_proj follow their inputs
            proj = module.rsplit(".", 1)[-1]
            if proj not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                continue
            if not isinstance(masks, dict) or not all(isinstance(r, numbers.Real) for r in masks):
                raise UsageError(f"{source}: width_mask[{module!r}] must map numeric ratios to masks")
            widths.setdefault(int(match.group(1)), {})[proj] = {
                float(r): _mask(m, f"width_mask[{module!r}][{r}]", source).astype(bool) for r, m in masks.items()
            }
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
        gate = (
            _match_ratio(masks["gate_proj"], ratio, f"{where}.gate_proj", self.source) if "gate_proj" in masks else None
        )
        heads = int(q.sum()) // arch.head_dim if q is not None else arch.num_heads
        kv = int(k.sum()) // arch.head_dim if k is not None else heads // arch.group_size
        ffn = int(gate.sum()) if gate is not None else arch.ffn_size
        if q is not None and q.sum() % arch.head_dim:
            raise UnsupportedShape(
                f"{self.source}: {where}.q_proj keeps {int(q.sum())} channels, not whole heads of {arch.head_dim}"
            )
        return LayerShape(index, heads, kv, ffn)

    def subnet(self, num_layers: int, ratio: float) -> Subnet:
        removed = self.arch.num_layers - num_layers
        if removed not in self.kept_by_removed:
            raise UsageError(
                f"{self.source}: no layer strategy for {num_layers} layers; available depths {self.depths}"
            )
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
