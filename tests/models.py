"""Small real ONNX models built with onnx.helper, for tests that execute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from orchestrator.qpc.build import pack_files


def tiny_mlp(seed: int = 0, width: int = 8) -> onnx.ModelProto:
    """y = relu(x @ W1 + b1) @ W2: a real graph with real weights."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((width, 16)).astype(np.float32), "W1")
    b1 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]),
         helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[w1, b1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
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
