"""The example plans are valid, and the plan reader's errors say where."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.errors import PlanError
from orchestrator.plan.model import Plan
from tests.test_engine import running, write_plan

PLANS = Path(__file__).resolve().parent.parent / "plans"


@pytest.mark.parametrize("name", ["demo.yaml", "mdp-16.yaml", "hybrid-pq.yaml"])
def test_embedded_example_plans_validate(name: str) -> None:
    from orchestrator.cli.demo import load_demo_plan

    plan = load_demo_plan() if name == "demo.yaml" else Plan.load(PLANS / name)
    assert plan.emulated is not None
    assert plan.emulated.devices_per_host % plan.group_size == 0


def test_real_hosts_example_validates_once_its_files_exist(tmp_path: Path) -> None:
    (tmp_path / "plans").mkdir()
    shutil.copy(PLANS / "real-hosts.yaml", tmp_path / "plans")
    with pytest.raises(PlanError, match=r"real-hosts.yaml:5: model.qpc: .*file not found"):
        Plan.load(tmp_path / "plans" / "real-hosts.yaml")
    for name in ("models/programqpc.bin", "secrets/MEK.dat", "pki/hosts-ca.pem",
                 "pki/orchestrator.pem", "pki/orchestrator.key", "pki/vendor-root.pem"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    plan = Plan.load(tmp_path / "plans" / "real-hosts.yaml")
    assert [h.devices for h in plan.hosts] == [(0, 1, 2, 3), tuple(range(8))]
    assert plan.hosts[0].tls is not None and plan.hosts[1].tls is None
    assert plan.hosts[1].insecure
    assert plan.policy.kems == ("P256",) and plan.model.rollback_floor == 7
    assert plan.model.expires == 0   # the example names no date: it would expire
    [warning] = plan.warnings()
    assert "10.0.0.12:62473: insecure: true, gRPC in plaintext" in warning
    # tls without the hosts' CA: every public CA would vouch for the host; said at start
    text = (tmp_path / "plans" / "real-hosts.yaml").read_text()
    (tmp_path / "plans" / "tls-no-ca.yaml").write_text(text.replace(
        "tls: {ca: ../pki/hosts-ca.pem, cert: ../pki/orchestrator.pem, key: "
        "../pki/orchestrator.key}", "tls: {}"))
    said = Plan.load(tmp_path / "plans" / "tls-no-ca.yaml").warnings()
    assert any("tls without ca trusts every public certificate authority" in w for w in said)
    # without tls or insecure, a host across the network is refused, by line
    text = (tmp_path / "plans" / "real-hosts.yaml").read_text()
    (tmp_path / "plans" / "real-hosts.yaml").write_text(text.replace(
        "      insecure: true", "      # insecure: true"))
    with pytest.raises(PlanError, match=r"real-hosts.yaml:\d+: fleet.hosts\[1\]: "
                       r"10.0.0.12:62473 is not loopback: give tls"):
        Plan.load(tmp_path / "plans" / "real-hosts.yaml")


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:62473", True), ("127.8.0.3:1", True), ("localhost:5", True),
    ("[::1]:62473", True), ("unix:/run/modelip.sock", True), ("10.0.0.1:62473", False),
    ("[fe80::1]:62473", False), ("host.example:62473", False), ("0.0.0.0:1", False),
    # forms a resolver or a parser would take for loopback, and an attacker's DNS for
    # anything: refused (the security review, docs/security.md)
    ("127.0.0.1.nip.io:1", False), ("0x7f.1:1", False), ("127.1:1", False),
    ("2130706433:1", False), ("[::ffff:127.0.0.1]:1", False), ("localhost.:1", False),
    ("dns:///127.0.0.1:1", False)])
def test_only_loopback_addresses_go_without_tls(address: str, loopback: bool) -> None:
    from orchestrator.plan.paths import is_loopback

    assert is_loopback(address) is loopback


def test_the_rollback_floor_defaults_to_the_model_version_and_lowering_it_warns(
        tmp_path: Path) -> None:
    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=1, model_extra="  version: 4\n"))
    assert plan.model.rollback_floor == 4 and plan.warnings() == []
    plan = Plan.load(write_plan(tmp_path, hosts=1, devices=1,
                                model_extra="  version: 4\n  rollback_floor: 2\n"))
    assert plan.model.rollback_floor == 2
    assert ["model.rollback_floor 2 is below model.version 4" in w
            for w in plan.warnings()] == [True]


async def test_hybrid_plan_wraps_with_the_post_quantum_kem(tmp_path: Path) -> None:
    text = (PLANS / "hybrid-pq.yaml").read_text().replace("../state/hybrid-pq",
                                                          str(tmp_path / "state"))
    (tmp_path / "plan.yaml").write_text(text)
    plan = Plan.load(tmp_path / "plan.yaml")
    async with running(plan) as (engine, _):
        # the policy accepts only hybrid session keys: serving means hybrid wraps
        assert all(card.state.value == "SERVING" for card in engine.cards)
    assert (tmp_path / "state" / "emulated-pki" / "root.pem").exists()


BASE = {"model": {"onnx": "tiny.onnx"}, "mek": {"generate": True},
        "fleet": {"emulated": {"hosts": 1, "devices_per_host": 2}}}
# (field, a wrong value): every field of the plan, each refused on its own line
WRONG = [
    ("model.onnx", 123), ("model.id", [1]), ("model.version", "seven"),
    ("model.rollback_floor", -1), ("model.expires", "soon"), ("model.min_firmware", [1]),
    ("model.balance", "speed"), ("model.partitions", 0),
    ("mek.generate", "yes"), ("mek.file", "missing.mek"),
    ("fleet.emulated.hosts", 0), ("fleet.emulated.devices_per_host", -1),
    ("fleet.emulated.reset_rate", -0.5), ("fleet.emulated.reboot_time", "x"),
    ("fleet.emulated.drop_events", 2), ("fleet.emulated.kem", "rsa"),
    ("fleet.emulated.seed", "x"),
    ("trust.roots", "r.pem"), ("trust.policy.max_age", -1), ("trust.policy.kems", ["RSA"]),
    ("concurrency", 0), ("retry.attempts", 0), ("retry.backoff", -1),
    ("retry.max_backoff", "x"), ("rekey.auto", "sometimes"), ("rekey.check_interval", -1),
    ("rekey.resync_interval", 0), ("rekey.min_interval", -1), ("rekey.probe_timeout", 0),
    ("timeouts.rpc", 0), ("timeouts.load", -1), ("timeouts.card", "x"),
    ("state_dir", 5), ("store", "mysql://db/x"), ("replicas.lease_ttl", 0),
    ("groups.size", 2),
    ("rollout.canary", -1), ("rollout.steps", "25%"), ("rollout.max_unavailable", 0),
    ("rollout.pause", -1), ("rollout.soak", "x"), ("rollout.smoke.check", "sane"),
    ("rollout.smoke.input", "missing.npz"), ("rollout.smoke.expect", 5),
    ("rollout.smoke.rtol", -1), ("rollout.smoke.atol", "x"),
]


@pytest.mark.parametrize(("field", "value"), WRONG, ids=[w[0] for w in WRONG])
def test_every_plan_field_refuses_a_wrong_value_on_its_line(tmp_path: Path, field: str,
                                                             value: object) -> None:
    import copy

    import yaml

    from tests.models import tiny_mlp

    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "r.pem").write_text("x")
    plan = copy.deepcopy(BASE)
    node = plan
    *parents, leaf = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})  # type: ignore[assignment]
    node[leaf] = value  # type: ignore[index]
    if leaf == "file":
        plan["mek"].pop("generate")  # type: ignore[attr-defined]
    text = yaml.safe_dump(plan, sort_keys=False)
    (tmp_path / "plan.yaml").write_text(text)
    with pytest.raises(PlanError) as refused:
        Plan.load(tmp_path / "plan.yaml")
    line = next(n for n, row in enumerate(text.splitlines(), 1)
                if row.strip().startswith(f"{leaf}:") or row.strip().startswith(f"- {leaf}:"))
    said = str(refused.value)
    assert said.startswith(f"{tmp_path / 'plan.yaml'}:{line}: {field}"), said
    assert len(said.splitlines()) == 1
