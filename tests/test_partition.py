"""ONNX -> partitioned, encrypted program -> emulated cards -> same output as the original."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from orchestrator.crypto.container import SealSettings
from orchestrator.crypto.evidence import TrustPolicy, verify_evidence
from orchestrator.crypto.mek import MEK
from orchestrator.emulator.fleet import EmulatedFleet, FleetConfig, run_fleet
from orchestrator.errors import FileInputError, FormatError, UsageError
from orchestrator.fileops.encrypt import SessionTarget, encrypt_model
from orchestrator.qpc.container import open_container
from orchestrator.qpc.mdp import read_mdp_meta
from orchestrator.qpc.partition import load_onnx, package_onnx, plan_partitions, stage_models
from orchestrator.transport.client import HostClient

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# (model, rtol, atol) as the onnx backend test data states them
MODELS = {"resnet50": (1e-3, 1e-7), "squeezenet": (1e-3, 1e-7), "vgg19": (1e-3, 1e-7)}


def dummy_input(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The input the onnx backend tests use for the light models (arange / n)."""
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = tuple(d.dim_value or 1 for d in value.type.tensor_type.shape.dim)
        n = int(np.prod(shape))
        feeds[value.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return feeds


def original_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("name", ["resnet50", "squeezenet", "vgg19"])
def test_every_stage_is_valid_and_the_cuts_are_balanced(name: str) -> None:
    model = load_onnx(LIGHT / f"light_{name}.onnx")
    for n in (2, 4, 8):
        plan = plan_partitions(model, n, balance="params")
        assert len(plan.stages) == n
        assert sum(len(s.nodes) for s in plan.stages) > 0
        covered = sorted(i for s in plan.stages for i in s.nodes)
        assert covered == sorted(set(covered))  # each computing node in exactly one stage
        for staged in stage_models(model, plan):
            onnx.checker.check_model(staged)
            for init in staged.graph.initializer:  # constants never cross: copied in
                assert init.name not in {i.name for i in staged.graph.input}
        # no stage carries more than its share plus the largest single node
        shares = [s.cost / plan.total_cost for s in plan.stages]
        assert max(shares) < 1.0 if n > 1 else shares == [1.0]


def test_resnet50_cuts_stay_near_balance_and_cross_small_tensors() -> None:
    model = load_onnx(LIGHT / "light_resnet50.onnx")
    plan = plan_partitions(model, 4, balance="params")
    shares = [s.cost / plan.total_cost for s in plan.stages]
    assert all(0.15 < share < 0.35 for share in shares), shares
    # every cut passes at most a few activations of one block, not the weights
    assert all(s.crossing_bytes <= 2 << 20 for s in plan.stages)
    flops = plan_partitions(model, 4, balance="flops")
    assert [s.nodes for s in flops.stages] != [s.nodes for s in plan.stages]


async def load_pipeline(tmp_path: Path, host: HostClient, fleet: EmulatedFleet, program: Path,
                        partitions: int, name: str) -> Path:
    """Attest cards 0..partitions-1, encrypt ``program`` to them, stage, load each
    card with its partition. Returns the encrypted program."""
    targets = []
    for device in range(partitions):
        request = os.urandom(32)
        report = verify_evidence(await host.attest(device, request), roots=[fleet.pki.root],
                                 policy=TrustPolicy(), request=request)
        targets.append(SessionTarget.from_report(report, str(device)))
    encrypted = encrypt_model(str(program), MEK.generate(), str(tmp_path / "enc"),
                              SealSettings(name), targets=targets)[-1]
    program_id, _ = await host.stage(encrypted)
    for device in range(partitions):
        await host.load(device, program_id, partition=device)
    return encrypted


@pytest.mark.parametrize("name", ["resnet50", "squeezenet"])
@pytest.mark.parametrize("partitions", [1, 2, 4, 8])
async def test_encrypted_pipeline_computes_what_the_original_computes(
        tmp_path: Path, name: str, partitions: int) -> None:
    source = LIGHT / f"light_{name}.onnx"
    model = onnx.load(source)
    feeds = dummy_input(model)
    expected = original_outputs(model, feeds)
    stored = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{name}_output_0.pb")))
    rtol, atol = MODELS[name]
    np.testing.assert_allclose(expected[0], stored, rtol=rtol, atol=atol)

    program = tmp_path / "program.qpc"
    package_onnx(source, program, partitions=partitions)
    with open_container(program) as container:
        meta = read_mdp_meta(container)
        assert (meta is None) == (partitions == 1)
        assert meta is None or len(meta.partitions) == partitions

    async with run_fleet(FleetConfig(hosts=1, devices_per_host=partitions)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        encrypted = await load_pipeline(tmp_path, host, fleet, program, partitions, name)
        plain_stage = encrypted.read_bytes()
        weights = [i.raw_data for i in model.graph.initializer if len(i.raw_data) >= 64]
        assert not any(w in plain_stage for w in weights)  # no weight bytes in clear
        outputs = await host.execute(list(range(partitions)), feeds)
    got = outputs[model.graph.output[0].name]
    np.testing.assert_allclose(got, expected[0], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got, stored, rtol=rtol, atol=atol)


async def test_tensors_reach_stages_by_name_and_bad_inputs_get_a_clean_answer(
        tmp_path: Path) -> None:
    """ShuffleNet in 5 stages fed one unnamed tensor (a bare .npy): it goes to the first
    stage only. Wrong shapes, dtypes and names are refused by name, as bad input, and
    nothing of the runtime's own messages reaches the client."""
    source = LIGHT / "light_shufflenet.onnx"
    model = onnx.load(source)
    [(input_name, x)] = dummy_input(model).items()
    stored = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / "light_shufflenet_output_0.pb")))
    package_onnx(source, tmp_path / "program.qpc", partitions=5)
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=5)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        await load_pipeline(tmp_path, host, fleet, tmp_path / "program.qpc", 5, "shufflenet")
        group = list(range(5))
        outputs = await host.execute(group, {"": x})
        np.testing.assert_allclose(outputs[model.graph.output[0].name], stored, rtol=1e-3,
                                   atol=1e-7)
        bad = {
            "shape": ({input_name: x[..., :7]}, f"input {input_name!r} must have shape"),
            "dtype": ({input_name: x.astype(np.float64)}, "must be float32, got float64"),
            "name": ({"nope": x}, f"missing input tensor {input_name!r}"),
        }
        for feeds, expected in bad.values():
            with pytest.raises(FormatError) as info:
                await host.execute(group, feeds)
            assert expected in str(info.value) and info.value.exit_code == 2
            assert "onnxruntime" not in str(info.value) and "Got invalid" not in str(info.value)


def test_bad_models_get_one_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "not.onnx"
    text.write_text("this is not a model")
    with pytest.raises(FormatError, match="not an ONNX model"):
        load_onnx(text)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]),
                               helper.make_node("Relu", ["y"], ["x"])], "cycle",
                              [], [helper.make_tensor_value_info("y", 1, [1])])
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "broken.onnx").write_bytes(broken.SerializeToString())
    with pytest.raises(FormatError, match="fails the ONNX checker"):
        load_onnx(tmp_path / "broken.onnx")
    with pytest.raises(UsageError, match="at most that many stages"):
        plan_partitions(load_onnx(LIGHT / "light_squeezenet.onnx"), 1000)
    with pytest.raises(FileInputError, match="model file not found"):
        load_onnx(tmp_path / "missing.onnx")


def test_a_graph_that_cannot_be_cut_is_refused(tmp_path: Path) -> None:
    """Every cut would pass a tensor whose shape is unknown: refused, by name."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("NonZero", ["a"], ["nz"]),  # data-dependent shape
             helper.make_node("Cast", ["nz"], ["b"], to=1),
             helper.make_node("ReduceSum", ["b"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "uncuttable",
                              [helper.make_tensor_value_info("x", 1, [4])],
                              [helper.make_tensor_value_info("y", 1, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(FormatError, match="cannot cut stage 2 from 3"):
        plan_partitions(model, 3)


def test_stages_of_a_real_weight_model_compose_to_the_original() -> None:
    """The synthetic benchmark model (random weights, residuals), run stage by stage."""
    import importlib.util

    import onnxruntime

    spec = importlib.util.spec_from_file_location(
        "make_model", Path(__file__).resolve().parent.parent / "bench" / "make_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.make_mlp(64 * 64 * 12, 64, seed=3)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    expected = original_outputs(model, {"x": x})[0]
    for n in (2, 3, 5):
        plan = plan_partitions(model, n, balance="flops")
        env = {"x": x}
        for staged in stage_models(model, plan):
            session = onnxruntime.InferenceSession(staged.SerializeToString(),
                                                   providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            results = session.run(None, {name: env[name] for name in names})
            env.update({o.name: r for o, r in zip(session.get_outputs(), results, strict=True)})
        np.testing.assert_allclose(env["y"], expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(expected, 0)  # real weights: a result worth comparing
