"""ONNX model -> N pipeline stages -> a (multi-device) program container.

The graph is cut in topological order. Nodes that compute only from
constants (initializers, Constant, ConstantOfShape of a constant shape, ...)
are not placed on their own: each stage gets a copy of the ones it consumes,
so no constant tensor ever crosses a cut. The N-1 cut points are chosen near
the balanced share of the chosen cost (parameters or FLOPs); among the
positions near each target, the one whose crossing tensors are smallest wins.
docs/partitioning.md explains the choices.
"""

from __future__ import annotations

import heapq
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, shape_inference

from orchestrator.atomicfile import atomic_output, refuse_existing
from orchestrator.errors import FileInputError, FormatError, UsageError
from orchestrator.qpc.build import pack_mdp
from orchestrator.qpc.mdp import MdpMeta, Partition, TensorSpec, partition_segment_name
from orchestrator.qpc.onnx_package import stage_segments
from orchestrator.qpc.writer import write_container

BALANCES = ("params", "flops")
MAX_MODEL_BYTES = 2 << 30  # protobuf's own limit
WINDOW = 0.15  # a cut may land within this share of one stage's cost of its target
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}


@dataclass(frozen=True, slots=True)
class Stage:
    index: int
    nodes: tuple[int, ...]          # indices into the topologically sorted node list
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_outputs: tuple[str, ...]
    cost: float
    crossing_bytes: int             # bytes this stage hands to later stages


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    stages: tuple[Stage, ...]
    balance: str
    total_cost: float
    model_inputs: tuple[TensorSpec, ...]
    model_outputs: tuple[TensorSpec, ...]


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and check an ONNX model; FileInputError or FormatError with the reason."""
    source = Path(path)
    try:
        size = source.stat().st_size
    except FileNotFoundError:
        raise FileInputError(source, "model file not found") from None
    if size > MAX_MODEL_BYTES:
        raise FormatError(str(source), "ONNX models over 2 GiB (external data) are not supported")
    try:
        model = onnx.load_model(str(source), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, ValueError, ... for non-ONNX bytes
        raise FormatError(str(source), f"not an ONNX model ({type(err).__name__})") from None
    if not model.graph.node:
        raise FormatError(str(source), "not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid"
        raise FormatError(str(source), f"fails the ONNX checker: {first}") from None
    return model


class _Graph:
    """The facts partitioning needs, computed once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
        graph = inferred.graph
        self.model = model
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.value_info = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
        self.inputs = [i for i in model.graph.input if i.name not in self.initializers]
        self.output_names = [o.name for o in model.graph.output]
        self.nodes = _topological(model.graph)
        constant = set(self.initializers)
        self.is_constant: list[bool] = []
        for node in self.nodes:
            is_const = node.op_type not in _NONDETERMINISTIC and all(
                name in constant or name == "" for name in node.input)
            self.is_constant.append(is_const)
            if is_const:
                constant.update(node.output)
        self.constant_tensors = constant
        self.producer = {out: index for index, node in enumerate(self.nodes)
                         for out in node.output if out}
        self.main = [index for index, const in enumerate(self.is_constant) if not const]

    def spec(self, name: str) -> TensorSpec | None:
        """Static dtype and shape of a tensor, or None if not known."""
        info = self.value_info.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            return None
        tensor = info.type.tensor_type
        if tensor.elem_type == 0 or not tensor.HasField("shape"):
            return None
        dims: list[int | str] = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            elif dim.dim_param:
                dims.append(dim.dim_param)
            else:
                return None
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        return TensorSpec(name, dtype, tuple(dims))

    def nbytes(self, name: str) -> int | None:
        spec = self.spec(name)
        if spec is None or any(isinstance(d, str) for d in spec.shape):
            return None
        return int(math.prod(int(d) for d in spec.shape)) * np.dtype(spec.dtype).itemsize

    def elements(self, name: str) -> int:
        if name in self.initializers:
            return int(math.prod(self.initializers[name].dims))
        size = self.nbytes(name)
        spec = self.spec(name)
        return 0 if size is None or spec is None else size // np.dtype(spec.dtype).itemsize


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in a stable topological order (Kahn's algorithm, original order on ties)."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    pending = [sum(1 for name in set(node.input) if name in produced_by)
               for node in graph.node]
    consumers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in set(node.input):
            if name in produced_by:
                consumers.setdefault(produced_by[name], []).append(i)
    ready = [i for i, count in enumerate(pending) if count == 0]
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        current = heapq.heappop(ready)
        order.append(current)
        for nxt in consumers.get(current, []):
            pending[nxt] -= 1
            if pending[nxt] == 0:
                heapq.heappush(ready, nxt)
    if len(order) != len(graph.node):
        raise FormatError("ONNX model", "graph has a cycle")
    return [graph.node[i] for i in order]


def _node_cost(g: _Graph, index: int, balance: str, counted: set[str]) -> float:
    node = g.nodes[index]
    if balance == "params":
        total = 0
        for name in node.input:
            if name in g.constant_tensors and name not in counted:
                counted.add(name)
                total += g.elements(name)
        return float(total)
    out = g.elements(node.output[0]) if node.output else 0
    if node.op_type == "Conv" and len(node.input) > 1:
        weight = g.elements(node.input[1])
        channels_out = 1
        spec = g.spec(node.input[1])
        if spec is not None and spec.shape and isinstance(spec.shape[0], int):
            channels_out = max(1, spec.shape[0])
        return 2.0 * out * weight / channels_out
    if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
        spec = g.spec(node.input[0])
        inner = spec.shape[-1] if spec and spec.shape and isinstance(spec.shape[-1], int) else 1
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            inner = spec.shape[0] if spec and isinstance(spec.shape[0], int) else inner
        return 2.0 * out * inner
    return float(out)


def plan_partitions(model: onnx.ModelProto, partitions: int, *, balance: str = "params"
                    ) -> PartitionPlan:
    """Choose the cut points. UsageError/FormatError when N stages are impossible."""
    if balance not in BALANCES:
        raise UsageError(f"--balance must be one of {', '.join(BALANCES)}")
    if partitions < 1:
        raise UsageError("--partitions must be at least 1")
    g = _Graph(model)
    main = g.main
    if partitions > len(main):
        raise UsageError(f"--partitions {partitions}: the graph has only {len(main)} "
                         "computing nodes, so at most that many stages")
    counted: set[str] = set()
    costs = [_node_cost(g, index, balance, counted) for index in main]
    if not sum(costs):  # nothing to weigh (no parameters): balance node counts
        costs = [1.0] * len(main)
    m = len(main)
    # crossing[c]: bytes of tensors made before main position c and used at or after it
    delta = [0] * (m + 2)
    unknown = [0] * (m + 2)
    last_use: dict[str, int] = {}
    for pos, node_index in enumerate(main):
        for name in g.nodes[node_index].input:
            if name and name not in g.constant_tensors:
                last_use[name] = pos
    made_at = {i.name: -1 for i in g.inputs}
    for pos, node_index in enumerate(main):
        for name in g.nodes[node_index].output:
            if name:
                made_at[name] = pos
    for name, used in last_use.items():
        if name not in made_at:
            continue
        start, end = made_at[name] + 1, used  # cuts c with made < c <= used
        if start > end:
            continue
        size = g.nbytes(name)
        if size is None:
            unknown[start] += 1
            unknown[end + 1] -= 1
        else:
            delta[start] += size
            delta[end + 1] -= size
    crossing, bad = [0] * (m + 1), [False] * (m + 1)
    running = running_bad = 0
    for c in range(m + 1):
        running += delta[c]
        running_bad += unknown[c]
        crossing[c], bad[c] = running, running_bad > 0
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    total = prefix[-1]
    cuts = [0]
    for k in range(1, partitions):
        lo, hi = cuts[-1] + 1, m - (partitions - k)
        target = total * k / partitions
        cut = _best_cut(lo, hi, target, total / partitions, prefix, crossing, bad)
        if cut is None:
            first, last = g.nodes[main[lo - 1]].name or g.nodes[main[lo - 1]].op_type, \
                g.nodes[main[hi]].name or g.nodes[main[hi]].op_type
            raise FormatError("ONNX model", f"cannot cut stage {k} from {k + 1}: every cut "
                              f"between {first!r} and {last!r} passes a tensor without a "
                              "static type and shape")
        cuts.append(cut)
    cuts.append(m)
    stages = []
    for k in range(partitions):
        members = tuple(main[cuts[k]:cuts[k + 1]])
        stages.append(_stage(g, k, members, cuts[k + 1], main,
                             prefix[cuts[k + 1]] - prefix[cuts[k]],
                             crossing[cuts[k + 1]] if k < partitions - 1 else 0))
    model_inputs = tuple(s for s in (g.spec(i.name) for i in g.inputs) if s)
    model_outputs = tuple(s for s in (g.spec(name) for name in g.output_names) if s)
    return PartitionPlan(tuple(stages), balance, total, model_inputs, model_outputs)


def _best_cut(lo: int, hi: int, target: float, share: float, prefix: list[float],
              crossing: list[int], bad: list[bool]) -> int | None:
    candidates = [c for c in range(lo, hi + 1) if not bad[c]]
    if not candidates:
        return None
    window = [c for c in candidates if abs(prefix[c] - target) <= WINDOW * share]
    if not window:  # nothing near the target: take the nearest valid cut
        return min(candidates, key=lambda c: (abs(prefix[c] - target), crossing[c]))
    return min(window, key=lambda c: (crossing[c], abs(prefix[c] - target)))


def _stage(g: _Graph, index: int, members: tuple[int, ...], end: int, main: list[int],
           cost: float, crossing_bytes: int) -> Stage:
    produced = {out for i in members for out in g.nodes[i].output if out}
    consumed = {name for i in members for name in g.nodes[i].input if name}
    later = {name for i in main[end:] for name in g.nodes[i].input if name}
    inputs = sorted(name for name in consumed - produced if name not in g.constant_tensors)
    outputs = [name for name in sorted(produced) if name in later or name in g.output_names]
    model_outputs = tuple(name for name in g.output_names if name in produced)
    specs_in, specs_out = [], []
    for name in inputs:
        spec = g.spec(name)
        if spec is None:
            raise FormatError("ONNX model", f"stage {index} input {name!r} has no static type")
        specs_in.append(spec)
    for name in outputs:
        spec = g.spec(name)
        if spec is None:
            raise FormatError("ONNX model", f"stage {index} output {name!r} has no static type")
        specs_out.append(spec)
    return Stage(index, members, tuple(specs_in), tuple(specs_out), model_outputs, cost,
                 crossing_bytes)


def stage_models(model: onnx.ModelProto, plan: PartitionPlan) -> list[onnx.ModelProto]:
    """The ONNX model of every stage, each checked by onnx.checker."""
    g = _Graph(model)
    return [_stage_model(g, stage) for stage in plan.stages]


def _stage_model(g: _Graph, stage: Stage) -> onnx.ModelProto:
    """One stage's model, with copies of the constant nodes it needs."""
    model = g.model
    needed: set[int] = set()
    frontier = [name for i in stage.nodes for name in g.nodes[i].input if name]
    while frontier:
        name = frontier.pop()
        producer = g.producer.get(name)
        if producer is None or not g.is_constant[producer] or producer in needed:
            continue
        needed.add(producer)
        frontier.extend(n for n in g.nodes[producer].input if n)
    order = sorted(needed) + list(stage.nodes)
    nodes = [g.nodes[i] for i in order]
    used = {name for node in nodes for name in node.input}
    initializers = [init for name, init in g.initializers.items() if name in used]
    graph = helper.make_graph(
        nodes, f"{model.graph.name or 'model'}_stage{stage.index}",
        [_value_info(spec) for spec in stage.inputs],
        [_value_info(spec) for spec in stage.outputs],
        initializer=initializers,
    )
    staged = helper.make_model(graph, opset_imports=list(model.opset_import),
                               producer_name="modelip")
    staged.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs
    try:
        onnx.checker.check_model(staged)
    except onnx.checker.ValidationError as err:
        raise FormatError("ONNX model", f"stage {stage.index} fails the ONNX checker: "
                          f"{str(err).strip().splitlines()[0]}") from None
    return staged


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    return helper.make_tensor_value_info(spec.name, elem, list(spec.shape))


def package_onnx(model_path: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 partitions: int = 1, balance: str = "params", overwrite: bool = False
                 ) -> PartitionPlan:
    """Write the program container for an ONNX model: plain for 1 stage, else MDP."""
    refuse_existing([output], overwrite=overwrite)
    model = load_onnx(model_path)
    plan = plan_partitions(model, partitions, balance=balance)
    staged_models = stage_models(model, plan)
    if partitions == 1:
        stage, staged = plan.stages[0], staged_models[0]
        with atomic_output(output, overwrite=overwrite) as handle:
            write_container(handle, stage_segments(staged.SerializeToString(), stage.inputs,
                                                   stage.outputs, stage.model_outputs))
        return plan
    target = Path(output)
    with tempfile.TemporaryDirectory(prefix=".package-", dir=target.parent or ".") as scratch:
        paths = []
        for stage, staged in zip(plan.stages, staged_models, strict=True):
            path = Path(scratch) / partition_segment_name(stage.index)
            with open(path, "wb") as handle:
                write_container(handle, stage_segments(
                    staged.SerializeToString(), stage.inputs, stage.outputs,
                    stage.model_outputs))
            paths.append(str(path))
        meta = MdpMeta(
            partitions=tuple(
                Partition(stage.index, partition_segment_name(stage.index), stage.inputs,
                          stage.outputs, stage.cost / plan.total_cost if plan.total_cost else 0,
                          stage.crossing_bytes)
                for stage in plan.stages),
            model_inputs=plan.model_inputs, model_outputs=plan.model_outputs, balance=balance)
        pack_mdp(target, paths, meta, overwrite=overwrite)
    return plan


def describe(plan: PartitionPlan) -> list[str]:
    lines = []
    for stage in plan.stages:
        share = stage.cost / plan.total_cost if plan.total_cost else 0.0
        lines.append(f"stage {stage.index}: {len(stage.nodes)} nodes, {share:.1%} of "
                     f"{plan.balance}, {stage.crossing_bytes:,} bytes to the next stage")
    return lines


