"""Named tensors <-> the wire's Tensor message (numpy, C order, little-endian)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.errors import FormatError

MAX_TENSOR_BYTES = 1 << 30
MAX_TENSORS = 1024
MAX_DIMS = 32
DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                    "uint64", "float16", "float32", "float64"})


def to_wire(tensors: Mapping[str, Any]) -> list[runtime_pb2.Tensor]:
    result = []
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        result.append(runtime_pb2.Tensor(name=name, dtype=array.dtype.name,
                                         shape=list(array.shape), data=array.tobytes()))
    return result


def from_wire(tensors: Iterable[runtime_pb2.Tensor]) -> dict[str, np.ndarray[Any, Any]]:
    """Decode tensors; FormatError for an unknown dtype, a size that does not match,
    a name given twice or more tensors or dimensions than any model takes."""
    result: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in tensors:
        if len(result) >= MAX_TENSORS:
            raise FormatError("tensors", f"more than {MAX_TENSORS} in one request")
        if tensor.name in result:
            raise FormatError(f"tensor {tensor.name[:64]!r}", "given twice")
        if tensor.dtype not in DTYPES:
            raise FormatError(f"tensor {tensor.name[:64]!r}",
                              f"unknown dtype {tensor.dtype[:32]!r} (one of "
                              f"{', '.join(sorted(DTYPES))})")
        if len(tensor.shape) > MAX_DIMS:
            raise FormatError(f"tensor {tensor.name[:64]!r}", f"more than {MAX_DIMS} dimensions")
        dtype = np.dtype(tensor.dtype).newbyteorder("<")
        count = extent = 1
        for dim in tensor.shape:
            if dim < 0:
                raise FormatError(f"tensor {tensor.name[:64]!r}", "negative dimension")
            count *= dim
            extent *= max(dim, 1)  # an empty tensor may still not be absurdly wide
        if extent > MAX_TENSOR_BYTES:
            raise FormatError(f"tensor {tensor.name[:64]!r}", "shape is larger than any tensor")
        if count * dtype.itemsize != len(tensor.data) or len(tensor.data) > MAX_TENSOR_BYTES:
            raise FormatError(f"tensor {tensor.name[:64]!r}",
                              "data does not match dtype and shape")
        result[tensor.name] = np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
    return result
