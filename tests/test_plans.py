"""The example plans are valid, and the plan reader's errors say where."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.engine.plan import Plan
from orchestrator.errors import PlanError
from tests.test_engine import running

PLANS = Path(__file__).resolve().parent.parent / "plans"


@pytest.mark.parametrize("name", ["demo.yaml", "mdp-16.yaml", "hybrid-pq.yaml"])
def test_embedded_example_plans_validate(name: str) -> None:
    plan = Plan.load(PLANS / name)
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
    assert plan.policy.kems == ("P256",) and plan.model.rollback_floor == 7
    assert plan.model.expires > 0


async def test_hybrid_plan_wraps_with_the_post_quantum_kem(tmp_path: Path) -> None:
    text = (PLANS / "hybrid-pq.yaml").read_text().replace("../state/hybrid-pq",
                                                          str(tmp_path / "state"))
    (tmp_path / "plan.yaml").write_text(text)
    plan = Plan.load(tmp_path / "plan.yaml")
    async with running(plan) as (engine, _):
        # the policy accepts only hybrid session keys: serving means hybrid wraps
        assert all(card.state.value == "SERVING" for card in engine.cards)
    assert (tmp_path / "state" / "emulated-pki" / "root.pem").exists()
