"""GGUF files read directly: the header, key-value metadata and tensor table, and each tensor's
bytes (memory-mapped). gguf's own ``GGUFReader`` takes seconds to open a model; this parser
takes a tenth of one and was checked against it field by field (``tests/checkpoints/test_gguf.py``)."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitplan.errors import BitplanError
from bitplan.kernels.layout import GGMLType
from bitplan.methods.ggml import dequantize_ggml


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ``shape`` in numpy order ``[..., rows, n_per_row]``, ``offset`` from the
    start of the file, ``nbytes`` of data (without alignment padding)."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFContents:
    """What :func:`read_gguf` finds: {key: (value type, value, array item type)} and the tensors in file order."""

    path: Path
    metadata: dict[str, tuple[int, object, int | None]]
    tensors: dict[str, TensorInfo]
    alignment: int


SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


def _read_value(data: memoryview, position: int, value_type: int) -> tuple[object, int]:
    if value_type == STRING:
        length = int(np.frombuffer(data, "<u8", 1, position)[0])
        return bytes(data[position + 8:position + 8 + length]).decode("utf-8", errors="surrogateescape"), position + 8 + length
    if value_type == ARRAY:
        item_type, count = int(np.frombuffer(data, "<u4", 1, position)[0]), int(np.frombuffer(data, "<u8", 1, position + 4)[0])
        position += 12
        if item_type in SCALARS:
            items = np.frombuffer(data, SCALARS[item_type], count, position)
            return items.tolist(), position + items.nbytes
        values = []
        for _ in range(count):
            value, position = _read_value(data, position, item_type)
            values.append(value)
        return values, position
    item = np.frombuffer(data, SCALARS[value_type], 1, position)
    return item[0].item(), position + item.nbytes


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """Read a GGUF's metadata and tensor table as ``gguf_init_from_file`` does (ggml/src/gguf.cpp):
    magic, version, counts, KV pairs, tensor infos, data aligned to ``general.alignment`` (32).
    A plain reader: gguf-py's GGUFReader takes seconds on a tokenizer's 100k strings, this ~0.2 s."""
    import gguf

    with open(path, "rb") as handle:
        data = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
    magic, version = np.frombuffer(data, "<u4", 2, 0).tolist()
    if magic != gguf.GGUF_MAGIC or version < 2:
        raise BitplanError(f"{path} is not a GGUF v2/v3 file")
    n_tensors, n_kv = np.frombuffer(data, "<u8", 2, 8).tolist()
    position, metadata = 24, {}
    for _ in range(n_kv):
        key, position = _read_value(data, position, STRING)
        value_type = int(np.frombuffer(data, "<u4", 1, position)[0])
        item_type = int(np.frombuffer(data, "<u4", 1, position + 4)[0]) if value_type == ARRAY else None
        value, position = _read_value(data, position + 4, value_type)
        metadata[key] = (value_type, value, item_type)
    table = []
    for _ in range(n_tensors):
        name, position = _read_value(data, position, STRING)
        n_dims = int(np.frombuffer(data, "<u4", 1, position)[0])
        dims = np.frombuffer(data, "<u8", n_dims, position + 4).tolist()
        type_id, offset = int(np.frombuffer(data, "<u4", 1, position + 4 + 8 * n_dims)[0]), int(np.frombuffer(data, "<u8", 1, position + 8 + 8 * n_dims)[0])
        position += 16 + 8 * n_dims
        table.append((name, gguf.GGMLQuantizationType(type_id), tuple(reversed(dims)), offset))
    alignment = int(metadata.get("general.alignment", (0, gguf.GGUF_DEFAULT_ALIGNMENT))[1])
    start = -(-position // alignment) * alignment
    tensors = {}
    for name, ggml_type, shape, offset in table:
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        tensors[name] = TensorInfo(name, ggml_type.name, shape, start + offset, int(np.prod(shape, dtype=np.int64)) // block * type_size)
    return GGUFContents(Path(path), metadata, tensors, alignment)


def tensor_bytes(path: str | os.PathLike, tensor: TensorInfo) -> np.ndarray:
    """The raw data of one tensor as uint8 ``[rows, row_bytes]`` (memory-mapped, read-only)."""
    rows = int(np.prod(tensor.shape[:-1], dtype=np.int64))
    return np.memmap(path, np.uint8, "r", tensor.offset, (tensor.nbytes,)).reshape(rows, -1)


def tensor_float32(path: str | os.PathLike, tensor: TensorInfo) -> np.ndarray:
    """One F32/F16/BF16/quantized tensor as float32 ``[rows, n_per_row]``, decoded as ggml's ``to_float``."""
    return dequantize_ggml(tensor_bytes(path, tensor), GGMLType(tensor.ggml_type), tensor.shape[-1]).numpy()


# ---------------------------------------------------------------------------------- assignments
