"""A synthetic ONNX model of realistic size with real (random) weights.

    python bench/make_model.py --params 256M -o big.onnx [--width 4096]

An MLP stack (MatMul + bias + Relu per layer, a residual Add every other
layer), float32: 256M parameters is a 1 GiB model, for the encrypt, stage and
load benchmarks. Executes in onnxruntime like any model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import parse_size  # noqa: E402


def make_mlp(params: int, width: int, seed: int = 0) -> onnx.ModelProto:
    per_layer = width * width + width
    layers = max(1, params // per_layer)
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "x"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width))
        b = np.zeros(width, np.float32)
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        if i % 2 == 1:
            nodes.append(helper.make_node("Add", [f"r{i}", current], [f"res{i}"]))
            current = f"res{i}"
        else:
            current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes, "synthetic_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="modelip bench")
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="256M")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("-o", "--output", default="synthetic.onnx")
    args = parser.parse_args()
    model = make_mlp(parse_size(args.params), args.width)  # 256M = 256 * 2**20 parameters
    onnx.checker.check_model(model)
    onnx.save(model, args.output)
    real = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    print(f"wrote {args.output}: {real / 1e6:.1f}M parameters, "
          f"{Path(args.output).stat().st_size / (1 << 20):.0f} MiB")


if __name__ == "__main__":
    main()
