"""What an emulated card checks of a program it runs: its io_desc.json (authenticated with
the program) and each input against the dtype and shape its stage declares."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.crypto.container import PlainBuffer
from orchestrator.errors import (
    FormatError,
)

_ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
               "tensor(float16)": "float16", "tensor(int8)": "int8", "tensor(int16)": "int16",
               "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(uint8)": "uint8",
               "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
               "tensor(uint64)": "uint64", "tensor(bool)": "bool"}


def checked_input(stage: str, node: Any, value: Any) -> Any:
    """``value`` if it has the dtype and shape the stage declares, else FormatError."""
    want = _ONNX_TYPES.get(node.type)
    if want is not None and value.dtype.name != want:
        raise FormatError(stage, f"input {node.name!r} must be {want}, got {value.dtype.name}")
    declared = list(node.shape)
    shape = list(value.shape)
    if len(declared) != len(shape) or any(
            isinstance(d, int) and d != actual for d, actual in zip(declared, shape,
                                                                     strict=True)):
        wanted = "x".join(str(d) if isinstance(d, int) else "?" for d in declared)
        got = "x".join(map(str, shape)) or "scalar"
        raise FormatError(stage, f"input {node.name!r} must have shape {wanted}, got {got}")
    return value


def read_io_desc(raw: PlainBuffer, label: str) -> dict[str, Any]:
    """The (authenticated) io_desc.json of a program; FormatError if it is not JSON."""
    try:
        document = json.loads(bytes(raw))
    except (ValueError, RecursionError):
        raise FormatError(label, "io_desc.json is not valid JSON") from None
    if not isinstance(document, dict):
        raise FormatError(label, "io_desc.json is not an object")
    return document
