"""Program containers (QPC): the real layout, MDP containers, ONNX packaging."""
