"""Several deployments on one fleet (docs/deployments.md): each its own MEK and program on
the groups placed for it, placement kept from run to run, a card handed from one
deployment to another reset before the other's key (shown by the card itself), and a
plan that cannot work refused in one line."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.app import open_engine
from orchestrator.emulator.fleet import EmulatedFleet, FleetConfig, run_fleet
from orchestrator.errors import PlanError
from orchestrator.plan.model import Plan
from tests.models import tiny_mlp

MODELIP = [sys.executable, "-m", "orchestrator"]
SQUEEZENET = "package:onnx/backend/test/data/light/light_squeezenet.onnx"


@asynccontextmanager
async def emulated(tmp_path: Path, hosts: int, devices: int) -> AsyncIterator[EmulatedFleet]:
    async with run_fleet(FleetConfig(hosts=hosts, devices_per_host=devices)) as fleet:
        fleet.pki.save(tmp_path / "pki")
        yield fleet


def write(tmp_path: Path, fleet: EmulatedFleet | None, deployments: str, *,
          name: str = "plan.yaml", fleet_text: str = "") -> Path:
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "other.onnx").write_bytes(tiny_mlp(seed=5).SerializeToString())
    if fleet is not None:
        hosts = "".join(f"    - address: {a}\n      devices: {list(range(len(h.backend.cards)))}"
                        f"\n      labels: {{zone: z{i % 2}}}\n"
                        for i, (a, h) in enumerate(zip(fleet.addresses, fleet.hosts,
                                                       strict=True)))
        fleet_text = f"fleet:\n  hosts:\n{hosts}trust: {{roots: [pki/root.pem]}}\n"
    path = tmp_path / name
    path.write_text(f"deployments:\n{deployments}{fleet_text}"
                    "retry: {attempts: 3, backoff: 0.05}\nrekey: {check_interval: 0.5}\n"
                    "state_dir: state\n")
    return path


async def deploy(plan: Path) -> Any:
    """Deploy ``plan`` to the end; the engine, with the journal's newest moves' reasons
    (``engine.reasons``) read before it closed."""
    async with open_engine(Plan.load(plan)) as engine:
        with anyio.fail_after(120):
            await engine.run()
        engine.reasons = [t.reason for t in await engine.store.transitions(500)]
        return engine


def card_programs(fleet: EmulatedFleet) -> dict[tuple[str, int], str]:
    return {(address, device): card.program.program_id
            for address, host in zip(fleet.addresses, fleet.hosts, strict=True)
            for device, card in enumerate(host.backend.cards) if card.program is not None}


async def test_three_deployments_serve_each_on_its_groups_under_its_own_mek(
        tmp_path: Path) -> None:
    async with emulated(tmp_path, hosts=2, devices=4) as fleet:
        plan = write(tmp_path, fleet, """\
  - {name: alpha, model: {onnx: tiny.onnx, id: alpha}, mek: {generate: true}, groups: 2}
  - name: vision
    model: {onnx: SQUEEZENET, partitions: 2, id: vision}
    mek: {generate: true}
    groups: 1
    hosts: [zone=z1]
  - {name: batch, model: {onnx: other.onnx, id: batch}, mek: {generate: true}, groups: 2,
     spread: false}
""".replace("SQUEEZENET", SQUEEZENET))
        engine = await deploy(plan)
        outcomes = {d.name: d for d in engine.summary().deployments}
        assert {n: (d.groups_serving, d.groups_wanted) for n, d in outcomes.items()} == {
            "alpha": (2, 2), "vision": (1, 1), "batch": (2, 2)}
        assert engine.summary().exit_code == 0
        programs = {d.name: d.program.program_id for d in engine.deployments.values()}
        assert len(set(programs.values())) == 3
        # what each card holds, by its own word, is its deployment's program
        held = card_programs(fleet)
        by_deployment: dict[str, set[tuple[str, int]]] = {}
        for driver in engine.drivers:
            key = (driver.machine.host, driver.machine.device)
            assert held[key] == programs[driver.deployment], key
            by_deployment.setdefault(driver.deployment, set()).add(key)
        assert {h for h, _ in by_deployment["vision"]} == {fleet.addresses[1]}   # zone z1
        assert len({h for h, _ in by_deployment["alpha"]}) == 2                  # spread
        assert len({h for h, _ in by_deployment["batch"]}) == 1                  # packed
        assert len(held) == 6   # 8 cards, 6 placed: the other 2 hold nothing
        meks = {p.read_bytes() for p in (tmp_path / "state" / "deployments").glob("*/mek.dat")}
        assert len(meks) == 3   # three key domains
        events = [e for e in engine._events if getattr(e, "KIND", "") == "card"]  # noqa: SLF001
        assert all(e.deployment in programs for e in events)
        from orchestrator.views.metrics import render_metrics

        text = render_metrics(engine.snapshot(), engine.stats)
        assert 'modelip_deployment_groups_serving{deployment="vision"} 1.0' in text
        assert 'modelip_deployment_cards{deployment="alpha",state="SERVING"} 2.0' in text
        # the journal's view, by deployment (no host called)
        status = await anyio.run_process([*MODELIP, "status", str(plan), "--json",
                                          "--deployment", "vision"], check=True)
        view = json.loads(status.stdout)
        assert view["deployments"] == [{"name": "vision", "groups_wanted": 1,
                                        "groups_placed": 1, "groups_serving": 1, "cards": 2,
                                        "version": 1, "rollout": None}]
        assert {(c["host"], c["device"]) for c in view["cards"]} == by_deployment["vision"]
        assert {c["deployment"] for c in view["cards"]} == {"vision"}
        # the next run keeps every group where it was
        placed = {(d.machine.host, d.machine.device): d.deployment for d in engine.drivers}
        again = await deploy(plan)
        assert {(d.machine.host, d.machine.device): d.deployment
                for d in again.drivers} == placed
        assert again.summary().exit_code == 0


async def test_a_card_handed_to_another_deployment_is_reset_before_its_key(
        tmp_path: Path) -> None:
    """Cards of a removed deployment go to another one: each is reset (its session, and
    every slot wrapped to it, gone) before the other deployment's key is wrapped to it;
    the card's own record of what it loaded, in which session, shows it."""
    async with emulated(tmp_path, hosts=1, devices=4) as fleet:
        first = write(tmp_path, fleet, """\
  - {name: alpha, model: {onnx: tiny.onnx, id: alpha}, mek: {generate: true}, groups: 3}
  - {name: beta, model: {onnx: other.onnx, id: beta}, mek: {generate: true}, groups: 1}
""")
        one = await deploy(first)
        alpha = one.deployments["alpha"].program.program_id
        moved = {d.machine.device for d in one.drivers if d.deployment == "alpha"}
        assert len(moved) == 3
        loads: list[tuple[int, bytes, str]] = []    # (device, session, program), as loaded
        cards = fleet.hosts[0].backend.cards
        for device, card in enumerate(cards):
            def recording(container: Any, *, program_id: str, _card: Any = card,
                          _device: int = device, _load: Any = card.load, **kw: Any) -> Any:
                loads.append((_device, _card.session_id, program_id))
                return _load(container, program_id=program_id, **kw)
            card.load = recording  # type: ignore[method-assign]
        sessions_before = {d: cards[d].session_id for d in moved}
        boots_before = {d: cards[d].boot_counter for d in moved}
        second = write(tmp_path, fleet, """\
  - {name: beta, model: {onnx: other.onnx, id: beta}, mek: {generate: true}, groups: 4}
""")
        two = await deploy(second)
        beta = two.deployments["beta"].program.program_id
        assert two.summary().exit_code == 0 and card_programs(fleet) == {
            (fleet.addresses[0], d): beta for d in range(4)}
        for device in moved:
            assert cards[device].boot_counter > boots_before[device]   # it was reset
            mine = [(s, p) for d, s, p in loads if d == device]
            assert mine and all(p == beta for _, p in mine)
            assert all(s != sessions_before[device] for s, _ in mine)  # never alpha's session
        assert alpha not in {p for _, _, p in loads}
        assert sum(r.startswith("handover: the card holds model 'alpha' version 1")
                   for r in two.reasons) == 3, two.reasons


@pytest.mark.parametrize(("deployments", "expected"), [
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true}}\n"
     "  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true}}\n",
     "plan.yaml:3: deployments[1].name: 'a' is already deployments[0]: one name each"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true}, groups: 0}\n",
     "deployments[0].groups: must be from 1 to"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true}, groups: 9}\n",
     "plan.yaml:2: deployments[0]: a can never fit: needs 9 groups of 1 card; 8 free groups "
     "of 1 on the fleet's hosts"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true}, hosts: [zone=b]}\n",
     "deployments[0].hosts: 'zone=b' names no host of the fleet"),
    ("  - {name: A_1, model: {onnx: tiny.onnx}, mek: {generate: true}}\n",
     "deployments[0].name: must be 1-63 lowercase letters"),
    ("  - {name: a, model: {onnx: tiny.onnx}}\n", "deployments[0].mek: is required"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true}}\n"
     "model: {onnx: tiny.onnx}\n", "model: with deployments: each deployment has its model"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true}}\nrollout: {canary: 1}\n",
     "rollout: with deployments: each deployment has its rollout (deployments[i].rollout)"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true},\n"
     "     rollout: {steps: [50%, 25%]}}\n",
     "deployments[0].rollout.steps[1]: must be larger than the step before (50%)"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true},\n"
     "     rollout: {max_unavailable: 0}}\n",
     "deployments[0].rollout.max_unavailable: must be"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true},\n"
     "     trust: {policy: {firmware: ['2.0']}}}\ntrust: {policy: {firmware: ['1.2.0']}}\n",
     "plan.yaml:2: deployments[0].trust.policy.firmware: none of ['2.0'] is allowed by the "
     "fleet's trust.policy.firmware (['1.2.0'])"),
    ("  - {name: a, model: {onnx: tiny.onnx}, mek: {generate: true},\n"
     "     trust: {policy: {min_firmware: x}}}\n",
     "deployments[0].trust.policy.min_firmware"),
])
def test_a_plan_that_cannot_work_is_one_line(deployments: str, expected: str,
                                             tmp_path: Path) -> None:
    plan = write(tmp_path, None, deployments,
                 fleet_text="fleet: {emulated: {hosts: 2, devices_per_host: 4}}\n")
    with pytest.raises(PlanError) as caught:
        Plan.load(plan)
    said = str(caught.value)
    assert expected in said and len(said.splitlines()) == 1, said
    assert re.match(r".*plan\.yaml:\d+: ", said)
    assert not (tmp_path / "state").exists()   # nothing started


def test_deployments_with_a_shared_store_and_a_rollout_are_read(tmp_path: Path) -> None:
    """A plan with deployments and ``store:`` is read (it once raised KeyError), a
    deployment's rollout with it."""
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "root.pem").write_text("")
    fleet_text = ("fleet:\n  hosts:\n    - {address: 127.0.0.1:1, devices: [0, 1]}\n"
                  "trust: {roots: [pki/root.pem]}\nstore: postgresql:///modelip\n")
    plan = write(tmp_path, None, "  - {name: a, model: {onnx: tiny.onnx}, mek: "
                 "{file: mek.bin}, groups: 2, rollout: {canary: 1}}\n", fleet_text=fleet_text)
    (tmp_path / "mek.bin").write_bytes(bytes(16))
    loaded = Plan.load(plan)
    assert loaded.shared and loaded.deployments[0].rollout is not None
    assert loaded.deployments[0].rollout.canary == 1


async def test_a_deployments_own_trust_policy_is_asked_of_its_cards_alone(
        tmp_path: Path) -> None:
    """One card has old firmware (0.9.0), which the fleet's policy accepts: the
    deployment whose own policy asks for 1.0 and up quarantines it, the other
    deployment's cards serve."""
    plan = write(tmp_path, None, """\
  - {name: a-strict, model: {onnx: tiny.onnx, id: s}, mek: {generate: true}, groups: 1,
     trust: {policy: {min_firmware: "1.0"}}}
  - {name: b-lax, model: {onnx: other.onnx, id: l}, mek: {generate: true}, groups: 3}
""", fleet_text="fleet: {emulated: {hosts: 1, devices_per_host: 4, "
                "old_firmware_cards: ['0/0']}}\n")
    engine = await deploy(plan)
    states = {(d.deployment, d.machine.device): d.machine for d in engine.drivers}
    strict = states[("a-strict", 0)]        # placed first (by name): card 0, the old one
    assert strict.state.value == "QUARANTINED" and "0.9.0" in strict.reason, strict.reason
    assert {m.state.value for (name, _), m in states.items() if name == "b-lax"} == {"SERVING"}
    assert engine.summary().exit_code == 3
    # the same card under the lax deployment's policy (the fleet's) serves
    import shutil

    shutil.rmtree(tmp_path / "state")     # a fresh fleet (the embedded one is new anyway)
    swapped = write(tmp_path, None, """\
  - {name: a-lax, model: {onnx: other.onnx, id: l}, mek: {generate: true}, groups: 4}
""", name="lax.yaml", fleet_text="fleet: {emulated: {hosts: 1, devices_per_host: 4, "
                                  "old_firmware_cards: ['0/0']}}\n")
    lax = await deploy(swapped)
    assert lax.summary().exit_code == 0
