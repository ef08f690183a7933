"""`modelip sample`: small real inputs for trying every command (and the README).

A real ONNX model (a two-layer perceptron: MatMul, Add, Relu, MatMul, input
``x`` [1, 8] float32, output ``y`` [1, 4]), an input for it, an input for the
demo plan's ResNet-50, raw segment files for `pack`, and attestation request
bytes. Deterministic for a given seed (the random segment bytes aside).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

SAMPLE_FILES = ("model.onnx", "model-v2.onnx", "x.npz", "expect.npz", "image.npy",
                "network.elf", "desc.bin", "request.bin", "demo.yaml")


def sample_mlp(seed: int = 0, width: int = 8) -> object:
    """y = relu(x @ W1 + b1) @ W2, as an onnx.ModelProto with real weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((width, 16)).astype(np.float32), "W1")
    b1 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]),
         helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        "sample_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[w1, b1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: object, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(),  # type: ignore[attr-defined]
                                           providers=["CPUExecutionProvider"])
    output: np.ndarray = session.run(None, {"x": x})[0]
    return output


def write_samples(directory: Path, *, overwrite: bool = False) -> list[tuple[str, str]]:
    """Write the sample files into ``directory``; (name, what it is) for each. Files
    that exist are refused before anything is written, unless ``overwrite``."""
    from orchestrator.atomicfile import output_directory, refuse_existing, write_bytes_atomic
    from orchestrator.cli.demo import demo_plan_bytes

    refuse_existing([directory / name for name in SAMPLE_FILES], overwrite=overwrite)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 8)).astype(np.float32)

    def npz(**arrays: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    files = {
        "model.onnx": (sample_mlp().SerializeToString(),  # type: ignore[attr-defined]
                       "an ONNX model: input x [1, 8] float32, output y [1, 4]"),
        "model-v2.onnx": (sample_mlp(seed=1).SerializeToString(),  # type: ignore[attr-defined]
                          "the same model retrained (other weights): a version 2 to roll out"),
        "x.npz": (npz(x=x), "an input for model.onnx"),
        "expect.npz": (npz(y=_run(sample_mlp(), x)), "model.onnx's output for x.npz (a smoke "
                  "test's expected output)"),
        "image.npy": (npy(rng.standard_normal((1, 3, 224, 224)).astype(np.float32)),
                      "an input for demo.yaml's ResNet-50 [1, 3, 224, 224]"),
        "network.elf": (os.urandom(64 << 10), "a 64 KiB program segment (random bytes)"),
        "desc.bin": (b"modelip sample network descriptor\n", "a descriptor segment"),
        "request.bin": (os.urandom(32), "32 bytes of attestation request (a nonce)"),
        "demo.yaml": (demo_plan_bytes(), "the demo's plan: ResNet-50 in 4 stages on an "
                      "embedded emulated fleet (state in state/demo beside it)"),
    }
    assert tuple(files) == SAMPLE_FILES  # noqa: S101 - one list of names
    with output_directory(directory):
        for name, (data, _) in files.items():
            write_bytes_atomic(directory / name, data, overwrite=overwrite)
    return [(name, what) for name, (_, what) in files.items()]
