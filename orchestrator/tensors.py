"""Named tensors <-> the wire's Tensor message (numpy, C order, little-endian)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from orchestrator._proto.modelip.v1 import runtime_pb2
from orchestrator.errors import FormatError

MAX_TENSOR_BYTES = 1 << 30


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
    """Decode tensors; FormatError for an unknown dtype or a size that does not match."""
    result: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in tensors:
        try:
            dtype = np.dtype(tensor.dtype).newbyteorder("<")
        except TypeError:
            raise FormatError(f"tensor {tensor.name!r}",
                              f"unknown dtype {tensor.dtype!r}") from None
        if dtype.hasobject:
            raise FormatError(f"tensor {tensor.name!r}", "object tensors are not supported")
        count = 1
        for dim in tensor.shape:
            if dim < 0:
                raise FormatError(f"tensor {tensor.name!r}", "negative dimension")
            count *= dim
        if count * dtype.itemsize != len(tensor.data) or len(tensor.data) > MAX_TENSOR_BYTES:
            raise FormatError(f"tensor {tensor.name!r}", "data does not match dtype and shape")
        result[tensor.name] = np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
    return result
