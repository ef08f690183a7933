"""ONNX models as program containers the emulated cards can execute.

A stage is a container with ``network.onnx`` (the model bytes, encrypted later
like any model-bearing segment) and ``io_desc.json`` (plaintext: the tensors a
host needs to set up buffers). docs/formats.md describes both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from orchestrator.qpc.mdp import TensorSpec
from orchestrator.qpc.writer import SegmentSpec, bytes_segment

NETWORK_ONNX = "network.onnx"
IO_DESC = "io_desc.json"


def io_desc(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
            model_outputs: Sequence[str]) -> bytes:
    """The plaintext I/O description of one stage."""
    document: dict[str, Any] = {
        "format": "modelip-io/1",
        "inputs": [t.to_json() for t in inputs],
        "outputs": [t.to_json() for t in outputs],
        "model_outputs": list(model_outputs),
    }
    return json.dumps(document, indent=1, sort_keys=True).encode("utf-8")


def stage_segments(
    model_bytes: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
    model_outputs: Sequence[str],
) -> list[SegmentSpec]:
    """The segments of one executable stage container."""
    return [bytes_segment(NETWORK_ONNX, model_bytes),
            bytes_segment(IO_DESC, io_desc(inputs, outputs, model_outputs))]
