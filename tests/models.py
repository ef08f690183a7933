"""Small real ONNX models built with onnx.helper, for tests that execute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from orchestrator.cli.samples import sample_mlp
from orchestrator.qpc.build import pack_files


def tiny_mlp(seed: int = 0, width: int = 8) -> onnx.ModelProto:
    """y = relu(x @ W1 + b1) @ W2: the model `modelip sample` writes."""
    model: onnx.ModelProto = sample_mlp(seed, width)  # type: ignore[assignment]
    return model


def reference_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def pack_onnx_stage(model: onnx.ModelProto, path: Path) -> Path:
    """A one-stage executable container (network.onnx + io_desc.json) via `pack`."""
    work = path.parent / (path.name + ".parts")
    work.mkdir(parents=True, exist_ok=True)
    (work / "network.onnx").write_bytes(model.SerializeToString())
    (work / "io_desc.json").write_text(json.dumps({
        "format": "modelip-io/1",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
        "model_outputs": ["y"],
    }))
    pack_files(path, [("network.onnx", str(work / "network.onnx")),
                      ("io_desc.json", str(work / "io_desc.json"))])
    return path
