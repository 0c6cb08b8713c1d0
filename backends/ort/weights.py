"""Random weights of an exported graph, stored as the pool they tile instead of byte for byte.

``pytorch.materialize`` fills every weight by tiling one random pool of ``POOL_SIZE`` values, and
the ONNX exporter writes them out (most transposed, as its optimizer folds the linear layers'
transposes). Stored whole, the engines of one TinyLlama composition benchmark take ~65 GB of disk
in fp32. So ``pack`` keeps the pool once and only the tensors that tile neither way (a norm weight
of ones), with a map naming how each initializer is rebuilt, and deletes the external data file;
``unpack`` rebuilds the exact bytes at load and ONNX Runtime takes them as external initializers.
Every tensor gets its own buffer, so weights never share memory (nor cache lines) as they would
not in a real model. Exactness needs no trust in the tiling: a tensor that does not match is stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from amoeba_profile.core.errors import ArtifactError
from amoeba_profile.core.inputs import MIB, open_regular, read_bounded

LAYOUT_FILE = "weights.json"
LAYOUT_BYTES = 64 * MIB  # one short line per initializer
STORED_FILE = "weights.npz"
TILED, TRANSPOSED, STORED = "tiled", "transposed", "stored"
POOL_KEY = "_pool"  # exported initializer names start with a letter (``model.``, ``val_``)


def _external(model_path: Path) -> list:
    """The graph's initializers whose bytes live in an external data file."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [init for init in graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]


def _tiling(pool: np.ndarray, dims: tuple[int, ...], kind: str) -> np.ndarray:
    tiled = np.resize(pool, int(np.prod(dims)))  # np.resize repeats the pool
    if kind == TILED:
        return tiled.reshape(dims)
    return np.ascontiguousarray(tiled.reshape(dims[::-1]).T)


def pack(model_path: Path, pool: np.ndarray) -> dict[str, str]:
    """Replace the external data beside ``model_path`` by the pool, the untiled tensors and a map
    from initializer name to how it is rebuilt; returns that map."""
    from onnx.helper import tensor_dtype_to_np_dtype

    layout: dict[str, str] = {}
    stored: dict[str, np.ndarray] = {POOL_KEY: pool}
    data_files: dict[str, np.ndarray] = {}
    for init in _external(model_path):
        info = {entry.key: entry.value for entry in init.external_data}
        if info["location"] not in data_files:
            data_files[info["location"]] = np.memmap(model_path.parent / info["location"], np.uint8, mode="r")
        offset = int(info.get("offset", 0))
        dtype, dims = np.dtype(tensor_dtype_to_np_dtype(init.data_type)), tuple(init.dims)
        tensor = data_files[info["location"]][offset : offset + int(info["length"])].view(dtype).reshape(dims)
        kinds = () if dtype != pool.dtype else (TILED, TRANSPOSED) if len(dims) == 2 else (TILED,)
        layout[init.name] = next((k for k in kinds if np.array_equal(tensor, _tiling(pool, dims, k))), STORED)
        if layout[init.name] == STORED:
            stored[init.name] = np.array(tensor)
    np.savez(model_path.parent / STORED_FILE, allow_pickle=False, **stored)  # np.load reads it without pickles
    (model_path.parent / LAYOUT_FILE).write_text(json.dumps(layout, indent=1, sort_keys=True))
    names = list(data_files)
    data_files.clear()  # close the maps before the files go
    for name in names:
        (model_path.parent / name).unlink()
    return layout


def unpack(model_path: Path) -> tuple[list[str], list[np.ndarray]]:
    """(names, arrays) of every external initializer, byte for byte as exported."""
    layout = json.loads(
        read_bounded(model_path.parent / LAYOUT_FILE, LAYOUT_BYTES, "onnx weight layout", error=ArtifactError)
    )
    names, arrays = [], []
    with (
        open_regular(model_path.parent / STORED_FILE, "stored onnx weights", ArtifactError) as handle,
        np.load(handle) as stored,
    ):
        pool = stored[POOL_KEY]
        for init in _external(model_path):
            kind = layout[init.name]
            names.append(init.name)
            arrays.append(stored[init.name] if kind == STORED else _tiling(pool, tuple(init.dims), kind))
    return names, arrays
